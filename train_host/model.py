"""The bidirectional transformer denoiser: rotary positions, pre-norm RMSNorm, SwiGLU, no causal mask."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jetson_dllm.config import ModelConfig
from jetson_dllm.families import family_of
from train_host.conditioning import ConditionEncoder, CrossAttention

# The mask token's logit gets this bias: exp() of it underflows to 0 in fp32 and fp16 alike, and unlike
# -inf it survives fp16 conversion and INT8 graphs without turning a softmax into NaN.
MASK_LOGIT_BIAS = -1.0e4


class RMSNorm(nn.Module):
    """RMSNorm written as primitive ops: ONNX RMSNormalization needs opset 23, TensorRT 10.3 parses up to 20."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


TIME_FEATURES = 32  # sinusoidal features of an SDD model's noise level


def time_features(t: torch.Tensor) -> torch.Tensor:
    """(B,) noise levels in [0, 1] -> (B, TIME_FEATURES) sines and cosines at geometric frequencies (1 to 1000)."""
    half = TIME_FEATURES // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (t.float() * 1000.0).unsqueeze(1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def register_tables(module: nn.Module, cfg: ModelConfig) -> None:
    """The buffers every network of ours carries (not saved): the rotary tables and the head's bias that keeps the
    mask token from being predicted."""
    cos, sin = rope_tables(cfg.canvas_len, cfg.head_dim, cfg.rope_theta)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)
    bias = torch.zeros(cfg.vocab_size)
    bias[cfg.mask_id] = MASK_LOGIT_BIAS
    module.register_buffer("logit_bias", bias, persistent=False)


