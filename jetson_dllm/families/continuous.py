"""Continuous embedding diffusion, at run time: the canvas of noised latents denoised from level 1 to 0, one
canvas-graph call per step (train_host/families/continuous.py describes the model and its noise).

The loop: every generated position starts as Gaussian noise (B, T, latent_dim); each step the graph returns the
expected clean latent x0 (sum_v p_v e_v over the whole vocabulary: score interpolation) and the step moves to the
next, lower level with DDIM's update, x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps_hat + sigma z, where
eps_hat = (x - sqrt(abar) x0) / sqrt(1 - abar) and sigma = eta * sqrt((1 - abar') / (1 - abar) * (1 - abar / abar')):
`eta` 0 is DDIM (deterministic), 1 is DDPM's ancestral step. `clamp` steps with the latent of each position's top-1
token instead (Diffusion-LM's clamping). Rounding: after the last step each position takes the head's top-1 (the
temperature samples it, as every family's final pick). The prompt is a clean prefix (its tokens; the graph puts their
clean latents in); the model was trained on prefixes, so gaps to fill are refused.
"""

from __future__ import annotations

import math
from collections.abc import Generator

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.families.common import (
    BenchRun,
    Served,
    bench_canvas,
    no_soft,
    refuse_gaps,
    soft_feeds,
    special_ids,
    still_masked,
)
from jetson_dllm.families.levels import level_calls
from jetson_dllm.families.mdlm import Generation, quality_length  # noqa: F401 (part of the family interface: the canvas's)
from jetson_dllm.prompt import build_canvas, request_canvas
from jetson_dllm.runners.calls import Call, drive
from jetson_dllm.sampler import SamplerConfig, SampleResult, SpecialIds


def abar(t, shift: float = 1.0):
    """The clean latent's share of the variance at level t (a float or an array), as training noised it: the cosine
    schedule, its signal-to-noise ratio divided by shift^2 (the model's `noise_shift`; 1: the cosine itself)."""
    c, s = np.cos(0.5 * np.pi * np.asarray(t, np.float64)) ** 2, np.sin(0.5 * np.pi * np.asarray(t, np.float64)) ** 2
    return c / (c + shift * shift * s)


def ddim_step(x: np.ndarray, x0: np.ndarray, t: float, t_next: float, eta: float, rng: np.random.Generator,
              shift: float = 1.0) -> np.ndarray:
    """x at level t -> level t_next < t, given the predicted clean latent x0 (DDIM; eta 1 = DDPM's posterior)."""
    a, a_next = float(abar(t, shift)), float(abar(t_next, shift))
    eps = (x - math.sqrt(a) * x0) / math.sqrt(max(1.0 - a, 1e-12))
    sigma = 0.0
    if eta > 0 and a_next < 1.0:
        sigma = eta * math.sqrt((1.0 - a_next) / max(1.0 - a, 1e-12) * max(1.0 - a / a_next, 0.0))
    out = math.sqrt(a_next) * x0 + math.sqrt(max(1.0 - a_next - sigma**2, 0.0)) * eps
    if sigma > 0:
        out = out + sigma * rng.standard_normal(x.shape)
    return out.astype(np.float32)


class _Latents:
    """Continuous diffusion's walk (families.levels): the noised latents, moved one level down each step by DDIM /
    DDPM toward the step's expected clean latent (or the top-1's: clamping); a self-conditioned model's previous
    top-k where text is generated."""

    def __init__(self, free: np.ndarray, sampler: SamplerConfig, latent_dim: int, soft_k: int, shift: float, rng: np.random.Generator):
        self.free, self.sampler, self.soft_k, self.shift, self.rng = free, sampler, soft_k, shift, rng
        self.x = rng.standard_normal((*free.shape, latent_dim)).astype(np.float32)
        self.soft = no_soft(free.shape, soft_k) if soft_k else {}

    def feeds(self, level: float) -> dict[str, np.ndarray]:
        return {"x": self.x, "t": np.full(len(self.x), level, np.float32), **self.soft}

    def advance(self, out: dict, head: tuple[np.ndarray, np.ndarray], level: float, below: float) -> None:
        s = self.sampler
        self.x = ddim_step(self.x, out["x0_top1" if s.clamp else "x0"], level, below, s.eta, self.rng, self.shift)
        if self.soft_k:  # the model's own prediction (not the sampled or banned view of it), where text is generated
            self.soft = still_masked(soft_feeds(out["topk_logprobs"], out["topk_ids"], self.soft_k), self.free)


