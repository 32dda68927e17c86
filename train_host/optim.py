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


def lr_at(tc, step: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, tc.warmup))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warm * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cos)
