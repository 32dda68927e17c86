"""The evaluation both noise-level families share (SDD, continuous diffusion): no NLL, but the denoising loss and the
top-1 accuracy at stratified noise levels, tallied per kind of input, and at t = 1 where sampling starts."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from train_host.diffusion import T_EPS


def level_tallies(x: torch.Tensor, ev, kinds: tuple[tuple[str, bool], ...],
                  logits_at: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """`kinds`: (name, at t = 1 only) in the order they are drawn; "plain" is the scored loss and accuracy, every
    other kind an extra accuracy `val_acc_NAME`. `logits_at(kind, level (B,))` -> (logits of the scored positions,
    the scored mask (B, T)). Levels are stratified over `ev.n_t` strata with one random offset per row."""
    B = x.shape[0]
    offsets = torch.rand(B, generator=ev.generator)
    loss, tally = 0.0, {kind: [0, 0] for kind, _ in kinds}
    for j in range(ev.n_t):
        t = T_EPS + (1.0 - T_EPS) * (j + offsets) / ev.n_t
        for kind, at_one in kinds:
            if at_one and j:
                continue
            logits, scored = logits_at(kind, torch.ones(B) if at_one else t)
            targets = x[scored]
            tally[kind][0] += int((logits.argmax(-1) == targets).sum())
            tally[kind][1] += int(scored.sum())
            if kind == "plain":
                loss += float(F.cross_entropy(logits.float(), targets, reduction="sum")) / ev.n_t
    return {"loss": loss, "tokens": tally["plain"][1] // ev.n_t, "masked": tally["plain"][1], "correct": tally["plain"][0],
            "extra": {f"val_acc_{kind}": tuple(tally[kind]) for kind, _ in kinds if kind != "plain"}}
