"""Sparse Distribution Diffusion (SDD), at run time: every position holds k weighted candidates, denoised from noise
level 1 to 0, one canvas-graph call per step (train_host/families/sdd.py describes the model and its noise).

The loop (the study's deterministic, DDIM-style one): every generated position starts as k random candidates at 1/V
each (the input at t = 1); each step the graph's top-k (ids and their true probabilities) become the next step's
candidates, at the next, lower level; after the last step each position takes its top-1. Two things may be changed,
both measured in benchmarks/sdd.py: `renoise` flattens the fed-back probabilities toward 1/V to the next level's
noise (p' = alpha(t') p + (1 - alpha(t')) / V) instead of feeding the prediction as it is, and the temperature (of
`dllm run`) reshapes the fed-back probabilities (p^(1/T), their mass kept) and samples the final pick. The prompt is a
clean prefix (its tokens, no candidates); SDD is trained on prefixes only, so gaps to fill (infilling) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.families.common import BenchRun, Served, bench_canvas, refuse_gaps, special_ids
from jetson_dllm.families.levels import level_calls
from jetson_dllm.families.mdlm import Generation, quality_length  # noqa: F401 (part of the family interface: the canvas's)
from jetson_dllm.prompt import build_canvas, request_canvas
from jetson_dllm.runners.calls import Call, drive
from jetson_dllm.sampler import SamplerConfig, SampleResult, SpecialIds

RENOISE = True  # the default loop: the deterministic one falls into one repeated word (docs/soft-inputs.md)
FIRST_ID = 3  # candidate ids start past the special tokens (pad, end-of-text, mask)


def alpha(t: float) -> float:
    """The clean distribution's weight at noise level t (cosine), as training noised it."""
    return math.cos(0.5 * math.pi * t)


class _Candidates:
    """SDD's walk (families.levels): every generated position's k weighted candidates, fed at each level; the next
    level's are the step's top-k (reshaped by the temperature, flattened toward 1/V by `renoise`)."""

    def __init__(self, free: np.ndarray, sampler: SamplerConfig, k: int, vocab: int, renoise: bool, rng: np.random.Generator):
        B, T = free.shape
        self.free, self.sampler, self.k, self.vocab, self.renoise = free, sampler, k, vocab, renoise
        self.ids = rng.integers(FIRST_ID, vocab, (B, T, k)).astype(np.int32)
        self.probs = np.broadcast_to(np.where(free[..., None], 1.0 / vocab, 0.0), (B, T, k)).astype(np.float32)

    def feeds(self, level: float) -> dict[str, np.ndarray]:
        return {"soft_ids": self.ids, "soft_probs": self.probs, "t": np.full(len(self.ids), level, np.float32)}

    def advance(self, out: dict, head: tuple[np.ndarray, np.ndarray], level: float, below: float) -> None:
        lp, got = head[0][..., : self.k].astype(np.float64), head[1][..., : self.k]
        p, temperature = np.exp(lp), self.sampler.temperature
        if temperature > 0 and temperature != 1.0:  # reshaped, the k candidates' mass kept
            q = np.exp((lp - lp[..., :1]) / temperature)
            p = q / q.sum(-1, keepdims=True) * p.sum(-1, keepdims=True)
        if self.renoise:
            a = alpha(below)
            p = a * p + (1.0 - a) / self.vocab
        self.ids = np.where(self.free[..., None], got, 0).astype(np.int32)
        self.probs = np.where(self.free[..., None] & np.isfinite(lp), p, 0.0).astype(np.float32)


def sdd_calls(tokens: np.ndarray, fixed: np.ndarray, special: SpecialIds, sampler: SamplerConfig, k: int, vocab: int,
              renoise: bool = RENOISE, on_step=None) -> Generator[Call, dict, SampleResult]:
    """The SDD loop as canvas-graph calls over `tokens` (B, T) whose `fixed` positions are the prompt; returns the
    result with each generated position's final top-1 (the text after the first end-of-text becomes padding)."""
    rng = np.random.default_rng(sampler.seed)
    walk = _Candidates(~fixed, sampler, k, vocab, renoise, rng)
    return (yield from level_calls(tokens, fixed, special, sampler, rng, walk, on_step))


