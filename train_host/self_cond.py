"""Self-conditioning (Chen et al. 2022, "Analog Bits"; SCMDM 2026 for masked diffusion), host side: the denoiser
also sees its own previous prediction of the clean tokens.

A model with soft inputs (`cfg.soft_k` = k) takes, per position, k candidate ids and their probabilities (true
softmax values, not renormalised over the k). In training, with probability `rate` a first pass without them runs
(no gradient), and its top-k at the masked positions feed the second pass, the one the loss sees; otherwise the
second pass gets none (probabilities 0: the same input as a model without soft inputs). Sampling feeds each step
the previous step's top-k at the positions still masked (jetson_dllm.families.mdlm), with no extra network call;
the evaluation (NLL bound, accuracies) takes both passes (rate 1), the prediction the sampler's later steps make.
"""

from __future__ import annotations

import torch


def soft_from_logits(logits: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft inputs (ids (B, T, k) int64, probabilities (B, T, k) float32) holding the top-k of `logits` (N, V) at the
    N positions selected by `positions` (B, T) bool, and nothing (probability 0) elsewhere."""
    probs, ids = torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)
    B, T = positions.shape
    soft_ids = torch.zeros((B, T, k), dtype=torch.long, device=logits.device)
    soft_probs = torch.zeros((B, T, k), dtype=torch.float32, device=logits.device)
    soft_ids[positions] = ids
    soft_probs[positions] = probs
    return soft_ids, soft_probs


def no_soft(positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft inputs that add nothing: every probability 0."""
    B, T = positions.shape
    return (torch.zeros((B, T, k), dtype=torch.long, device=positions.device),
            torch.zeros((B, T, k), dtype=torch.float32, device=positions.device))


class SelfConditioned:
    """`model(z, positions)` (logits at the selected positions, as the losses call it) with self-conditioning:
    with probability `rate` (drawn once per call from `generator`) a first pass's detached top-k feeds the second.
    The second pass always takes the soft inputs (zeros when no first pass ran), so every parameter is used in every
    step (data-parallel training needs that)."""

    def __init__(self, model, k: int, rate: float, generator: torch.Generator | None = None):
        self.model, self.k, self.rate, self.generator = model, k, rate, generator

    def __call__(self, z: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        """`kwargs` go to both passes (block diffusion's mask, positions and token shift). Block diffusion's input
        holds the noised copy, then the clean one: `positions` select in the first (B, L) or in both (B, 2L); the
        soft inputs cover the whole input, none on the clean copy."""
        first = self.rate >= 1.0 or (self.rate > 0.0 and float(torch.rand((), generator=self.generator)) < self.rate)
        if first:
            with torch.no_grad():
                soft = soft_from_logits(self.model(z, positions, **kwargs), positions, self.k)
        else:
            soft = no_soft(positions, self.k)
        if soft[0].shape[1] < z.shape[1]:  # the clean copy: no soft input
            pad = z.shape[1] - soft[0].shape[1]
            soft = tuple(torch.nn.functional.pad(s, (0, 0, 0, pad)) for s in soft)
        return self.model(z, positions, soft=soft, **kwargs)


def conditioned(model, k: int, rate: float = 1.0, generator: torch.Generator | None = None):
    """The prediction a loss or an evaluation calls: the model itself, or (soft inputs of `k` candidates: the model's
    `cfg.soft_k`) `SelfConditioned`."""
    return SelfConditioned(model, k, rate, generator) if k else model
