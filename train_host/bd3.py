"""Block diffusion (BD3-LM, Arriola et al., ICLR 2025): the vectorised training objective.

The text is cut into blocks of `block` tokens. The network sees the noised sequence and the clean one side by
side (2L tokens, both copies at the same rotary positions) under one boolean attention mask:

    noised block b  ->  itself (bidirectional)  and  the clean copies of blocks 0..b-1
    clean block b   ->  the clean copies of blocks 0..b   (block-causal)

One noise level per block (antithetic over the batch and the blocks), drawn from [t_min, t_max] (BD3-LM's
clipped schedule, which cuts the variance of the gradient; the paper searches the clipping per block size, here
it is a setting), and MDLM's weighted cross-entropy on the masked positions of the noised copy. The mask logit is
excluded as everywhere. Block size = L is exactly MDLM's objective (no clean copy is visible); block size 1 is
autoregression: the model predicts token i from the clean tokens before it, reading a mask token at i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetson_dllm.errors import DllmError
from train_host.diffusion import T_EPS, alpha, loss_weight


def block_attention_mask(length: int, block: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(2L, 2L) bool, True where a query (row) may attend to a key (column); rows and columns are [noised, clean]."""
    b = torch.arange(length, device=device) // block
    same = b[:, None] == b[None, :]
    before = b[None, :] < b[:, None]
    upto = b[None, :] <= b[:, None]
    top = torch.cat([same, before], dim=1)  # noised queries: own block (noised), earlier blocks (clean)
    bottom = torch.cat([torch.zeros_like(same), upto], dim=1)  # clean queries: clean blocks up to their own
    return torch.cat([top, bottom], dim=0)


def block_times(batch: int, n_blocks: int, t_min: float = T_EPS, t_max: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One noise level per block, (B, n_blocks): antithetic (one uniform offset, evenly spaced over all blocks of
    the batch), then mapped into [t_min, t_max]."""
    n = batch * n_blocks
    u = (torch.rand((), generator=generator) + torch.arange(n) / n) % 1.0
    return (t_min + (t_max - t_min) * u).view(batch, n_blocks)


def check_block(length: int, block: int) -> None:
    if not 1 <= block <= length or length % block:
        raise DllmError(f"--block-size {block} must divide the canvas ({length}) and be at most it")


def bd3_loss(
    model: torch.nn.Module,
    x: torch.Tensor,
    mask_id: int,
    block: int,
    schedule: str = "loglinear",
    t_min: float = T_EPS,
    t_max: float = 1.0,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BD3-LM objective for clean canvases x (B, L): weighted cross-entropy on the masked positions of the
    noised copy, per canvas position (as `mdlm_loss`). `t` (B, n_blocks) and `noise` (B, L) may be given.
    `model(tokens, positions, attn_mask=..., rope_positions=...)` returns logits of the selected positions."""
    B, L = x.shape
    check_block(L, block)
    t = block_times(B, L // block, t_min, t_max, generator) if t is None else t
    t_pos = t.to(x.device).repeat_interleave(block, dim=1)  # (B, L)
    if noise is None:
        noise = torch.rand(x.shape, generator=generator)
    masked = noise.to(x.device) < (1.0 - alpha(t_pos, schedule))
    z = torch.where(masked, torch.full_like(x, mask_id), x)
    tokens = torch.cat([z, x], dim=1)  # (B, 2L): noised, then clean
    select = torch.cat([masked, torch.zeros_like(masked)], dim=1)
    rope = torch.arange(L, device=x.device).repeat(2)  # both copies at the same positions
    logits = model(tokens, select, attn_mask=block_attention_mask(L, block, x.device), rope_positions=rope)
    targets = x[masked]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = (loss_weight(t_pos[masked], schedule) * ce).sum() / x.numel()
    hit = (logits.argmax(-1) == targets).detach()
    stats = {"masked": masked.sum().detach(), "ce_sum": ce.sum().detach(), "correct": hit.sum(), "hit": hit, "masked_at": masked}
    return loss, stats


@torch.no_grad()
def bd3_nll_bound(
    model: torch.nn.Module,
    x: torch.Tensor,
    pad_id: int,
    mask_id: int,
    block: int,
    n_t: int = 8,
    schedule: str = "loglinear",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Monte-Carlo negative ELBO of canvases x (B, L) under block diffusion, as `diffusion.nll_bound` reports it
    (sums over the batch). The bound takes t over all of (0, 1]: the clipping is a training device only. Each
    pass draws one stratum of t per block, so every block of every canvas covers the whole range."""
    B, L = x.shape
    check_block(L, block)
    offsets = torch.rand((B, L // block), generator=generator)
    total = torch.zeros((), dtype=torch.float64)
    masked_n = correct = 0
    text = x != pad_id
    for j in range(n_t):
        t = T_EPS + (1.0 - T_EPS) * (j + offsets) / n_t
        noise = torch.rand(x.shape, generator=generator)
        loss, stats = bd3_loss(model, x, mask_id, block, schedule, t=t, noise=noise)
        total += loss.double().cpu() * x.numel() / n_t
        keep = text[stats["masked_at"]]  # accuracy over text, not padding: one forward pass serves both
        masked_n += int(keep.sum())
        correct += int(stats["hit"][keep].sum())
    return {"nll": float(total), "tokens": int(text.sum()), "masked": masked_n, "correct": correct}


def noise_range(tc) -> tuple[float, float]:
    """(t_min, t_max) of a training config: its own when set, else the whole (0, 1].

    BD3-LM clips t to a narrower range to cut the gradient's variance; its reference code (kuleshov-group/bd3lms)
    searches the range during training over widths 0.5 ... 0.9 (`algo.clip_search_widths`). That search, and
    per-block-size defaults from the paper, are not here yet: set --t-min / --t-max to clip."""
    return (tc.t_min or T_EPS, tc.t_max or 1.0)