def _refuse_gaps(prompt: str, suffix: str | None = None) -> None:
    refuse_gaps("sparse-distribution (SDD)", prompt, suffix)


def generate(runner, tokenizer, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None,
             gap: int = 12, on_step=None, allow_empty: bool = False, renoise: bool = RENOISE) -> Generation:
    sampler = (sampler or SamplerConfig()).validate()
    _refuse_gaps(prompt)
    if num_samples <= 0:
        raise DllmError(f"--num-samples must be positive, got {num_samples}")
    canvas = build_canvas(tokenizer, prompt, length, runner.canvas_lengths, gap=gap, allow_empty=allow_empty)
    tokens, fixed = canvas.batch(num_samples)
    cfg = runner.cfg
    result = drive(runner, sdd_calls(tokens, fixed, special_ids(tokenizer), sampler, cfg.soft_k, cfg.vocab_size, renoise, on_step))
    return Generation([tokenizer.decode(row) for row in result.tokens], canvas, result, runner.name, sampler)


def complete(runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None, gap: int = 12,
             on_step=None) -> Generation:
    return generate(runner, runner.tokenizer, prompt, length, num_samples, sampler, gap, on_step=on_step)


def serve_calls(runner, prompt: str, suffix: str | None, max_tokens: int, n: int, sampler: SamplerConfig, on_step=None) -> Served:
    """A server request: `max_tokens` after the prompt on the smallest canvas that holds them (no suffix: SDD does
    not fill gaps)."""
    _refuse_gaps(prompt, suffix)
    tok = runner.tokenizer
    tokens, fixed = request_canvas(tok, prompt, None, max_tokens, runner.canvas_lengths).batch(n)
    return Served(sdd_calls(tokens, fixed, special_ids(tok), sampler, runner.cfg.soft_k, runner.cfg.vocab_size, on_step=on_step), fixed)


def bench_generate(runner, name: str, batch: int, tokens: int, sampler: SamplerConfig) -> BenchRun:
    """A canvas of `tokens` positions, all generated, in `sampler.steps` calls."""
    tok, canvas = runner.tokenizer, bench_canvas(runner, name, batch, tokens)
    r = drive(runner, sdd_calls(canvas, np.zeros_like(canvas, dtype=bool), special_ids(tok), sampler, runner.cfg.soft_k, runner.cfg.vocab_size))
    return BenchRun(r.total_s, [s.network_ms for s in r.history], r.sampler_s, r.evaluations)


def probe_feeds(reference, clean: np.ndarray, z: np.ndarray, mask_id: int, pad_id: int, cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs that check an SDD graph (export parity, INT8 calibration and its accuracy report) for canvases
    `z` masked from `clean`: each masked position holds the truth and k - 1 random candidates (shuffled) at the noise
    level of its row's masked share of its text (padding is never masked), the rest are given (their tokens, no candidates), as training noised them."""
    rng = np.random.default_rng(seed)
    B, T = z.shape
    k, vocab = cfg.soft_k, cfg.vocab_size
    masked = z == mask_id
    t = (masked.sum(1) / np.maximum((clean != pad_id).sum(1), 1)).clip(0.0, 1.0).astype(np.float32)
    ids = rng.integers(FIRST_ID, vocab, (B, T, k))
    slot = rng.integers(0, k, (B, T))
    np.put_along_axis(ids, slot[..., None], clean[..., None], -1)
    a = np.cos(0.5 * np.pi * t)[:, None, None]
    probs = np.broadcast_to((1.0 - a) / vocab, (B, T, k)).copy()
    np.put_along_axis(probs, slot[..., None], np.take_along_axis(probs, slot[..., None], -1) + a, -1)
    return {"soft_ids": np.where(masked[..., None], ids, 0).astype(np.int32),
            "soft_probs": np.where(masked[..., None], probs, 0.0).astype(np.float32), "t": t}
