"""Conditional generation's network parts: a small bidirectional text encoder over the condition (a story's first
sentence), and the cross-attention by which every denoiser layer reads its encoding.

The encoder reads `[empty slot; the condition's tokens]` (the slot is a learned vector, always visible), shares the
denoiser's token embedding, and returns the encoding (the memory, (B, 1 + cond_len, d)) with an additive bias per
memory position (0 where a query may look, MEMORY_MASKED past the condition's length). A dropped condition (condition
dropout in training, the unconditional row of classifier-free guidance) is a condition of length 0: only the empty
slot is visible, so no softmax is ever over nothing. The cross-attention's output projection starts at zero, so a
conditional model made from an unconditional one (`--init`, the staged training) starts as exactly that model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from jetson_dllm.config import ModelConfig

MEMORY_MASKED = -1.0e4  # a finite bias (not -inf): it survives FP16 and INT8 graphs without NaN


class CrossAttention(nn.Module):
    """Queries from the canvas, keys and values from the condition's encoding (no rotary positions: the condition is
    read as a set of encoded tokens, their order already in the encoding)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.kv_dim = cfg.n_kv_head * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * self.kv_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        M = memory.shape[1]
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = self.wkv(memory).split([self.kv_dim, self.kv_dim], dim=-1)
        k = k.view(B, M, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, M, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.n_kv_head != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        att = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1) + bias[:, None, None, :].to(q.dtype)
        y = att.softmax(dim=-1) @ v
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class ConditionEncoder(nn.Module):
    """`cond_layers` bidirectional layers over the empty slot and the condition's tokens, then a final norm."""

    def __init__(self, cfg: ModelConfig, layer: type[nn.Module], norm: type[nn.Module]):
        """`layer` and `norm`: the denoiser's layer and norm classes (train_host.model), the encoder's own too."""
        super().__init__()
        self.cfg = cfg
        self.empty = nn.Parameter(torch.zeros(cfg.d_model))
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.cond_layers))
        self.norm = norm(cfg.d_model, cfg.norm_eps)

    def forward(self, embedded: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`embedded` (B, C, d) the condition's token embeddings, `lengths` (B,) how many of them are the condition;
        `cos`/`sin` the rotary tables of C + 1 positions. Returns the memory (B, C + 1, d) and its bias (B, C + 1)."""
        B = embedded.shape[0]
        x = torch.cat([self.empty.to(embedded.dtype).expand(B, 1, -1), embedded], dim=1)
        positions = torch.arange(x.shape[1], device=x.device)
        visible = positions.unsqueeze(0) <= lengths.to(torch.int64).unsqueeze(1)  # the slot (0) and the condition
        mask = visible[:, None, None, :]  # (B, 1, 1, C + 1): every query sees the visible keys
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask=mask)
        bias = torch.where(visible, torch.zeros((), device=x.device), torch.full((), MEMORY_MASKED, device=x.device))
        return self.norm(x), bias.float()


def condition_parameters(model) -> list[str]:
    """The names of a conditional model's condition parameters: the encoder's and the denoiser layers' cross-attention
    (what the staged training's second stage trains, and what a denoiser trained without a condition lacks)."""
    return [name for name, _ in model.named_parameters() if name.startswith("encoder.") or ".cross" in name]


def freeze_denoiser(model) -> None:
    """The staged training's second stage: only the condition's parameters learn; the denoiser stays as --init left it."""
    learning = set(condition_parameters(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in learning)


def batch_condition(dataset, rows, device, rate: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A training batch's conditions (a conditional model's pairs; None for a dataset without), some dropped."""
    if not hasattr(dataset, "conditions"):
        return None
    ids, lengths = dataset.conditions(rows, device)
    return ids, drop_conditions(lengths, rate, generator)


def drop_conditions(lengths: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Condition dropout: each row's condition length set to 0 (the empty condition) with probability `rate`."""
    if rate <= 0:
        return lengths
    keep = torch.rand(lengths.shape[0], generator=generator) >= rate
    return torch.where(keep.to(lengths.device), lengths, torch.zeros_like(lengths))


def with_condition(model, condition: tuple[torch.Tensor, torch.Tensor] | None):
    """The model with a batch's condition ((B, C) ids, (B,) lengths) bound to every call (what the family losses
    call: they never see the condition), or the model itself when there is none. A call on k copies of the batch
    (BD3's complementary masks: [x; x]) gets the conditions k times, in the same order."""
    if condition is None:
        return model

    class Bound:
        def __init__(self, inner):
            self.inner, self.cfg = inner, getattr(inner, "cfg", None) or inner.module.cfg

        def __call__(self, tokens, *args, **kwargs):
            return self.inner(tokens, *args, condition=_repeat(condition, tokens.shape[0]), **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    return Bound(model)


def _repeat(condition: tuple[torch.Tensor, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's conditions for a call on `rows` rows: k stacked copies of the batch (rows = k * B)."""
    ids, lengths = condition
    if rows == ids.shape[0]:
        return condition
    if rows % ids.shape[0]:
        raise ValueError(f"a call on {rows} rows for a batch of {ids.shape[0]} conditions")
    k = rows // ids.shape[0]
    return ids.repeat(k, 1), lengths.repeat(k)
