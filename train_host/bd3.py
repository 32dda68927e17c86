"""Block diffusion (BD3-LM, Arriola et al., ICLR 2025): the vectorised training objective.

The text is cut into blocks of `block` tokens. The network sees the noised sequence and the clean one side by
side (2L tokens, both copies at the same rotary positions) under one boolean attention mask:

    noised block b  ->  itself (bidirectional)  and  the clean copies of blocks 0..b-1
    clean block b   ->  the clean copies of blocks 0..b   (block-causal)

One noise level per block (antithetic over the batch and the blocks), drawn from [t_min, t_max] (BD3-LM's
clipped schedule, which cuts the variance of the gradient; `clip_search` picks it from the data as BD3-LM's
reference code does, or --t-min/--t-max fix it), and MDLM's weighted cross-entropy on the masked positions of the noised copy. The mask logit is
excluded as everywhere. Block size = L is exactly MDLM's objective (no clean copy is visible); block size 1 is
autoregression: the model predicts token i from the clean tokens before it, reading a mask token at i.

The token shift (`shift_bos`, a model adapted from an autoregressive parent: Fast-dLLM v2, SDAR, Dream): the input
is the canvas behind the start token, exactly the parent's input, and the hidden state at position i predicts token
i + 1, as the parent's head was trained to: inside a block from the noised copy's previous position, a block's
first token from the clean copy's last position of the block before. The start token is given, never predicted.
At block size 1 the shifted model *is* its parent: every token is predicted from the clean tokens before it.

Complementary masks (`complementary`): each canvas also appears with the complementary mask (the tokens masked in
one copy are the ones kept in the other, at the complementary time), so every token is supervised once per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetson_dllm.errors import DllmError
from train_host.autoregressive import shift_right
from train_host.diffusion import T_EPS, alpha, complement_time, loss_weight
from train_host.parent import distilled
from train_host.self_cond import conditioned


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


def shift_sources(length: int, block: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(L,) the position in [noised, clean] (2L) whose hidden state predicts each noised position's token under
    the token shift: the noised copy's previous position inside a block, the clean copy's previous position (the
    last of the block before) at a block's start; position 0 (the start token) points at itself and is never
    predicted."""
    i = torch.arange(length, device=device)
    return torch.where(i == 0, 0, torch.where(i % block == 0, length + i - 1, i - 1))


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
    shift_bos: int | None = None,
    complementary: bool = False,
    unscored: int | None = None,
    teacher: torch.nn.Module | None = None,
    distill: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The BD3-LM objective for clean canvases x (B, L): weighted cross-entropy on the masked positions of the
    noised copy, per canvas position (as `mdlm_loss`). `t` (B, n_blocks) and `noise` (B, L) may be given.
    `shift_bos`: the token shift behind this start token; `complementary`: each canvas twice, with complementary
    masks (stats then cover 2B rows); `unscored`: a token (padding) masked like any other but never a target (the
    loss and the bound count text, as the autoregressive NLL does); `teacher`: a shifted model's AR parent, whose
    next-token distributions take `distill` of the cross-entropy (train_host/parent.py). `model(tokens, positions, attn_mask=...,
    rope_positions=..., sources=...)` returns logits of the selected positions (`sources`: the shift's gather)."""
    B, L = x.shape
    check_block(L, block)
    if shift_bos is not None:
        x = shift_right(x, shift_bos)
    t = block_times(B, L // block, t_min, t_max, generator) if t is None else t
    t_pos = t.to(x.device).repeat_interleave(block, dim=1)  # (B, L)
    if noise is None:
        noise = torch.rand(x.shape, generator=generator)
    masked = noise.to(x.device) < (1.0 - alpha(t_pos, schedule))
    text = x
    if complementary:
        x, masked, t_pos = torch.cat([x, x]), torch.cat([masked, ~masked]), torch.cat([t_pos, complement_time(t_pos, schedule)])
    if shift_bos is not None:
        masked[:, 0] = False  # the start token: given
    z = torch.where(masked, torch.full_like(x, mask_id), x)
    tokens = torch.cat([z, x], dim=1)  # (B, 2L): noised, then clean
    if unscored is not None:
        masked = masked & (x != unscored)
    rope = torch.arange(L, device=x.device).repeat(2)  # both copies at the same positions
    attn = block_attention_mask(L, block, x.device)
    if shift_bos is None:
        select = torch.cat([masked, torch.zeros_like(masked)], dim=1)
        logits = model(tokens, select, attn_mask=attn, rope_positions=rope)
    else:  # each noised position's prediction gathered from the position before it
        logits = model(tokens, masked, attn_mask=attn, rope_positions=rope, sources=shift_sources(L, block, x.device))
    targets = x[masked]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    scored = ce if teacher is None or not distill else distilled(ce, logits, teacher, text, masked, distill)
    weighted = loss_weight(t_pos[masked], schedule) * scored
    loss = weighted.sum() / x.numel()
    hit = (logits.argmax(-1) == targets).detach()
    stats = {"masked": masked.sum().detach(), "ce_sum": ce.sum().detach(), "correct": hit.sum(), "hit": hit, "masked_at": masked,
             "weighted": weighted.detach(), "x": x}
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
    shift_bos: int | None = None,
) -> dict[str, float]:
    """Monte-Carlo negative ELBO of canvases x (B, L) under block diffusion, as `diffusion.nll_bound` reports it
    (sums over the batch). The bound takes t over all of (0, 1]: the clipping is a training device only. Each
    pass draws one stratum of t per block, so every block of every canvas covers the whole range. With the token
    shift the tokens counted are those the shifted model predicts (the canvas behind the start token: its last
    position falls off, padding in any canvas that holds one document). Padding is noised like text but never
    scored: the bound covers the text and its end-of-text, exactly the tokens the autoregressive NLL counts."""
    B, L = x.shape
    check_block(L, block)
    offsets = torch.rand((B, L // block), generator=generator)
    total = torch.zeros((), dtype=torch.float64)
    masked_n = correct = 0
    text = (shift_right(x, shift_bos) if shift_bos is not None else x) != pad_id
    if shift_bos is not None:
        text[:, 0] = False  # the start token is given, not predicted
    for j in range(n_t):
        t = T_EPS + (1.0 - T_EPS) * (j + offsets) / n_t
        noise = torch.rand(x.shape, generator=generator)
        loss, stats = bd3_loss(model, x, mask_id, block, schedule, t=t, noise=noise, shift_bos=shift_bos, unscored=pad_id)
        total += loss.double().cpu() * x.numel() / n_t
        keep = text[stats["masked_at"]]  # accuracy over text, not padding: one forward pass serves both
        masked_n += int(keep.sum())
        correct += int(stats["hit"][keep].sum())
    return {"nll": float(total), "tokens": int(text.sum()), "masked": masked_n, "correct": correct}


# BD3-LM's search grid (kuleshov-group/bd3lms, `algo.clip_search_widths` [0.5 ... 0.9]); the reference steps the
# window's start by 0.05, here by 0.1 (21 ranges instead of 36: the search runs on a CPU inside the time budget).
CLIP_WIDTHS = (0.5, 0.6, 0.7, 0.8, 0.9)
CLIP_STRIDE = 0.1


def clip_candidates() -> list[tuple[float, float]]:
    """The unclipped range and every window of the search grid inside (0, 1]."""
    out = [(T_EPS, 1.0)]
    for width in CLIP_WIDTHS:
        for k in range(int(round((1.0 - width) / CLIP_STRIDE)) + 1):
            low = round(k * CLIP_STRIDE, 6)
            out.append((max(low, T_EPS), round(low + width, 6)))
    return out


@torch.no_grad()
def clip_search(model: torch.nn.Module, batches: list[torch.Tensor], mask_id: int, block: int, schedule: str = "loglinear",
                seed: int = 0) -> tuple[tuple[float, float], dict[tuple[float, float], float]]:
    """The noise range whose loss varies least, as BD3-LM's `_clipped_schedule_search` picks it: for each candidate,
    the variance over a batch's blocks of each block's mean weighted loss, summed over the batches; the lowest wins.
    Every candidate sees the same uniform draws and masking noise (common random numbers), so the ranges compare
    on the schedule, not on the luck of the draw. Returns the winner and the whole table."""
    was_training = model.training
    model.eval()
    table = {}
    try:
        for low, high in clip_candidates():
            total = 0.0
            for i, x in enumerate(batches):
                g = torch.Generator().manual_seed(seed * 7919 + i)
                B, L = x.shape
                t = block_times(B, L // block, low, high, g)
                noise = torch.rand(x.shape, generator=g)
                _, st = bd3_loss(conditioned(model, model.cfg.soft_k), x, mask_id, block, schedule, t=t, noise=noise)
                per_pos = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                per_pos[st["masked_at"]] = st["weighted"].float()
                total += float(per_pos.view(B, L // block, block).mean(-1).var())
            table[(low, high)] = total
    finally:
        model.train(was_training)
    return min(table, key=table.get), table


def noise_range(tc) -> tuple[float, float]:
    """(t_min, t_max) of a training config: its own when set, else the whole (0, 1] (which `clip_search` then
    narrows during training unless --t-min/--t-max are given; `searches_clip` says which)."""
    return (tc.t_min or T_EPS, tc.t_max or 1.0)


def searches_clip(tc) -> bool:
    """A BD3 run with blocks smaller than the canvas and no --t-min/--t-max searches its range at each evaluation."""
    return tc.objective == "bd3" and tc.block_size < tc.canvas_len and not (tc.t_min or tc.t_max)


def fused_mask(b: int, device=None) -> torch.Tensor:
    """(2b, 2b) attention among [clean block j-1, noised block j]: clean sees clean, noised sees both."""
    ones = torch.ones(b, b, dtype=torch.bool, device=device)
    return torch.cat([torch.cat([ones, ~ones], 1), torch.cat([ones, ones], 1)], 0)
