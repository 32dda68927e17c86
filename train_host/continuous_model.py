"""The network of continuous embedding diffusion (CDCD / Plaid style): the same transformer layers as the Denoiser,
over noised token embeddings instead of tokens.

Each token has a learned latent of `latent_dim` numbers, kept L2-normalised to norm sqrt(latent_dim) (every
coordinate of unit scale, and no collapse of the table toward zero, which the noise would otherwise win against).
The input at a position is either the noised latent `x` (where text is generated) or, where the canvas holds a
token (a prompt), that token's clean latent; a learned marker tells the two apart. The noise level `t` enters through
a sinusoidal time embedding added to the input and, projected per layer, before every layer. The head predicts
p(x0 | x_t) over the vocabulary (cross-entropy); the expected clean latent sum_v p_v e_v (score interpolation) is what
the samplers step with.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetson_dllm.config import ModelConfig
from train_host.model import TIME_FEATURES, Layer, RMSNorm, register_tables, time_features


class ContinuousDenoiser(nn.Module):
    """p(x0 | x_t) for every position of a canvas of noised latents (B, T, latent_dim) and tokens (the prompt's; the
    mask where generated)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.latent_dim)  # the latent table (normalised where used)
        self.in_proj = nn.Linear(cfg.latent_dim, d, bias=False)
        self.given = nn.Parameter(torch.zeros(d))  # added where the canvas holds a clean token
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FEATURES, d), nn.SiLU(), nn.Linear(d, d))
        self.time_layers = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(cfg.n_layer))
        self.blocks = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        register_tables(self, cfg)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        for layer in self.time_layers:  # zero: the layers start unconditioned, the input's time embedding leads
            nn.init.zeros_(layer.weight)
        if cfg.soft_k:  # self-conditioning: the previous step's top-k as a latent, projected in (zero at first)
            self.soft_proj = nn.Linear(cfg.latent_dim, d, bias=False)
            nn.init.zeros_(self.soft_proj.weight)

    def set_attention(self, impl: str) -> None:
        for block in self.blocks:
            block.attn.impl = impl

    def latents(self) -> torch.Tensor:
        """The latent table (vocab, latent_dim), every row of norm sqrt(latent_dim)."""
        return F.normalize(self.tok_emb.weight.float(), dim=-1) * math.sqrt(self.cfg.latent_dim)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, x: torch.Tensor | None = None,
                t: torch.Tensor | None = None, soft: tuple[torch.Tensor, torch.Tensor] | None = None, **_unused) -> torch.Tensor:
        """Logits (B, T, vocab), or (N, vocab) at a boolean (B, T) `positions` selection. `x` (B, T, latent_dim): the
        noised latents (zeros when not given); `t` (B,): their noise level (1 when not given); `soft` (a model with
        `soft_k`): the previous prediction's top-k ids and probabilities, whose weighted latent is projected in
        (self-conditioning, as CDCD and Plaid do, through the soft-input path)."""
        B, T = tokens.shape
        table = self.latents()
        given = tokens != self.cfg.mask_id
        x = torch.zeros(B, T, self.cfg.latent_dim, device=tokens.device) if x is None else x.float()
        t = torch.ones(B, device=tokens.device) if t is None else t
        x = torch.where(given.unsqueeze(-1), table[tokens.long()], x)
        time = self.time_mlp(time_features(t))  # (B, d)
        marker = torch.where(given.unsqueeze(-1), self.given, torch.zeros_like(self.given))  # (no bool -> float cast: FP16 export)
        h = self.in_proj(x.to(self.in_proj.weight.dtype)) + marker + time.unsqueeze(1)
        if self.cfg.soft_k and soft is not None:
            ids, probs = soft
            h = h + self.soft_proj((probs.unsqueeze(-1).float() * table[ids.long()]).sum(dim=-2))
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for block, timed in zip(self.blocks, self.time_layers):
            h = block(h + timed(time).unsqueeze(1), cos, sin)
        h = self.norm(h)
        if positions is not None:
            h = h[positions]
        return self.head(h) + self.logit_bias

    def expected_latent(self, logits: torch.Tensor) -> torch.Tensor:
        """sum_v p_v e_v over the whole vocabulary: the clean latent the prediction expects (..., latent_dim)."""
        return torch.softmax(logits.float(), dim=-1) @ self.latents()

    def top1_latent(self, logits: torch.Tensor) -> torch.Tensor:
        """The latent of each position's likeliest token (the clamping step's x0)."""
        return self.latents()[logits.argmax(-1)]


Network = ContinuousDenoiser  # what `Family.network` names (train_host.networks.build_model)
