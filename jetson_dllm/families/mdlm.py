"""Masked diffusion (MDLM), at run time: a whole canvas denoised by the sampler, one canvas-graph call per step.

The loop is `sampler.sample_steps` (a generator of canvases) wrapped as a generator of graph calls; the prompt
may be a prefix or a template with gaps anywhere (infilling)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np

from jetson_dllm.condition import check_guidance, condition_ids, encoder_call
from jetson_dllm.errors import DllmError
from jetson_dllm.families.common import BenchRun, Served, bench_canvas, no_soft, soft_feeds, still_masked
from jetson_dllm.guidance import check_prompt, check_runner, guided_head, unconditional, weight_at
from jetson_dllm.profiler import check_fits, memory_plan
from jetson_dllm.prompt import Canvas, build_canvas, request_canvas
from jetson_dllm.runners.calls import Call, drive
from jetson_dllm.runners.graphs import CONDITION_INPUTS, ENTROPY
from jetson_dllm.sampler import SamplerConfig, SampleResult, SpecialIds, Step, sample_steps


@dataclass
class Generation:
    texts: list[str]
    canvas: Canvas
    result: SampleResult
    backend: str
    sampler: SamplerConfig

    @property
    def tokens(self) -> np.ndarray:
        return self.result.tokens

    def to_json(self) -> dict:
        r = self.result
        return {
            "texts": self.texts,
            "tokens": r.tokens.tolist(),
            "backend": self.backend,
            "canvas_len": int(self.canvas.tokens.size),
            "steps_asked": self.sampler.steps,
            "steps": r.steps,
            "evaluations": r.evaluations,
            "deadline_hit": r.deadline_hit,
            "total_ms": r.total_s * 1e3,
            "network_ms": r.network_s * 1e3,
            "sampler_ms": r.sampler_s * 1e3,
            "step_ms": [{"network": s.network_ms, "sampler": s.sampler_ms, "evaluated": s.evaluated} for s in r.history],
            "sampler": self.sampler.__dict__,
        }

    def summary(self) -> str:
        r = self.result
        return (f"{self.backend}: {r.steps} steps, {r.evaluations} network evaluations, canvas {self.canvas.tokens.size}, "
                f"{r.total_s * 1e3:.0f} ms ({r.network_s * 1e3:.0f} ms network)" + (", deadline hit" if r.deadline_hit else ""))


def canvas_calls(tokens: np.ndarray, fixed: np.ndarray, special: SpecialIds, sampler: SamplerConfig,
                 on_step: Callable[[np.ndarray, Step], None] | None = None, soft_k: int = 0,
                 topk: int = 0, condition: list[int] | None = None, cond_len: int = 0) -> Generator[Call, dict, SampleResult]:
    """The sampler over a canvas, as graph calls: each step's canvas through the canvas graph. A self-conditioned
    model (`soft_k` > 0) also gets the previous call's top-`soft_k` (ids and probabilities) at the positions still
    masked, and none (zeros) on the first call and elsewhere: no extra network call. A conditional model (`condition`
    ids, not None) first runs its encoder graph once, and every canvas call takes the encoding.

    With `sampler.guidance`, a step whose weight is not 0 runs the canvas and its unguided twin in one call (2B rows)
    and samples from their mix (jetson_dllm.guidance; the mixed head's top-`topk`): the twin is the same canvas with
    the condition dropped (a conditional model) or with the prompt masked (LLaDA's unsupervised guidance). The
    callers check there is a condition or a prompt to guide toward."""
    B = len(tokens)
    memory = empty = {}
    if condition is not None:  # the encoder, once: the condition (and the empty one, for guidance's twin rows)
        out = yield encoder_call([condition, *([[]] if sampler.guidance else [])], cond_len)
        memory = {name: np.repeat(out[name][:1], B, axis=0) for name in CONDITION_INPUTS}
        empty = {name: np.repeat(out[name][1:], B, axis=0) for name in CONDITION_INPUTS} if sampler.guidance else {}
    steps = sample_steps(tokens, fixed, special, sampler, on_step)
    try:
        canvas = next(steps)
        soft = no_soft(canvas.shape, soft_k) if soft_k else {}
        calls = 0
        while True:
            weight = weight_at(sampler.guidance, sampler.guidance_schedule, calls, sampler.steps)  # 0: no guidance
            calls += 1
            if weight:
                twin = canvas if condition is not None else unconditional(canvas, fixed, special)
                both = {name: np.concatenate([value, value]) for name, value in soft.items()}  # the same soft inputs
                both |= {name: np.concatenate([memory[name], empty[name]]) for name in memory}
                out = yield Call("canvas", {"tokens": np.concatenate([canvas, twin]), **both}, ("logits",))
                heads = guided_head(out["logits"][:B], out["logits"][B:], weight, topk)
            else:
                out = yield Call("canvas", {"tokens": canvas, **soft, **memory})
                heads = (out["topk_logprobs"], out["topk_ids"], out.get(ENTROPY))
            previous = soft_feeds(heads[0], heads[1], soft_k) if soft_k else {}  # copied: the runner reuses its buffers
            canvas = steps.send(heads)
            soft = still_masked(previous, canvas == special.mask) if soft_k else {}
    except StopIteration as done:
        return done.value


def _check_guided(runner, sampler: SamplerConfig, condition: list[int] | None, tokens: np.ndarray, fixed: np.ndarray,
                  special: SpecialIds) -> None:
    """Guidance needs logits from the runner, and a condition (a conditional model) or a prompt to guide toward."""
    if not sampler.guidance:
        return
    check_runner(runner)
    if condition is not None:
        check_guidance(condition)
    else:
        check_prompt(fixed, tokens, special)


def generate(runner, tokenizer, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None,
             gap: int = 12, on_step=None, allow_empty: bool = False, condition: str | None = None) -> Generation:
    """Generate `num_samples` completions (or infillings) of `prompt` as one batch; a conditional model's under
    `condition` (none: the empty condition)."""
    sampler = (sampler or SamplerConfig()).validate()
    if num_samples <= 0:
        raise DllmError(f"--num-samples must be positive, got {num_samples}")
    ids = condition_ids(runner, condition)
    canvas = build_canvas(tokenizer, prompt, length, runner.canvas_lengths, gap=gap, allow_empty=allow_empty or ids is not None)
    rows = num_samples * (2 if sampler.guidance else 1)  # guidance: each sample's unguided twin in the same call
    plan = memory_plan(runner.cfg, runner.precision, rows, canvas.tokens.size, runner.topk, device=False)
    check_fits(plan["activations"] + plan["io"], f"{num_samples} samples of a {canvas.tokens.size}-token canvas",
               "generate fewer samples at once (-n) or a shorter --length")
    tokens, fixed = canvas.batch(num_samples)
    special = SpecialIds(mask=tokenizer.mask_id, eot=tokenizer.eot_id, pad=tokenizer.pad_id)
    _check_guided(runner, sampler, ids, tokens, fixed, special)
    result = drive(runner, canvas_calls(tokens, fixed, special, sampler, on_step, runner.cfg.soft_k, runner.topk, ids, runner.cfg.cond_len))
    return Generation([tokenizer.decode(row) for row in result.tokens], canvas, result, runner.name, sampler)


def complete(runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None, gap: int = 12,
             on_step=None, condition: str | None = None) -> Generation:
    return generate(runner, runner.tokenizer, prompt, length, num_samples, sampler, gap, on_step=on_step, condition=condition)


def serve_calls(runner, prompt: str, suffix: str | None, max_tokens: int, n: int, sampler: SamplerConfig, on_step=None) -> Served:
    """A server request: `max_tokens` after the prompt, or (with `suffix`) a gap of `max_tokens` between the two,
    on the smallest canvas that holds it; `on_step(canvas, Step)` sees every step. A conditional model's prompt is
    its condition: `max_tokens` generated under it."""
    tok = runner.tokenizer
    ids = condition_ids(runner, prompt) if runner.cfg.cond_len else None
    tokens, fixed = request_canvas(tok, "" if ids is not None else prompt, suffix, max_tokens, runner.canvas_lengths).batch(n)
    special = SpecialIds(mask=tok.mask_id, eot=tok.eot_id, pad=tok.pad_id)
    _check_guided(runner, sampler, ids, tokens, fixed, special)
    return Served(canvas_calls(tokens, fixed, special, sampler, on_step, runner.cfg.soft_k, runner.topk, ids, runner.cfg.cond_len), fixed)


def quality_length(runner, prompt_ids: list[int], tokens: int) -> int:
    """`--length` for bench's quality samples at a point of `tokens` canvas positions."""
    return tokens - 8


def bench_generate(runner, name: str, batch: int, tokens: int, sampler: SamplerConfig) -> BenchRun:
    """A fixed-length canvas of `tokens` positions, all masked, denoised in `sampler.steps` steps."""
    tok, canvas = runner.tokenizer, bench_canvas(runner, name, batch, tokens)
    r = drive(runner, canvas_calls(canvas, np.zeros_like(canvas, dtype=bool), SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id), sampler,
                                   soft_k=runner.cfg.soft_k, topk=runner.topk, condition=[] if runner.cfg.cond_len else None,
                                   cond_len=runner.cfg.cond_len))  # a conditional model: under the empty condition
    return BenchRun(r.total_s, [s.network_ms for s in r.history if s.evaluated], r.sampler_s, r.evaluations)
