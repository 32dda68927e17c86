"""Block diffusion (BD3-LM), at run time: the sampler denoises one block at a time while the blocks before it sit in
the runner's exact KV cache; the same loop for every runner, as graph calls (block_step, commit, commit_step).

Blocks are aligned to position 0, as the model was trained: the prompt's complete blocks are committed first, the
prompt's tail becomes fixed tokens of the first noised block, and each block, once final, is committed (its keys and
values appended at the cache's valid length). A runner with the commit-step graph folds that commit into the next
block's first network call instead (the same keys and values, one call fewer per block). Generation ends at an
end-of-text or after `max_new` tokens; `--steps` is a budget per block.

A model with the token shift (adapted from an autoregressive parent) reads the start token first, as its parent
did, and its graphs return each position's prediction from the position before: a block's first token is predicted
by the previous block's last clean position, which the commit (or the commit step) returns; the loop keeps that
prediction for every step of the block, as the model was trained.

A conditional model (`cond_len`) runs its encoder once per request and every graph call carries the encoding; under
classifier-free guidance each sample's unguided twin (the same blocks, the empty condition) rides in the same calls
with a cache of its own, and each step samples from the two rows' mix (`_Rows`; docs/guidance.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

import numpy as np

from jetson_dllm.condition import check_guidance, condition_ids, encoder_call
from jetson_dllm.errors import DllmError
from jetson_dllm.families.common import (  # noqa: F401 (quality_length is part of the family interface)
    BenchRun,
    Generated,
    Served,
    check_bench_length,
    check_context,
    left_to_right_ids,
    left_to_right_request,
    no_soft,
    quality_length,
    soft_feeds,
    still_masked,
)
from jetson_dllm.guidance import check_runner, guided_head, weight_at
from jetson_dllm.runners.calls import Call, drive
from jetson_dllm.runners.graphs import CONDITION_INPUTS, ENTROPY, SAMPLING_OUTPUTS
from jetson_dllm.sampler import SamplerConfig, SpecialIds, Step, sample_steps

OnStep = Callable[[np.ndarray, Step], None]


@dataclass
class BlockResult:
    tokens: np.ndarray  # (B, prompt + generated) int32
    new_tokens: int
    evaluations: int  # denoising network calls
    commits: int  # cache passes (one per committed block)
    seconds: float
    step_ms: list[float] = field(default_factory=list)  # each network evaluation's time
    commit_ms: list[float] = field(default_factory=list)  # each cache pass's time
    sampler_s: float = 0.0  # the sampler's own time, all blocks
    folded: int = 0  # commits done inside the next block's first step (no cache pass of their own)


@dataclass
class BlockGeneration(Generated):
    """What a block-diffusion model generated block by block with an exact KV cache (`result`: a BlockResult)."""

    block: int = 0

    def to_json(self) -> dict:
        r = self.result
        return {"texts": self.texts, "tokens": r.tokens.tolist(), "backend": self.backend, "block_size": self.block,
                "new_tokens": r.new_tokens, "evaluations": r.evaluations, "cache_passes": r.commits, "folded_commits": r.folded,
                "total_ms": r.seconds * 1e3, "tokens_per_s": r.new_tokens * len(self.texts) / max(r.seconds, 1e-9)}

    def summary(self) -> str:
        r = self.result
        return (f"block diffusion (block {self.block}): {r.new_tokens} tokens, {r.evaluations} network evaluations, "
                f"{r.commits} cache passes ({r.folded} more folded into steps), {r.seconds * 1e3:.0f} ms")


def _relay(on_step: OnStep | None, out: np.ndarray, s: int, e: int, skip: int = 0) -> OnStep | None:
    """The sampler's per-step callback for one block, shown on the whole text so far (the stream grows block by
    block: earlier blocks final, this one denoising, later ones not there yet), past the first `skip` positions
    (a shifted model's start token)."""
    if on_step is None:
        return None

    def relay(canvas: np.ndarray, step: Step) -> None:
        view = out[:, :e].copy()
        view[:, s:e] = canvas[:, : e - s]
        committed = np.zeros(view.shape, dtype=bool)
        committed[:, s:e] = step.committed[:, : e - s]
        on_step(view[:, skip:], replace(step, committed=committed[:, skip:]))

    return relay


def _commit(tokens: np.ndarray, start: int, rows: _Rows, first: _First, commit_ms: list[float]) -> Generator[Call, dict, None]:
    """A final block's keys and values into the cache at `start` (every call row's), timed; what a shifted model's
    commit predicts for the next block's first token kept."""
    c0 = time.perf_counter()
    got = yield Call("commit", {"tokens": rows.twice(tokens), "valid_len": np.int32(start), **rows.memory}, rows.commit_outputs)
    first.keep(got)
    commit_ms.append((time.perf_counter() - c0) * 1e3)


def _encoding(condition: list[int] | None, guided: bool, n: int, cond_len: int) -> Generator[Call, dict, dict]:
    """A conditional model's encoding for every call row: the encoder, once, on the condition (and on the empty one,
    the guided twins'); {} for a model without a condition."""
    if condition is None:
        return {}
    out = yield encoder_call([condition, *([[]] if guided else [])], cond_len)
    return {name: np.repeat(out[name], n, axis=0) for name in CONDITION_INPUTS}  # [condition x n; (empty x n)]


HEADS = (*SAMPLING_OUTPUTS, ENTROPY)  # what the sampler takes from a call, in order (the entropy where a graph has it)


class _First:
    """A shifted model's prediction of a block's first token: what the commit (or commit step) of the block before
    returned at position 0 (its top-K, or under guidance its logits), spliced into every step of the block. Unshifted
    models: nothing to keep."""

    def __init__(self, shifted: bool):
        self.shifted, self.kept = shifted, None

    def keep(self, got: dict) -> None:
        if self.shifted:
            self.kept = {k: v[:, :1].copy() for k, v in got.items() if k in (*HEADS, "logits")}

    def spliced(self, got: dict) -> dict:
        """A call's outputs with position 0 of each kept one replaced by the kept prediction."""
        out = dict(got)
        for k, v in (self.kept or {}).items():
            if out.get(k) is not None:
                out[k] = out[k].copy()
                out[k][:, :1] = v
        return out

    def splice(self, got: dict) -> tuple:
        """What the sampler takes: top-K log-probabilities, ids, and the entropy where the graph returns it."""
        out = self.spliced(got)
        return tuple(out.get(k) for k in HEADS)


class _Rows:
    """What every call of a generation carries beyond its tokens: a conditional model's encoding (`memory`, one row per
    call row) and, under classifier-free guidance, each sample's unguided twin: the same tokens under the empty
    condition, in rows after the samples'. A guided block step (or commit step) asks for both rows' logits and samples
    from their mix (jetson_dllm.guidance); a shifted model's commit then returns its logits too, whose position 0 (the
    next block's first token, kept by `_First`) is mixed the same way at every step of that block."""

    def __init__(self, n: int, sampler: SamplerConfig, memory: dict, topk: int, shifted: bool):
        self.n, self.sampler, self.memory, self.topk = n, sampler, memory, topk
        self.guided = bool(sampler.guidance)
        self.commit_outputs = ("logits",) if self.guided and shifted else None

    def twice(self, a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, a]) if self.guided else a

    def heads(self, logits: np.ndarray, step: int) -> tuple:
        """The sampler's head from both rows' logits (2n, b, vocab): their mix at this step's weight."""
        weight = weight_at(self.sampler.guidance, self.sampler.guidance_schedule, step, self.sampler.steps)
        return guided_head(logits[: self.n], logits[self.n :], weight, self.topk)


