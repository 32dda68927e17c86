"""The optimizer's side of training: which parameters decay, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


WARMUP_MAX_SHARE = 0.1  # warm-up never takes more than this share of the run


def lr_at(tc, step: int, progress: float) -> float:
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio as `progress` (the share of the run done) goes 0 -> 1.

    Warm-up and decay follow the same clock: warm-up ends after `warmup` steps or a tenth of the run (by
    `progress`, which follows the clock under --time-budget), whichever comes first. So a slow machine that
    manages only a few dozen steps in its budget still reaches the peak rate early, rather than decaying before it
    ever warmed up; a fast one warms up over `warmup` steps as without a budget."""
    warm = min(1.0, max((step + 1) / max(1, tc.warmup), progress / WARMUP_MAX_SHARE))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warm * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cos)
