"""Masked diffusion maths (MDLM, Sahoo et al. 2024): noise schedules, the forward process, the loss, the ELBO.

A clean canvas x (B, L) is corrupted to z_t by masking each token independently with probability 1 - alpha(t),
t in (0, 1]. The denoiser predicts x from z_t; the continuous-time negative ELBO is

    E_t [ w(t) * sum_{i masked} -log p(x_i | z_t) ],   w(t) = -alpha'(t) / (1 - alpha(t)),

an upper bound on the canvas NLL. For the log-linear schedule alpha(t) = 1 - t, w(t) = 1 / t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from jetson_dllm.errors import DllmError

SCHEDULES = ("loglinear", "cosine")
T_EPS = 1e-3  # t is kept in [T_EPS, 1]: w(t) ~ 1/t diverges at 0


def _check(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise DllmError(f"unknown noise schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")


def alpha(t: torch.Tensor, schedule: str = "loglinear") -> torch.Tensor:
    """Probability that a token is still clean at time t."""
    _check(schedule)
    if schedule == "loglinear":
        return 1.0 - t
    return torch.cos(0.5 * math.pi * t)


def loss_weight(t: torch.Tensor, schedule: str = "loglinear") -> torch.Tensor:
    """w(t) = -alpha'(t) / (1 - alpha(t)), the ELBO weight of a masked token's cross-entropy at time t."""
    _check(schedule)
    if schedule == "loglinear":
        return 1.0 / t
    half_pi = 0.5 * math.pi
    return half_pi * torch.sin(half_pi * t) / (1.0 - torch.cos(half_pi * t))


def complement_time(t: torch.Tensor, schedule: str = "loglinear") -> torch.Tensor:
    """The time t' whose masking probability is t's keeping probability (1 - alpha(t') = alpha(t)): the time of
    the complementary mask (every token masked in one copy is kept in the other), kept in [T_EPS, 1]."""
    _check(schedule)
    keep = alpha(t, schedule)
    if schedule == "loglinear":
        t2 = keep
    else:
        t2 = torch.arccos((1.0 - keep).clamp(-1.0, 1.0)) / (0.5 * math.pi)
    return t2.clamp(T_EPS, 1.0)


def sample_t(batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """Low-discrepancy (antithetic) times: one uniform offset, then evenly spaced over the batch. (B,)"""
    u = torch.rand((), generator=generator)
    t = (u + torch.arange(batch) / batch) % 1.0
    return (T_EPS + (1.0 - T_EPS) * t).to(device)


def mask_tokens(
    x: torch.Tensor,
    mask_prob: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z_t | x): mask each token of x (B, L) independently with its row's probability mask_prob (B,).

    `noise` (B, L) uniform draws may be given (data-parallel ranks slice one global draw); otherwise they
    come from `generator`. Returns z_t (B, L) and the boolean mask of corrupted positions (B, L).
    """
    if noise is None:
        noise = torch.rand(x.shape, generator=generator)
    masked = noise.to(x.device) < mask_prob.view(-1, 1).to(x.device)
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def mdlm_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    schedule: str = "loglinear",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MDLM objective for a batch: weighted cross-entropy on masked positions, per canvas position.

    `model(z, positions)` must return logits for the selected positions only (N, vocab), so the output
    head runs on masked positions alone. Unmasked positions contribute exactly zero.
    Returns the loss and detached statistics (masked count, unweighted CE, correct predictions).
    """
    z, masked = mask_tokens(x, 1.0 - alpha(t, schedule), mask_id, generator, noise)
    logits = model(z, masked)  # (N, V) for the N masked positions
    targets = x[masked]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    w = loss_weight(t, schedule).to(x.device).view(-1, 1).expand_as(x)[masked]
    loss = (w * ce).sum() / x.numel()
    stats = {
        "masked": masked.sum().detach(),
        "ce_sum": ce.sum().detach(),
        "correct": (logits.argmax(-1) == targets).sum().detach(),
    }
    return loss, stats


@torch.no_grad()
def nll_bound(
    model: torch.nn.Module,
    x: torch.Tensor,
    pad_id: int,
    mask_id: int,
    n_t: int = 8,
    schedule: str = "loglinear",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Monte-Carlo estimate of the negative ELBO of canvases x (B, L), with stratified t per canvas.

    Returns sums (so callers can pool batches): `nll` (nats, whole canvases, an upper bound on their NLL),
    `tokens` (non-padding positions: text tokens and end-of-text), and masked-prediction counts over
    non-padding positions (`masked`, `correct`).
    """
    B = x.shape[0]
    offsets = torch.rand(B, generator=generator)
    total = torch.zeros((), dtype=torch.float64)
    masked_n = correct = 0
    text = x != pad_id
    for j in range(n_t):
        t = T_EPS + (1.0 - T_EPS) * (j + offsets) / n_t  # one stratum per pass, every canvas covered
        z, masked = mask_tokens(x, 1.0 - alpha(t, schedule), mask_id, generator)
        logits = model(z, masked)
        ce = F.cross_entropy(logits.float(), x[masked], reduction="none")
        w = loss_weight(t, schedule).to(x.device).view(-1, 1).expand_as(x)[masked]
        total += (w * ce).sum().double().cpu() / n_t
        keep = text[masked]
        masked_n += int(keep.sum())
        correct += int(((logits.argmax(-1) == x[masked]) & keep).sum())
    return {"nll": float(total), "tokens": int(text.sum()), "masked": masked_n, "correct": correct}


@torch.no_grad()
def masked_accuracy(
    model: torch.nn.Module,
    x: torch.Tensor,
    ratio: float,
    pad_id: int,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """(correct, total) argmax predictions over non-padding positions masked at a fixed ratio."""
    z, masked = mask_tokens(x, torch.full((x.shape[0],), ratio), mask_id, generator)
    logits = model(z, masked)
    keep = (x != pad_id)[masked]
    return int(((logits.argmax(-1) == x[masked]) & keep).sum()), int(keep.sum())