def _denoise(steps, start: int, pending: tuple[np.ndarray, int] | None, first: _First, rows: _Rows, soft_k: int = 0,
             mask_id: int = 0) -> Generator[Call, dict, object]:
    """One block's sampler as graph calls: block steps at `start`, the first one a commit step when a finished block
    is `pending`; the sampler's result. A self-conditioned model's block steps (`soft_k`) also get the previous step's
    top-k at the positions still masked (none on the block's first step). `rows`: the encoding and guidance's twins."""
    try:
        z = next(steps)
        soft = no_soft(z.shape, soft_k) if soft_k else {}
        calls = 0
        while True:
            if pending is not None:  # the finished block's commit folded into this block's first call
                feeds = {"prev_tokens": rows.twice(pending[0]), "tokens": rows.twice(z), "valid_len": np.int32(pending[1]), **rows.memory}
                got, pending = (yield Call("commit_step", feeds, ("logits",) if rows.guided else None)), None
                first.keep(got)  # the shifted commit step's position 0 is the finished block's last position's
            else:
                feeds = {"tokens": rows.twice(z), "valid_len": np.int32(start), **{k: rows.twice(v) for k, v in soft.items()}, **rows.memory}
                got = yield Call("block_step", feeds, ("logits",) if rows.guided else None)
            heads = rows.heads(first.spliced(got)["logits"], calls) if rows.guided else first.splice(got)
            calls += 1
            previous = soft_feeds(heads[0], heads[1], soft_k) if soft_k else {}
            z = steps.send(heads)
            soft = still_masked(previous, z == mask_id) if soft_k else {}
    except StopIteration as done:
        return done.value


