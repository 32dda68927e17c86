"""The loop both noise-level families share at run time (SDD, continuous diffusion): from noise level 1 to 0, one
canvas-graph call per step; each step the family's walk feeds its state and moves it one level down, the last step
picks each generated position's token (sampled under the temperature, top-k and top-p, or its top-1)."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Protocol

import numpy as np

from jetson_dllm.families.common import allowed_head, ended_rows
from jetson_dllm.runners.calls import Call
from jetson_dllm.sampler import SamplerConfig, SampleResult, SpecialIds, Step, candidate_distribution


class Walk(Protocol):
    """A family's state between levels: what a step's call takes beyond the canvas, and the move down a level."""

    def feeds(self, level: float) -> dict[str, np.ndarray]: ...

    def advance(self, out: dict[str, np.ndarray], head: tuple[np.ndarray, np.ndarray], level: float, below: float) -> None: ...


def level_calls(tokens: np.ndarray, fixed: np.ndarray, special: SpecialIds, sampler: SamplerConfig, rng: np.random.Generator,
                walk: Walk, on_step=None) -> Generator[Call, dict, SampleResult]:
    """`sampler.steps` canvas calls over `tokens` (B, T) whose `fixed` positions are the prompt; the result holds each
    generated position's final pick (the text after the first end-of-text becomes padding)."""
    B, T = tokens.shape
    free = ~fixed
    canvas = np.where(free, special.mask, tokens).astype(np.int32)
    top1 = canvas.copy()
    t0, network_s, history = time.perf_counter(), 0.0, []
    for s in range(sampler.steps):
        level, below = 1.0 - s / sampler.steps, 1.0 - (s + 1) / sampler.steps
        c0 = time.perf_counter()
        out = yield Call("canvas", {"tokens": canvas, **walk.feeds(level)})
        net = time.perf_counter() - c0
        network_s += net
        all_lp, all_ids = allowed_head(out["topk_logprobs"], out["topk_ids"], special, sampler.allow_end)
        if s == sampler.steps - 1:  # the last prediction's pick
            logits = candidate_distribution(all_lp, sampler.temperature, sampler.top_k, sampler.top_p)
            gumbel = -np.log(-np.log(rng.random(logits.shape) + 1e-20) + 1e-20)
            pick = np.argmax(logits if sampler.temperature == 0 else logits + gumbel, -1)
            chosen = np.take_along_axis(all_ids, pick[..., None], -1)[..., 0]
        else:
            chosen = all_ids[..., 0]
            walk.advance(out, (all_lp, all_ids), level, below)
        new = np.where(free, chosen, tokens).astype(np.int32)
        step = Step(s + 1, True, (new != top1) & free, net * 1e3, 0.0, np.where(free, np.exp(all_lp[..., 0]), 1.0))
        top1 = new
        history.append(step)
        if on_step is not None:
            on_step(top1, step)
    result = ended_rows(top1, free, special)
    return SampleResult(result, sampler.steps, sampler.steps, False, network_s, time.perf_counter() - t0 - network_s, history)
