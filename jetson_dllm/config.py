"""Model configs: one dataclass and the tiny -> xxlarge sizes table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jetson_dllm.errors import DllmError
from jetson_dllm.families import FAMILIES, family_of, infer_family
from jetson_dllm.precisions import PRECISIONS, weight_format

# d_model, n_head, n_layer: the sizes of the seed project.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (256, 4, 4),
    "small": (384, 6, 6),
    "medium": (512, 8, 8),
    "large": (640, 10, 10),
    "xlarge": (768, 12, 12),
    "xxlarge": (1024, 16, 16),
}


BENCH_VOCAB = 8192  # the vocabulary of the random-weight models `dllm bench --config` and `dllm profile` size


def _swiglu_hidden(d_model: int, multiple_of: int = 64) -> int:
    # LLaMA's rule: 2/3 of 4*d, rounded up to a multiple (keeps the MLP at ~8*d^2 parameters).
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# (field, type, lowest, highest): what any config, named or read from a file, must satisfy. The canvas and the
# vocabulary are bounded by what the uint16 shards and a Jetson can hold, so an absurd file is refused, not run.
_FIELD_RANGES = (
    ("name", str, "", "~"),
    ("d_model", int, 8, 16384),
    ("n_head", int, 1, 256),
    ("n_kv_head", int, 0, 256),
    ("n_layer", int, 1, 256),
    ("vocab_size", int, 4, 65536),
    ("canvas_len", int, 8, 16384),
    ("mask_id", int, 0, 65535),
    ("d_ff", int, 0, 65536),
    ("rope_theta", float, 1.0, 1e9),
    ("norm_eps", float, 1e-12, 1e-1),
    ("tie_embeddings", bool, False, True),
    ("family", str, "", "~"),
    ("block_size", int, 0, 16384),
    ("shift", bool, False, True),
    ("soft_k", int, 0, 64),
    ("latent_dim", int, 0, 4096),
    ("cond_len", int, 0, 1024),
    ("cond_layers", int, 0, 64),
    ("noise_shift", float, 0.1, 100.0),
)


@dataclass
class ModelConfig:
    """Shape of the bidirectional denoiser.

    Args:
        name: the size name it came from ("tiny" ... "xxlarge") or "custom".
        d_model, n_head, n_layer: width, attention heads, layers.
        n_kv_head: key/value heads (grouped-query attention: each serves n_head / n_kv_head query heads); 0 means
            n_head (plain multi-head attention). The KV cache holds n_kv_head heads.
        vocab_size: tokenizer vocabulary, special tokens included.
        canvas_len: the longest canvas (sequence) the model is trained and exported for.
        mask_id: the token id of the mask; its logit is never predicted.
        d_ff: SwiGLU hidden width; 0 means derived from d_model.
        tie_embeddings: output head shares the token embedding.
        family: the model family (jetson_dllm.families): "mdlm", "bd3" (block diffusion) or "ar" (the
            autoregressive baseline: a causal mask and next-token prediction, the same network otherwise, so
            diffusion and AR compare fairly).
        block_size: block diffusion's block (the tokens generated per block, left to right); 0 for other families.
        shift: block diffusion with the token shift of a model adapted from an autoregressive parent: the input
            starts with the start token, the hidden state at position i predicts token i + 1 (a block's first
            token from the previous block's last clean position), so the parent's head is used as it was trained.
        soft_k: soft inputs of k candidates per position (0: none): each position's input also takes the
            probability-weighted sum of k candidate embeddings (`soft_ids`, `soft_probs`). For a family that
            self-conditions (MDLM, BD3), the previous step's top-k prediction at the positions still masked; for
            sparse distribution diffusion (SDD), the k weighted candidates every position holds.
        latent_dim: continuous embedding diffusion's latent width (its token embeddings, kept L2-normalised, are
            what is noised and what the canvas graph takes as `x`); 0 for the other families.
        cond_len, cond_layers: a conditional model's condition (a story's first sentence): the tokens its text
            encoder reads (at most) and the encoder's layers; every denoiser layer cross-attends to the encoding
            (train_host.conditioning). 0 and 0: an unconditional model.
        noise_shift: continuous diffusion's schedule shift s: the cosine schedule's signal-to-noise ratio divided by
            s^2 at every level, abar_s(t) = cos^2 / (cos^2 + s^2 sin^2) of pi t / 2 (s > 1: noisier at every t, so
            training and the sampler's steps spend more of t where tokens are decided); 1 = the cosine itself.
    """

    name: str = "custom"
    d_model: int = 256
    n_head: int = 4
    n_layer: int = 4
    n_kv_head: int = 0
    vocab_size: int = 8192
    canvas_len: int = 256
    mask_id: int = 2
    d_ff: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    family: str = "mdlm"
    block_size: int = 0  # block diffusion (BD3-LM): generates blocks of this many tokens left to right
    shift: bool = False  # block diffusion adapted from an AR parent: position i predicts token i + 1
    soft_k: int = 0  # soft inputs (self-conditioning): k candidate ids and probabilities per position
    latent_dim: int = 0  # continuous embedding diffusion: the width of the noised token embeddings
    cond_len: int = 0  # conditional generation: the condition's tokens the encoder reads; 0 = unconditional
    cond_layers: int = 0  # the condition encoder's layers
    noise_shift: float = 1.0  # continuous diffusion: the cosine schedule's shift (1 = none)

    def __post_init__(self) -> None:
        for name, kind, low, high in _FIELD_RANGES:
            value = getattr(self, name)
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise DllmError(f"model config: {name} must be {kind.__name__}, got {str(value)[:20]!r}")
            if kind is not str and not (low <= value <= high):  # NaN fails too
                raise DllmError(f"model config: {name} {value} is outside {low}..{high}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise DllmError(f"model config: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.d_model % self.n_head:
            raise DllmError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise DllmError(f"head dimension {self.head_dim} must be even for rotary positions")
        if not 0 <= self.mask_id < self.vocab_size:
            raise DllmError(f"mask_id {self.mask_id} is outside the vocabulary (size {self.vocab_size})")
        if self.family not in FAMILIES:
            raise DllmError(f"model config: unknown family {self.family[:20]!r}; choose one of: {', '.join(FAMILIES)}")
        if (family_of(self).attention == "block") != (self.block_size > 0):
            need = "needs a block size > 0" if self.block_size == 0 else f"takes no block size (block_size {self.block_size})"
            raise DllmError(f"model config: a {self.family} model {need}")
        if self.shift and family_of(self).attention != "block":
            raise DllmError(f"model config: the token shift is block diffusion's; a {self.family} model takes none")
        if family_of(self).mixture and not self.soft_k:
            raise DllmError(f"model config: a {self.family} model needs its candidates per position (soft_k > 0)")
        if self.soft_k and not (family_of(self).self_cond or family_of(self).mixture):
            raise DllmError(f"model config: a {self.family} model takes no soft inputs (soft_k {self.soft_k}); "
                            f"self-conditioning is for: {', '.join(n for n, f in FAMILIES.items() if f.self_cond)}")
        if ("x" in family_of(self).canvas_inputs) != (self.latent_dim > 0):  # its canvas takes latents
            need = "needs its latent width (latent_dim > 0)" if not self.latent_dim else f"takes no latent width (latent_dim {self.latent_dim})"
            raise DllmError(f"model config: a {self.family} model {need}")
        if self.noise_shift != 1.0 and not self.latent_dim:
            raise DllmError(f"model config: noise_shift is continuous diffusion's schedule; a {self.family} model takes none")
        if self.latent_dim and self.tie_embeddings:
            raise DllmError(f"model config: a {self.family} model's head cannot share its latent embedding (tie_embeddings false)")
        if (self.cond_len > 0) != (self.cond_layers > 0):
            raise DllmError(f"model config: a condition needs both its length and its encoder's layers (cond_len {self.cond_len}, "
                            f"cond_layers {self.cond_layers})")
        if self.cond_len >= self.canvas_len:
            raise DllmError(f"model config: the condition ({self.cond_len} tokens) must be shorter than the canvas ({self.canvas_len})")
        if self.cond_len and not family_of(self).conditional:
            raise DllmError(f"model config: a {self.family} model takes no condition; conditional models are: "
                            f"{', '.join(n for n, f in FAMILIES.items() if f.conditional)}")
        if self.block_size and self.canvas_len % self.block_size:
            raise DllmError(f"block size {self.block_size} must divide the canvas ({self.canvas_len})")
        if self.d_ff == 0:
            self.d_ff = _swiglu_hidden(self.d_model)

    @property
    def attention(self) -> str:
        """The network's mask: "bidirectional", "causal" or "block" (its family's)."""
        return family_of(self).attention

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """The named size with any field overridden, e.g. `from_name("tiny", vocab_size=4096)`."""
        if name not in SIZES:
            raise DllmError(f"unknown config {name!r}; choose one of: {', '.join(SIZES)}")
        d_model, n_head, n_layer = SIZES[name]
        return cls(name=name, d_model=d_model, n_head=n_head, n_layer=n_layer, **overrides)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> ModelConfig:
        """A config read from a file; every field checked (types and ranges), a clear error naming `where`."""
        if not isinstance(data, dict):
            raise DllmError(f"{where}: the model config must be an object")
        if "family" not in data and "causal" in data:  # written before configs recorded the family
            data = {k: v for k, v in data.items() if k != "causal"} | {"family": infer_family(data)}
        if "n_kv_head" not in data and "n_head" in data:  # written before grouped-query attention: one per head
            data = {**data, "n_kv_head": data["n_head"]}
        if "shift" not in data and "family" in data:  # written before adapted models: none was shifted
            data = {**data, "shift": False}
        if "soft_k" not in data and "family" in data:  # written before soft inputs: none had them
            data = {**data, "soft_k": 0}
        if "latent_dim" not in data and "family" in data:  # written before continuous diffusion: none had a latent
            data = {**data, "latent_dim": 0}
        if "cond_len" not in data and "family" in data:  # written before conditional models: none had a condition
            data = {**data, "cond_len": 0, "cond_layers": 0}
        if "noise_shift" not in data and "family" in data:  # written before the schedule shift: the cosine itself
            data = {**data, "noise_shift": 1.0}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - known, known - set(data)
        if unknown:
            raise DllmError(f"{where}: model config has unknown fields {sorted(unknown)[:3]}; was it written by a newer jetson-dllm?")
        if missing:  # a file must say everything: a default here would describe another model than the weights
            raise DllmError(f"{where}: model config lacks {sorted(missing)[:3]}")
        try:
            return cls(**data)
        except DllmError as e:
            raise DllmError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (a tied head counts once)."""
        d, f, kv = self.d_model, self.d_ff, self.n_kv_head * self.head_dim
        per_block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o; k, v; w1, w2, w3; two RMSNorm weights
        n = self.n_layer * per_block + d  # final norm
        if family_of(self).mixture or self.latent_dim:
            n += 32 * d + d + d * d + d  # the time embedding's two layers (model.TIME_FEATURES features)
        if self.latent_dim:  # its input projection, the given positions' marker, a time projection per layer
            n += self.latent_dim * d + d + self.n_layer * d * d + (self.latent_dim * d if self.soft_k else 0)  # (+ self-conditioning's)
        elif self.soft_k and not family_of(self).mixture:
            n += d * d  # the soft input's projection
        if self.cond_len:  # the encoder's layers, its final norm and empty slot; a cross-attention (and norm) per layer
            n += self.cond_layers * per_block + 2 * d + self.n_layer * (2 * d * d + 2 * d * kv + d)
        if include_embedding:
            n += self.vocab_size * (self.latent_dim or d)
        if not self.tie_embeddings:
            n += self.vocab_size * d
        return n

    def weight_bytes(self, precision: str) -> int:
        """Bytes of weights at a precision (int8-dynamic counts as int8); INT8 keeps embedding and norms in FP16 (as our Q/DQ export does)."""
        fmt = weight_format(precision)
        if fmt != "int8":
            return self.num_params() * PRECISIONS[fmt].weight_bytes
        d, f, kv = self.d_model, self.d_ff, self.n_kv_head * self.head_dim
        matmul = self.n_layer * (2 * d * d + 2 * d * kv + 3 * d * f)
        return matmul * 1 + (self.num_params() - matmul) * 2

    def canvas_buckets(self) -> list[int]:
        """Canvas lengths a run may use: powers of two from 32 up to canvas_len, and canvas_len itself."""
        sizes, n = [], 32
        while n < self.canvas_len:
            sizes.append(n)
            n *= 2
        return sizes + [self.canvas_len]


def canvas_for(needed: int, allowed: list[int]) -> int:
    """The smallest allowed canvas length that holds `needed` positions."""
    for n in sorted(allowed):
        if n >= needed:
            return n
    raise DllmError(
        f"{needed} positions do not fit: the longest canvas this model takes is {max(allowed)}; "
        "shorten the prompt or --length"
    )
