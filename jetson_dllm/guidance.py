"""Classifier-free guidance for masked diffusion (torch-free): two rows per sample in one network call, mixed in log
space per token and renormalised.

    log p_w(x) = log p(x | c) + w (log p(x | c) - log p(x | no c)) - log Z        (w = 0: the model alone)

the discrete CFG of Schiff et al. (ICLR 2025). The condition here is the prompt and the unconditional row is the same
canvas with the prompt masked: LLaDA's unsupervised guidance, which needs no condition dropout in training, so every
MDLM model takes it. The mix needs the two rows' whole distributions (their top-K's differ), so a guided call asks
the canvas graph for its logits and the head (top-K, entropy) is computed here from the mix.

Schedules over the steps (guidance is argued to hurt early, on heavily masked canvases, and help late; measured in
docs/guidance.md): `constant` (w every step), `late` (0 for the first half of the steps, then w: the first half
costs one row, not two) and `ramp` (w x the share of the steps done, this one included).
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import GUIDANCE_SCHEDULES, SpecialIds


def weight_at(guidance: float, schedule: str, step: int, steps: int) -> float:
    """The guidance weight of step `step` (0-based) of `steps`."""
    if schedule == "constant":
        return guidance
    if schedule == "late":
        return guidance if step >= steps // 2 else 0.0
    if schedule == "ramp":
        return guidance * (step + 1) / steps
    raise DllmError(f"--guidance-schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {schedule!r}")


def unconditional(canvas: np.ndarray, fixed: np.ndarray, special: SpecialIds) -> np.ndarray:
    """The canvas with its condition removed: every prompt (and infilling suffix) token masked; padding stays."""
    out = canvas.copy()
    out[fixed & (canvas != special.pad)] = special.mask
    return out


def check_prompt(fixed: np.ndarray, canvas: np.ndarray, special: SpecialIds) -> None:
    """Guidance pulls toward the prompt: a canvas with no prompt token has nothing to guide toward."""
    if not (fixed & (canvas != special.pad)).any():
        raise DllmError("--guidance needs a prompt to guide toward (the unguided row masks it); this model has no other "
                        "condition: give --prompt, or leave --guidance out", option="--guidance")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32, copy=False)
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def guided_head(cond: np.ndarray, uncond: np.ndarray, weight: float, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sampling head of the guided distribution from the two rows' logits (B, T, V) each: top-`k`
    log-probabilities (sorted, descending) and ids (B, T, k), and each position's entropy (B, T) of the whole mix."""
    lc = log_softmax(cond)
    mixed = log_softmax(lc + np.float32(weight) * (lc - log_softmax(uncond))) if weight else lc
    k = min(k, mixed.shape[-1])
    part = np.argpartition(-mixed, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(mixed, part, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    ids = np.take_along_axis(part, order, -1)
    p = np.exp(mixed)
    entropy = -(p * mixed).sum(-1)
    return np.take_along_axis(values, order, -1), ids.astype(np.int32), entropy.astype(np.float32)


def check_runner(runner) -> None:
    """A runner that can return the canvas graph's logits (the mix needs both rows' whole distributions)."""
    if not getattr(runner, "returns_logits", True):
        raise DllmError(f"--guidance mixes two rows' whole distributions, and {runner.name} keeps the logits on the GPU "
                        "(its engines carry the top-K head only): run it with --backend onnx, or leave --guidance out", option="--guidance")