@dataclass(frozen=True)
class BlockModel:
    """What a block loop needs of its model: the special ids, the block, the context, whether its runner folds
    commits (the commit-step graph), a shifted model's start token (read first; not part of the result), a
    self-conditioned model's candidates per position, a conditional model's condition length, the runner's top-K."""

    special: SpecialIds
    block: int
    max_len: int
    fold: bool = False
    shift_bos: int | None = None
    soft_k: int = 0
    cond_len: int = 0
    topk: int = 0

    @classmethod
    def of(cls, runner) -> BlockModel:
        cfg, tok = runner.cfg, runner.tokenizer
        return cls(SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id), cfg.block_size, cfg.canvas_len, "commit_step" in runner.graphs,
                   tok.bos_id if cfg.shift else None, cfg.soft_k, cfg.cond_len, runner.topk)


def _block_canvas(out: np.ndarray, s: int, e: int, prompt_len: int, block: int, special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
    """Block [s, e)'s noised canvas (B, block) and its fixed positions: the prompt's tail given, positions past the
    text's end padding (the graph's block is always whole), the rest masked."""
    canvas = np.full((len(out), block), special.mask, dtype=np.int32)
    fixed = np.zeros_like(canvas, dtype=bool)
    tail = max(0, prompt_len - s)  # the prompt's part of this block
    canvas[:, :tail], fixed[:, :tail] = out[:, s : s + tail], True
    fixed[:, e - s :] = True
    canvas[:, e - s :] = special.pad
    return canvas, fixed


def block_calls(prompt: list[int], max_new: int, model: BlockModel, sampler: SamplerConfig, num_samples: int = 1,
                on_step: OnStep | None = None, condition: list[int] | None = None) -> Generator[Call, dict, BlockResult]:
    """Generation block by block as graph calls: `block_step` (a noised block over the cache's first `valid_len`
    positions), `commit` (a final block's keys and values into the cache at `valid_len`) and, with `model.fold`,
    `commit_step` (the previous block's commit and this block's first step in one call). `on_step(text so far,
    Step)` sees every denoising step (the live view). A shifted model reads its start token first. `condition`: a
    conditional model's condition ids (its encoder runs once, every call takes the encoding); with
    `sampler.guidance`, each sample's unguided twin rides along in every call and steps sample from the mix's
    top-`model.topk`. The callers check guidance has a condition."""
    first, given, special, block = _First(model.shift_bos is not None), prompt, model.special, model.block
    prompt = [model.shift_bos, *prompt] if model.shift_bos is not None else prompt
    total = min(len(prompt) + max_new, model.max_len)
    if len(prompt) >= total:
        raise DllmError(f"the prompt is {len(prompt)} tokens; this model's context is {model.max_len}, leaving no room to generate")
    t0 = time.perf_counter()
    memory = yield from _encoding(condition if model.cond_len else None, bool(sampler.guidance), num_samples, model.cond_len)
    rows = _Rows(num_samples, sampler, memory, model.topk, model.shift_bos is not None)
    step_ms, commit_ms, sampler_s = [], [], 0.0
    out = np.full((num_samples, total), special.pad, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    done = len(prompt) // block
    for j in range(done):  # the prompt's complete blocks
        yield from _commit(out[:, j * block : (j + 1) * block], j * block, rows, first, commit_ms)
    evaluations, commits, e, folded, pending = 0, done, 0, 0, None
    for j in range(done, -(-total // block)):
        s, e = j * block, min((j + 1) * block, total)
        canvas, fixed = _block_canvas(out, s, e, len(prompt), block, special)
        steps = sample_steps(canvas, fixed, special, replace(sampler, seed=sampler.seed + j), on_step=_relay(on_step, out, s, e, len(prompt) - len(given)))
        result = yield from _denoise(steps, s, pending, first, rows, model.soft_k, special.mask)
        folded += int(pending is not None and result.evaluations > 0)
        if pending is not None and not result.evaluations:  # no network call in this block (nothing to denoise): commit on its own
            yield from _commit(*pending, rows, first, commit_ms)
            commits += 1
        pending = None
        evaluations += result.evaluations
        step_ms += [h.network_ms for h in result.history if h.evaluated]
        sampler_s += result.sampler_s
        out[:, s:e] = result.tokens[:, : e - s]
        ended = ((result.tokens == special.eot) | (result.tokens == special.pad)) & ~fixed
        if ended.any(axis=1).all() or e == total:
            break
        if model.fold:
            pending = (out[:, s:e].copy(), s)
        else:
            yield from _commit(out[:, s:e], s, rows, first, commit_ms)
            commits += 1
    return BlockResult(out[:, len(prompt) - len(given) : e], max(0, e - len(prompt)), evaluations, commits, time.perf_counter() - t0, step_ms, commit_ms,
                       sampler_s, folded)


def generate_blocks(runner, prompt_ids: list[int], max_new: int, num_samples: int, sampler: SamplerConfig, on_step=None,
                    condition: list[int] | None = None) -> BlockResult:
    """`block_calls` on a runner, folding commits when it has the commit-step graph; a conditional model's under
    `condition` ids ([]: the empty condition)."""
    return drive(runner, _calls(runner, prompt_ids, max_new, num_samples, sampler, on_step, condition))


def _calls(runner, ids: list[int], max_new: int, n: int, sampler: SamplerConfig, on_step, condition: list[int] | None):
    if sampler.guidance:
        _check_guided(runner, condition)
    return block_calls(ids, max_new, BlockModel.of(runner), sampler, n, on_step, condition)


def _check_guided(runner, condition: list[int] | None) -> None:
    """Guidance pulls a conditional model toward its condition: an unconditional block-diffusion model has nothing to
    drop (its clean blocks are never masked in training, so a masked prompt is no unconditional row for it)."""
    if not runner.cfg.cond_len:
        raise DllmError("--guidance on a block-diffusion model pulls toward a condition, and this one was trained without one "
                        "(a masked prompt is not an input it knows): train one with `dllm train --cond-len N`, or leave --guidance out")
    check_runner(runner)
    check_guidance(condition or [])


def serve_calls(runner, prompt: str, suffix: str | None, max_tokens: int, n: int, sampler: SamplerConfig, on_step=None) -> Served:
    """A server request: `max_tokens` after the prompt, block by block over the request's own cache rows (the
    batcher names them); `on_step(text so far, Step)` sees every denoising step, each block as it fills. A
    conditional model's prompt is its condition: `max_tokens` generated under it."""
    condition = condition_ids(runner, prompt) if runner.cfg.cond_len else None
    ids = left_to_right_ids(runner, "" if condition is not None else prompt, "a block-diffusion model")
    fixed = left_to_right_request(runner, ids, max_tokens, n, reserved=int(runner.cfg.shift))  # a shifted model's start token
    return Served(_calls(runner, ids, max_tokens, n, sampler, on_step, condition), fixed)


def complete(runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None, gap: int = 12,
             on_step=None, condition: str | None = None) -> BlockGeneration:
    """`sampler.steps` per block; ends at end-of-text or `length` tokens; `on_step` sees the text grow block by block;
    a conditional model's under `condition` (none: the empty condition)."""
    sampler = (sampler or SamplerConfig()).validate()
    cond = condition_ids(runner, condition)
    ids = left_to_right_ids(runner, prompt, "a block-diffusion model")
    check_context(runner, ids, length)
    room = runner.cfg.canvas_len - len(ids) - int(runner.cfg.shift)  # a shifted model's start token takes a position
    r = generate_blocks(runner, ids, length or room, num_samples, sampler, on_step, cond)
    texts = [runner.tokenizer.decode([int(t) for t in row]) for row in r.tokens]
    return BlockGeneration(texts, r, runner.name, runner.cfg.block_size)


def bench_generate(runner, name: str, batch: int, tokens: int, sampler: SamplerConfig) -> BenchRun:
    """`tokens` generated block by block from an empty prompt, `sampler.steps` per block, ends banned (so every
    generation runs the same blocks)."""
    check_bench_length(runner, name, tokens)
    r = generate_blocks(runner, [], tokens, batch, sampler, condition=[] if runner.cfg.cond_len else None)  # the empty condition
    return BenchRun(r.seconds, r.step_ms, r.sampler_s, r.evaluations,
                    {"block_size": runner.cfg.block_size, "commits": r.commits, "folded": r.folded, "commit_ms": r.commit_ms})
