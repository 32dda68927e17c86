"""Continuous embedding diffusion, host side: Gaussian noise on L2-normalised token latents, the cross-entropy
objective, its evaluation and the canvas graph's export (train_host/continuous_model.py is the network).

Noise (variance preserving, cosine): x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps, abar(t) = cos^2(pi t / 2) (or,
with a schedule shift s, cos^2 / (cos^2 + s^2 sin^2): the signal-to-noise ratio divided by s^2) with x0 the clean latents (norm sqrt(latent_dim)); at t = 1 pure noise. The network predicts p(x0 | x_t) over the
vocabulary; the loss is the cross-entropy at every generated position (CDCD's score interpolation: the samplers
step with the expected latent). Gradients reach the latent table through x0 (the table is learned end to end, its
rows kept normalised). Half of the rows keep a random clean prefix (a prompt: its tokens, no noise), not scored.
No likelihood: Plaid's variational bound is not built here, so `eval` reports the denoising loss and the accuracy
of the top-1 at stratified levels and at t = 1 (where sampling starts), never an NLL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train_host.families import EvalContext, ExportOptions
from train_host.families.sdd import clean_prefix, model_core
from train_host.levels import level_tallies
from train_host.self_cond import conditioned

FIXED_RATIO_ACCURACY = False


def abar(t: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """The clean latent's share of the variance at level t: 1 at t = 0, 0 at t = 1; the cosine schedule with its
    signal-to-noise ratio divided by shift^2 (the model's `noise_shift`; 1: the cosine itself)."""
    c, s = torch.cos(0.5 * math.pi * t).pow(2), torch.sin(0.5 * math.pi * t).pow(2)
    return c / (c + shift * shift * s)


def noised(model, x: torch.Tensor, t: torch.Tensor, generator, pad_id: int | None):
    """Inputs for clean canvases x (B, L) at levels t (B,): tokens (the mask where generated, a prefix's tokens where
    given), noised latents (B, L, latent_dim), and the scored positions (generated; not padding when `pad_id`)."""
    x0 = model.latents()[x]
    eps = torch.randn(x0.shape, generator=generator).to(x.device)
    a = abar(t.float(), model.cfg.noise_shift).to(x.device).view(-1, 1, 1)
    xt = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
    tokens, _, scored = clean_prefix(x, model.cfg.mask_id, pad_id, generator)
    return tokens, xt, scored


def train_loss(model, x, run, t, noise, generator):
    """The cross-entropy at the generated positions; a self-conditioned model's (soft inputs) through
    `SelfConditioned` at the run's rate (a first pass's top-k, its latent projected in)."""
    tokens, xt, scored = noised(model_core(model), x, t, generator, None)
    predict = conditioned(model, run.cfg.soft_k, run.tc.self_cond_rate, generator)
    logits = predict(tokens, scored, x=xt, t=t.to(x.device))
    targets = x[scored]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return ce.sum() / x.numel(), {"masked": scored.sum().detach(), "ce_sum": ce.sum().detach(),
                                  "correct": (logits.argmax(-1) == targets).sum().detach()}


@torch.no_grad()
def nll_batch(model, x, ev: EvalContext) -> dict:
    """No NLL. At stratified noise levels: the denoising loss (`loss`, summed) and the top-1 accuracy over the scored
    positions; and at t = 1 (`val_acc_t1`: pure noise, where sampling starts). Self-conditioned: both passes."""
    def logits_at(kind: str, level: torch.Tensor):
        tokens, xt, scored = noised(model, x, level, ev.generator, ev.pad_id)
        return conditioned(model, model.cfg.soft_k)(tokens, scored, x=xt, t=level.to(x.device)), scored

    return level_tallies(x, ev, (("plain", False), ("t1", True)), logits_at)


def eval_extra(run) -> dict:
    return {}


def export(model, tokenizer, ckpt: dict, out_dir, options: ExportOptions):
    from train_host.canvas_export import export_canvas_bundle

    return export_canvas_bundle(model, tokenizer, ckpt, out_dir, options)
