"""Sparse Distribution Diffusion (SDD), host side: the noise process, the denoising loss, the honest evaluation and
the canvas graph's export.

Every position holds k candidates (ids and probabilities, `soft_k` of them): at noise level t the clean one-hot
distribution is flattened toward uniform, p = alpha(t) * onehot + (1 - alpha(t)) / V with the cosine alpha(t) =
cos(pi t / 2), and the candidates carry its true values (not renormalised over k: at t = 1 each is 1/V). The ids are
the true token and k - 1 random ones, in a shuffled slot order (a slot's place cannot reveal the truth); the ids stay
fixed as the probabilities flatten. The input embedding also gets Gaussian noise, sin(pi t / 2) times the embedding
table's RMS. Half of the rows keep a random clean prefix (a prompt: its token, no candidates), which is not scored.
The network (time-conditioned through `t`) predicts the clean token at every other position; the loss is the plain
cross-entropy there. `--swap-ids` (the alternative to fixed ids): above t = 0.5 the truth is left out of a position's
candidates with probability 2t - 1, as sampling starts from random ids. There is no likelihood bound: the evaluation reports that loss, the accuracy where the input
does not already rank the truth first, and the accuracy at t = 1, never an NLL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from train_host.families import EvalContext, ExportOptions
from train_host.levels import level_tallies

FIXED_RATIO_ACCURACY = False
PREFIX_SHARE = 0.5  # rows trained with a clean prefix (a prompt)


def alpha(t: torch.Tensor) -> torch.Tensor:
    """The clean distribution's weight at noise level t (cosine)."""
    return torch.cos(0.5 * math.pi * t)


def noised(x: torch.Tensor, t: torch.Tensor, k: int, vocab: int, generator: torch.Generator | None, first_id: int = 3,
           truth: bool = True, swap: bool = False):
    """The noised inputs of clean canvases x (B, L) at levels t (B,): candidate ids (B, L, k) with the truth among
    them in a shuffled slot, and their probabilities (B, L, k). `truth=False`: the truth and its mass left out
    (k random candidates at (1 - alpha) / V each), an input that does not hold the answer. `swap`: so for each position
    with probability max(0, 2t - 1) (above t = 0.5, every one at t = 1: where sampling starts from random ids)."""
    B, L = x.shape
    ids = torch.randint(first_id, vocab, (B, L, k), generator=generator).to(x.device)
    slot = torch.randint(0, k, (B, L), generator=generator).to(x.device)
    a = alpha(t).to(x.device).view(B, 1, 1)
    probs = ((1.0 - a) / vocab).expand(B, L, k).clone()
    if not truth:
        return ids, probs
    keep = torch.ones(B, L, dtype=torch.bool, device=x.device)
    if swap:
        keep = torch.rand((B, L), generator=generator).to(x.device) >= (2.0 * t.to(x.device) - 1.0).clamp(0.0, 1.0).view(B, 1)
    ids = torch.where(keep.unsqueeze(-1), ids.scatter(2, slot.unsqueeze(-1), x.unsqueeze(-1)), ids)
    probs.scatter_add_(2, slot.unsqueeze(-1), a.expand(B, L, 1) * keep.unsqueeze(-1))
    return ids, probs


def _inputs(model, x: torch.Tensor, t: torch.Tensor, generator, pad_id: int | None, train: bool, truth: bool = True, swap: bool = False):
    """The model's inputs for clean canvases: tokens (mask where generated, the prefix's tokens), soft inputs, the
    Gaussian embedding noise (training only), and the scored positions (generated, not padding)."""
    cfg = model.cfg
    B, L = x.shape
    ids, probs = noised(x, t, cfg.soft_k, cfg.vocab_size, generator, truth=truth, swap=swap)
    tokens, given, scored = clean_prefix(x, cfg.mask_id, pad_id, generator)
    probs = probs * (~given).unsqueeze(-1)
    noise = None
    if train:
        rms = model.tok_emb.weight.detach().pow(2).mean().sqrt()
        std = torch.sin(0.5 * math.pi * t).to(x.device).view(B, 1, 1) * rms
        noise = torch.randn((B, L, cfg.d_model), generator=generator).to(x.device) * std * (~given).unsqueeze(-1)
    return tokens, (ids, probs), noise, scored


def clean_prefix(x: torch.Tensor, mask_id: int, pad_id: int | None, generator):
    """A clean prefix (a prompt) on PREFIX_SHARE of the rows of canvases x (B, L), up to half the canvas: the tokens
    (the prefix's, the mask elsewhere), the given positions (B, L), and the scored ones (the rest; not padding when
    `pad_id`). SDD and continuous diffusion train on prefixes this way."""
    B, L = x.shape
    prefix = (torch.rand(B, generator=generator) < PREFIX_SHARE).to(x.device) * (torch.rand(B, generator=generator).to(x.device) * L / 2).long()
    given = torch.arange(L, device=x.device).unsqueeze(0) < prefix.unsqueeze(1)
    scored = ~given if pad_id is None else ~given & (x != pad_id)
    return torch.where(given, x, torch.full_like(x, mask_id)), given, scored


def train_loss(model, x, run, t, noise, generator):
    tokens, soft, emb_noise, scored = _inputs(model_core(model), x, t, generator, None, train=True, swap=run.tc.swap_ids)
    logits = model(tokens, scored, soft=soft, t=t.to(x.device), noise=emb_noise)
    targets = x[scored]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = ce.sum() / x.numel()
    return loss, {"masked": scored.sum().detach(), "ce_sum": ce.sum().detach(), "correct": (logits.argmax(-1) == targets).sum().detach()}


def model_core(model):
    """The Denoiser behind a data-parallel or compiled wrapper (for its embedding table and config)."""
    core = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    return getattr(core, "_orig_mod", core)


@torch.no_grad()
def nll_batch(model, x, ev: EvalContext) -> dict:
    """No NLL. At stratified noise levels: the denoising loss (`loss`, summed) and accuracy over the scored positions
    (inflated: below t = 1 the input ranks the truth first, so copying it scores); the same levels with the truth left
    out of the candidates (`val_acc_hidden`: the input does not hold the answer); and at t = 1 (`val_acc_t1`: every
    candidate at 1/V, as sampling starts)."""
    def logits_at(kind: str, level: torch.Tensor):
        tokens, soft, _, scored = _inputs(model, x, level, ev.generator, ev.pad_id, train=False, truth=kind != "hidden")
        return model(tokens, scored, soft=soft, t=level.to(x.device)), scored

    return level_tallies(x, ev, (("plain", False), ("hidden", False), ("t1", True)), logits_at)


def eval_extra(run) -> dict:
    return {}


def export(model, tokenizer, ckpt: dict, out_dir, options: ExportOptions):
    from train_host.canvas_export import export_canvas_bundle

    return export_canvas_bundle(model, tokenizer, ckpt, out_dir, options)