def continuous_calls(tokens: np.ndarray, fixed: np.ndarray, special: SpecialIds, sampler: SamplerConfig, latent_dim: int,
                     on_step=None, soft_k: int = 0, shift: float = 1.0) -> Generator[Call, dict, SampleResult]:
    """The loop as canvas-graph calls over `tokens` (B, T) whose `fixed` positions are the prompt; returns each
    generated position's final top-1 (the text after the first end-of-text becomes padding). A self-conditioned
    model (`soft_k`) gets each step the previous step's top-k at the generated positions (none at the first).
    `shift`: the model's schedule shift (`noise_shift`)."""
    rng = np.random.default_rng(sampler.seed)
    walk = _Latents(~fixed, sampler, latent_dim, soft_k, shift, rng)
    return (yield from level_calls(tokens, fixed, special, sampler, rng, walk, on_step))


def _refuse_gaps(prompt: str, suffix: str | None = None) -> None:
    refuse_gaps("continuous-diffusion", prompt, suffix)


def complete(runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None, gap: int = 12,
             on_step=None, allow_empty: bool = False) -> Generation:
    sampler = (sampler or SamplerConfig()).validate()
    _refuse_gaps(prompt)
    if num_samples <= 0:
        raise DllmError(f"--num-samples must be positive, got {num_samples}")
    tok = runner.tokenizer
    canvas = build_canvas(tok, prompt, length, runner.canvas_lengths, gap=gap, allow_empty=allow_empty)
    tokens, fixed = canvas.batch(num_samples)
    result = drive(runner, continuous_calls(tokens, fixed, special_ids(tok), sampler, runner.cfg.latent_dim, on_step, runner.cfg.soft_k,
                                            runner.cfg.noise_shift))
    return Generation([tok.decode(row) for row in result.tokens], canvas, result, runner.name, sampler)


def generate(runner, tokenizer, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None,
             gap: int = 12, on_step=None, allow_empty: bool = False) -> Generation:
    return complete(runner, prompt, length, num_samples, sampler, gap, on_step, allow_empty)


def serve_calls(runner, prompt: str, suffix: str | None, max_tokens: int, n: int, sampler: SamplerConfig, on_step=None) -> Served:
    """A server request: `max_tokens` after the prompt on the smallest canvas that holds them (no suffix)."""
    _refuse_gaps(prompt, suffix)
    tok = runner.tokenizer
    tokens, fixed = request_canvas(tok, prompt, None, max_tokens, runner.canvas_lengths).batch(n)
    return Served(continuous_calls(tokens, fixed, special_ids(tok), sampler, runner.cfg.latent_dim, on_step, runner.cfg.soft_k,
                                   runner.cfg.noise_shift), fixed)


def bench_generate(runner, name: str, batch: int, tokens: int, sampler: SamplerConfig) -> BenchRun:
    """A canvas of `tokens` positions, all generated, in `sampler.steps` calls."""
    canvas = bench_canvas(runner, name, batch, tokens)
    r = drive(runner, continuous_calls(canvas, np.zeros_like(canvas, dtype=bool), special_ids(runner.tokenizer), sampler, runner.cfg.latent_dim,
                                        soft_k=runner.cfg.soft_k, shift=runner.cfg.noise_shift))
    return BenchRun(r.total_s, [s.network_ms for s in r.history], r.sampler_s, r.evaluations)


def probe_feeds(reference, clean: np.ndarray, z: np.ndarray, mask_id: int, pad_id: int, cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs that check a continuous graph (export parity, INT8 calibration) for canvases `z` masked from
    `clean`: each row at the noise level of its masked share, its masked positions' latents what the sampler would
    hold there: the reference's own clean-latent guess from pure noise (a first call at t = 1), noised to that level;
    a self-conditioned model's previous prediction: that first call's top-k."""
    rng = np.random.default_rng(seed)
    B, T = z.shape
    t = ((z == mask_id).sum(1) / np.maximum((clean != pad_id).sum(1), 1)).clip(0.0, 1.0).astype(np.float32)
    noise = rng.standard_normal((B, T, cfg.latent_dim)).astype(np.float32)
    first = reference.run("canvas", {"tokens": z, "x": noise, "t": np.ones(B, np.float32), **(no_soft((B, T), cfg.soft_k) if cfg.soft_k else {})},
                          outputs=("x0", "topk_logprobs", "topk_ids"))
    a = abar(t, cfg.noise_shift)[:, None, None]
    x = np.sqrt(a) * first["x0"] + np.sqrt(1.0 - a) * rng.standard_normal(first["x0"].shape)
    soft = still_masked(soft_feeds(first["topk_logprobs"], first["topk_ids"], cfg.soft_k), z == mask_id) if cfg.soft_k else {}
    return {"x": x.astype(np.float32), "t": t, **soft}  # (self-conditioned: that first guess is the previous prediction)