def rope_tables(canvas_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (canvas_len, head_dim // 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(canvas_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (GPT-NeoX layout). x: (B, nh, T, hs); cos, sin: (T, hs/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Keys and values of every layer: (n_layer, B, n_kv_head, max_len, head_dim)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0  # positions filled
        self.frozen = False  # block diffusion's denoising steps: attend to the cache and the block, write nothing

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor, length: int) -> KVCache:
        """A cache over tensors someone else holds (a runner's), `length` positions filled."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.len, cache.frozen = k, v, length, False
        return cache

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        if self.frozen:
            return torch.cat([self.k[layer, :, :, : self.len], k], dim=2), torch.cat([self.v[layer, :, :, : self.len], v], dim=2)
        self.k[layer, :, :, self.len : self.len + T] = k
        self.v[layer, :, :, self.len : self.len + T] = v
        return self.k[layer, :, :, : self.len + T], self.v[layer, :, :, : self.len + T]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.causal = cfg.attention == "causal"
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.kv_dim = cfg.n_kv_head * cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.kv_dim, bias=False)  # [q; k; v] rows
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        # "sdpa" for training; "math" writes MatMul -> Softmax -> MatMul with Q pre-scaled, the pattern
        # TensorRT fuses into its attention kernels (the exporter sets it).
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attn_mask` (T, S) or (B, 1, T, S) bool, True where a query may attend (block diffusion, the cached
        graphs); otherwise full or causal."""
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split([C, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # decoding: attend to everything before; a prefill (T > 1) starts at 0
            k, v = cache.update(layer, k, v)
        if self.n_kv_head != self.n_head:  # grouped-query attention: each key/value head serves a group of query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        causal = self.causal and T > 1 and attn_mask is None
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # the denoiser: no mask
        else:
            att = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)  # (B, nh, T, S)
            if causal:
                att = att.masked_fill(torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            if attn_mask is not None:
                att = att.masked_fill(~attn_mask, float("-inf"))
            y = att.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.wo(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    """A pre-norm layer: self-attention, (a conditional denoiser's) cross-attention to the condition, SwiGLU."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        if cross:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.cross = CrossAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                attn_mask: torch.Tensor | None = None, memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, attn_mask)
        if memory is not None:
            x = x + self.cross(self.cross_norm(x), *memory)
        return x + self.mlp(self.mlp_norm(x))


class Denoiser(nn.Module):
    """Predicts the clean token at every position of a partially masked canvas (or, for the autoregressive family's causal attention,
    the next token: the autoregressive baseline).

    Input `tokens` (B, T) int32 or int64 with masked positions holding `cfg.mask_id`.
    `forward` gives the full head, logits (B, T, vocab); `sample_head` gives the top-K log-probabilities
    and their ids, which is all the sampler needs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Layer(cfg, cross=bool(cfg.cond_len)) for _ in range(cfg.n_layer))  # (the name keeps checkpoints' keys)
        if cfg.cond_len:  # a conditional model: the condition's encoder (train_host.conditioning)
            self.encoder = ConditionEncoder(cfg, Layer, RMSNorm)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # Soft inputs: self-conditioning adds a projection of the candidates' weighted embedding (zero at first); a
        # sparse-distribution model's input is the mixture itself, with its noise level t as a time embedding.
        self.mixture = family_of(cfg).mixture
        if cfg.soft_k and not self.mixture:
            self.soft_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        if self.mixture:
            self.time_mlp = nn.Sequential(nn.Linear(TIME_FEATURES, cfg.d_model), nn.SiLU(), nn.Linear(cfg.d_model, cfg.d_model))
        register_tables(self, cfg)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):  # residual projections, GPT-2 style
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.soft_k and not self.mixture:  # zero: a model starts as if it had no soft inputs (post-training one too)
            nn.init.zeros_(self.soft_proj.weight)
        for block in self.blocks if cfg.cond_len else ():  # zero: a conditional model starts as its unconditional self
            nn.init.zeros_(block.cross.wo.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, impl: str) -> None:
        """"sdpa" (training, fastest in torch) or "math" (explicit ops, for ONNX export)."""
        for block in self.blocks:
            block.attn.impl = impl

    def embed(self, tokens: torch.Tensor, soft: tuple[torch.Tensor, torch.Tensor] | None = None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        """The input embeddings (B, T, d_model): each token's, plus (a model with soft inputs, `soft` given as ids
        (B, T, k) and probabilities (B, T, k)) the projection of sum_j p_j * embedding(id_j). k is small: the gather
        is (B, T, k, d_model), no vocabulary-sized tensor; probabilities of 0 add nothing.

        A sparse-distribution (SDD) model's input at a position is the mixture itself: sum_j p_j * embedding(id_j),
        the mass the k candidates do not hold (1 - sum_j p_j) on its token's embedding (the mask where it generates,
        the prompt's token where that is given with no candidates), plus the embedding of its noise level `t` (B,)
        and, in training, Gaussian `noise` (B, T, d_model)."""
        x = self.tok_emb(tokens)
        if self.mixture:
            if soft is not None:
                ids, probs = soft
                probs = probs.unsqueeze(-1).to(x.dtype)
                x = (1.0 - probs.sum(dim=-2)) * x + (probs * self.tok_emb(ids)).sum(dim=-2)
            if t is not None:
                x = x + self.time_mlp(time_features(t)).unsqueeze(1).to(x.dtype)
            return x if noise is None else x + noise
        if soft is None or not self.cfg.soft_k:
            return x
        ids, probs = soft
        mixed = (probs.unsqueeze(-1).to(x.dtype) * self.tok_emb(ids)).sum(dim=-2)
        return x + self.soft_proj(mixed)

    def hidden(self, tokens: torch.Tensor, cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
               rope_positions: torch.Tensor | None = None, soft: tuple[torch.Tensor, torch.Tensor] | None = None,
               t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model); with a cache (causal models), of the next T positions.
        `attn_mask` and `rope_positions` (T,) serve block diffusion, whose input holds two copies of the text; the
        cached graphs give each row its own: `rope_positions` (B, T) and `attn_mask` (B, 1, T, S). `soft`: the soft
        inputs, `t` and `noise` an SDD model's noise level and training noise (`embed`); `memory` a conditional
        model's encoded condition and its bias (`encode`; `forward` encodes the empty condition when given none)."""
        start = cache.len if cache is not None else 0
        T = tokens.shape[1]
        if rope_positions is not None:
            cos, sin = self.rope_cos[rope_positions], self.rope_sin[rope_positions]
            if rope_positions.dim() == 2:  # per row: (B, T, hs/2) -> (B, 1, T, hs/2), broadcast over the heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.embed(tokens, soft, t, noise)
        if self.cfg.cond_len and memory is None:
            raise ValueError("a conditional model needs its condition's encoding (memory); an empty condition is one of length 0")
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i, attn_mask, memory)
        if cache is not None and not cache.frozen:
            cache.len += T
        return self.norm(x)

    def encode(self, condition: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A conditional model's encoding of its condition: ids (B, cond_len) (past each row's length anything in the
        vocabulary) and lengths (B,) -> (memory (B, cond_len + 1, d_model), bias (B, cond_len + 1))."""
        n = condition.shape[1] + 1
        return self.encoder(self.tok_emb(condition), lengths, self.rope_cos[:n], self.rope_sin[:n])

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Output head over any (..., d_model) selection of hidden states; the mask token is excluded."""
        return self.head(h) + self.logit_bias

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None, cache: KVCache | None = None,
                sources: torch.Tensor | None = None, soft: tuple[torch.Tensor, torch.Tensor] | None = None,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                condition: tuple[torch.Tensor, torch.Tensor] | None = None, memory: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or (N, vocab) for the N positions selected by a boolean (B, T) mask; `sources`
        (T',) first gathers the hidden states whose logits each output position gets (block diffusion's token shift);
        `soft` the soft inputs, `t` and `noise` an SDD model's (`embed`); a conditional model's `condition` (ids,
        lengths: encoded here) or its encoding `memory` (`encode`, once per request at run time).

        Selecting positions before the head is what makes training fast: the head over the vocabulary
        is the largest matmul of a small model, and the loss needs it only on masked positions.
        """
        if self.cfg.cond_len and condition is None and memory is None:  # a conditional model given none: the empty one
            condition = (torch.zeros((tokens.shape[0], self.cfg.cond_len), dtype=torch.long, device=tokens.device),
                         torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device))
        if condition is not None:
            memory = self.encode(*condition)
        h = self.hidden(tokens, cache=cache, attn_mask=attn_mask, rope_positions=rope_positions, soft=soft, t=t, noise=noise, memory=memory)
        if sources is not None:
            h = h[:, sources]
        if positions is not None:
            h = h[positions]
        return self.logits_from_hidden(h)

    def sample_head(self, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k log-probabilities (B, T, k) float32, sorted descending, and their ids (B, T, k) int32."""
        return topk_logprobs(self.forward(tokens), k)


def shifted(logits: torch.Tensor) -> torch.Tensor:
    """A block's logits (B, b, V) as a shifted model's predictions: position j's from position j - 1; position 0
    gets the last position's (the next block's first token, which only a clean block's commit predicts rightly)."""
    return torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)


def sampling_head(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_logprobs` and each position's entropy (nats) of the *whole* distribution, (B, T) float32: a reduction
    next to the logsumexp the head computes anyway (H = logsumexp - sum p * logit), which the entropy-bounded
    sampler needs (the renormalised top-K understates it)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    values, ids = torch.topk(logits, k, dim=-1)
    entropy = lse[..., 0] - (torch.exp(logits - lse) * logits).sum(-1)
    return values - lse, ids.to(torch.int32), entropy


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax restricted to the top k, without writing a second vocabulary-sized tensor."""
    logits = logits.float()
    values, ids = torch.topk(logits, k, dim=-1)
    return values - torch.logsumexp(logits, dim=-1, keepdim=True), ids.to(torch.int32)

