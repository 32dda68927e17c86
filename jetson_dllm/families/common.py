"""What the families' runtime modules share: the bench measurement of one generation, and the checks of a model
that writes left to right into a cache."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.prompt import PLACEHOLDER
from jetson_dllm.sampler import SpecialIds


@dataclass
class Generated:
    """What a cached family's loop generated: the texts, the loop's result, the runner's name. The result's numbers
    (tokens, new_tokens, evaluations...) read as the generation's own."""

    texts: list[str]
    result: object
    backend: str

    def __getattr__(self, name: str):
        if name == "result":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.result, name)


@dataclass
class Served:
    """One request's generation as the server drives it: the family's loop as graph calls (`calls`, interleaved with
    other requests' by the batcher; its result's `.tokens` are the (n, T) rows), and which of those positions the
    request did not generate (`fixed`, (n, T): the prompt, an infilling suffix)."""

    calls: Generator
    fixed: np.ndarray


def no_soft(shape: tuple[int, int], k: int) -> dict[str, np.ndarray]:
    """Soft inputs that add nothing (every probability 0): a self-conditioned model's first step."""
    return {"soft_ids": np.zeros((*shape, k), dtype=np.int32), "soft_probs": np.zeros((*shape, k), dtype=np.float32)}


def soft_feeds(logprobs: np.ndarray, ids: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """A call's top-k candidates (log-probabilities and ids, (B, T, K) with K >= k) as soft inputs: ids and true
    probabilities, copied (a runner's output buffers are reused by its next call)."""
    return {"soft_ids": ids[..., :k].astype(np.int32), "soft_probs": np.exp(logprobs[..., :k]).astype(np.float32)}


def still_masked(soft: dict[str, np.ndarray], masked: np.ndarray) -> dict[str, np.ndarray]:
    """Soft inputs kept at the positions still masked (B, T) and none elsewhere: what a self-conditioned model's next
    step is fed (the previous step's prediction of the tokens it has yet to choose)."""
    return {"soft_ids": np.where(masked[..., None], soft["soft_ids"], 0).astype(np.int32),
            "soft_probs": np.where(masked[..., None], soft["soft_probs"], 0.0).astype(np.float32)}


def left_to_right_request(runner, ids: list[int], max_tokens: int, n: int, reserved: int = 0) -> np.ndarray:
    """A left-to-right request's `fixed` (its prompt's positions, then the `max_tokens` it generates), once its
    context is checked: the prompt, `reserved` positions of the loop's own (a shifted model's start token) and
    `max_tokens` must fit. The server's wording: max_tokens, not --length."""
    room = runner.cfg.canvas_len - len(ids) - reserved
    if room <= 0 or max_tokens > room:
        raise DllmError(f"the prompt is {len(ids)} tokens; this model's context holds {runner.cfg.canvas_len}, room for {max(room, 0)} more")
    fixed = np.zeros((n, len(ids) + max_tokens), dtype=bool)
    fixed[:, : len(ids)] = True
    return fixed


@dataclass
class BenchRun:
    """One timed generation as `dllm bench` reports it, whatever the family."""

    seconds: float
    call_ms: list[float]  # each denoising / decoding network call's time
    sampler_s: float  # the time between network calls (choosing tokens)
    evaluations: int
    extra: dict = field(default_factory=dict)  # family columns (cache passes, folded commits, commit times)


def bench_canvas(runner, name: str, batch: int, tokens: int) -> np.ndarray:
    """A whole-canvas family's bench input: `batch` canvases of `tokens` positions, all to generate (one of the
    model's canvas shapes)."""
    if tokens not in runner.canvas_lengths:
        raise DllmError(f"canvas {tokens} is not one of {name}'s shapes ({', '.join(map(str, runner.canvas_lengths))})")
    return np.full((batch, tokens), runner.tokenizer.mask_id, dtype=np.int32)


def left_to_right_ids(runner, prompt: str, what: str) -> list[int]:
    """The prompt's ids for a model that writes left to right (no gaps to fill)."""
    if PLACEHOLDER.search(prompt):
        raise DllmError(f"{what} writes left to right and cannot fill gaps; use a masked-diffusion (MDLM) model for infilling")
    if runner.tokenizer.fewest_tokens(prompt) >= runner.cfg.canvas_len:  # refused before tokenizing (tokenizer.fewest_tokens)
        raise DllmError(f"the prompt is at least {runner.tokenizer.fewest_tokens(prompt)} tokens ({len(prompt):,} characters); "
                        f"the context holds {runner.cfg.canvas_len}")
    return runner.tokenizer.encode(prompt)


def check_context(runner, ids: list[int], length: int) -> None:
    """A left-to-right model's cache (its context) holds the prompt and the tokens it generates, no more."""
    limit = runner.cfg.canvas_len
    if len(ids) + length > limit or len(ids) >= limit:
        raise DllmError(f"the prompt ({len(ids)} tokens) and --length {length} need {len(ids) + length} positions; "
                        f"this model's context (its cache) holds {limit}: shorten the prompt or --length")


def quality_length(runner, prompt_ids: list[int], tokens: int) -> int:
    """A cached family's `--length` for bench's quality samples: the point's tokens, as the context allows."""
    return min(tokens, runner.cfg.canvas_len - len(prompt_ids))


def check_bench_length(runner, name: str, tokens: int) -> None:
    """A cached model generates at most its context."""
    if tokens > runner.cfg.canvas_len:
        raise DllmError(f"{name} generates at most {runner.cfg.canvas_len} tokens (its cache); asked for {tokens}")


def allowed_head(logprobs: np.ndarray, ids: np.ndarray, special: SpecialIds, allow_end: bool) -> tuple[np.ndarray, np.ndarray]:
    """The head's top-K without padding (the likeliest token where the model knows nothing, as much of a canvas is)
    and, when ends are not allowed, the end-of-text: still sorted, banned ones last at -inf (their probability is not
    given to the others: the values stay the model's)."""
    banned = (ids == special.pad) | (ids == special.mask) | ((ids == special.eot) & (not allow_end))
    lp = np.where(banned, -np.inf, logprobs)
    order = np.argsort(-lp, axis=-1, kind="stable")
    return np.take_along_axis(lp, order, -1), np.take_along_axis(ids, order, -1)


def ended_rows(tokens: np.ndarray, free: np.ndarray, special: SpecialIds) -> np.ndarray:
    """Padding after each row's first generated end-of-text (or padding); padding never starts mid-text otherwise."""
    out = tokens.copy()
    stop = (free & ((tokens == special.eot) | (tokens == special.pad))).cumsum(1) > 0
    after = np.concatenate([np.zeros_like(stop[:, :1]), stop[:, :-1]], axis=1)
    out[after & free] = special.pad
    return out


def refuse_gaps(title: str, prompt: str, suffix: str | None = None) -> None:
    """A family trained on prefixes only (SDD, continuous diffusion) continues a prompt: gaps to fill are refused."""
    if PLACEHOLDER.search(prompt) or suffix:
        raise DllmError(f"a {title} model continues a prompt; it was not trained to fill gaps (infilling): "
                        "use a masked-diffusion (MDLM) model for that")


def special_ids(tok) -> SpecialIds:
    """The mask, end-of-text and padding ids of a tokenizer, as the loops take them."""
    return SpecialIds(mask=tok.mask_id, eot=tok.eot_id, pad=tok.pad_id)
