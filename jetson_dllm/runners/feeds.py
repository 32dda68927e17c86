"""A call's feeds, checked before any runner uses them: tokens, each row's valid length and cache slots, soft inputs,
a family's canvas inputs, a conditional model's encoding, the encoder's condition. Every runner calls these."""

from __future__ import annotations

import numpy as np

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import FAMILIES, family_of
from jetson_dllm.runners.graphs import CONDITION_INPUTS, SOFT_INPUTS, graph_spec


def valid_length(feeds: dict[str, np.ndarray], batch: int, limit: int) -> np.ndarray:
    """A cached call's valid lengths, one per row (B,) int32 (a scalar feed is every row's), checked against the
    cache's length."""
    valid = feeds.get("valid_len")
    rows = None if valid is None else np.asarray(valid)
    if rows is None or rows.ndim > 1 or (rows.ndim == 1 and rows.shape[0] != batch) or not np.issubdtype(rows.dtype, np.integer):
        raise DllmError(f"valid_len must be one integer or one per row ({batch}), got {valid!r}"[:200])
    rows = np.broadcast_to(rows, (batch,)).astype(np.int32)
    if rows.min() < 0 or rows.max() >= limit:
        raise DllmError(f"valid_len must be in 0..{limit - 1}, got {rows.tolist()}"[:200])
    return rows


def call_slots(feeds: dict[str, np.ndarray], batch: int, pool: int) -> np.ndarray | None:
    """A call's rows of the cache pool (`slots`, (B,), distinct, each below the pool's `pool` rows), or None when the
    call brings no slots (its rows are a cache of its own batch size)."""
    slots = feeds.get("slots")
    if slots is None:
        return None
    rows = np.asarray(slots)
    if not pool:
        raise DllmError("slots given, but no cache pool is open (open_slots)")
    if rows.shape != (batch,) or not np.issubdtype(rows.dtype, np.integer) or rows.min() < 0 or rows.max() >= pool or len(set(rows.tolist())) != batch:
        raise DllmError(f"slots must be {batch} distinct rows of the pool's {pool}, got {slots!r}"[:200])
    return rows.astype(np.int64)


def check_tokens(feeds: dict[str, np.ndarray], canvas_lengths: list[int], vocab_size: int) -> np.ndarray:
    tokens = feeds.get("tokens")
    if tokens is None or tokens.ndim != 2:
        raise DllmError("the network takes one input, tokens, shaped (batch, canvas)")
    if tokens.shape[1] > max(canvas_lengths):
        raise DllmError(f"canvas of {tokens.shape[1]} tokens is longer than this model takes ({max(canvas_lengths)})")
    return np.ascontiguousarray(tokens, dtype=np.int32)


def canvas_inputs(feeds: dict[str, np.ndarray], canvas_lengths: list[int], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The canvas graph's inputs from a call's feeds, checked: `tokens`, a model's soft inputs (`graph_soft_inputs`)
    and its family's own (`Family.canvas_inputs`: a noise level `t` per row in [0, 1], continuous diffusion's noised
    latents `x`, finite); one a model does not take is refused."""
    tokens = check_tokens(feeds, canvas_lengths, cfg.vocab_size)
    family = family_of(cfg)
    for name in sorted({n for f in FAMILIES.values() for n in f.canvas_inputs} - set(family.canvas_inputs)):
        if name in feeds:
            raise DllmError(f"{name} is an input of the {', '.join(f.title for f in FAMILIES.values() if name in f.canvas_inputs)}; "
                            f"this {family.title} model takes none")
    out = {"tokens": tokens, **(graph_soft_inputs("canvas", feeds, tokens.shape, cfg) or {})}
    B, T = tokens.shape
    if "t" in family.canvas_inputs:  # the noise level of each row, in [0, 1]
        t = feeds.get("t")
        t = None if t is None else np.asarray(t, dtype=np.float32)
        if t is None or t.shape != (B,) or not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise DllmError(f"the {family.title} graph takes t, each row's noise level in [0, 1], shaped ({B},)")
        out["t"] = np.ascontiguousarray(t)
    if "x" in family.canvas_inputs:
        x = feeds.get("x")
        x = None if x is None else np.asarray(x, dtype=np.float32)
        if x is None or x.shape != (B, T, cfg.latent_dim) or not np.isfinite(x).all():
            raise DllmError(f"the {family.title} graph takes x, the noised latents, finite, shaped ({B}, {T}, {cfg.latent_dim})")
        out["x"] = np.ascontiguousarray(x)
    return out | condition_inputs(feeds, B, cfg)


def condition_inputs(feeds: dict[str, np.ndarray], batch: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A conditional model's denoising call's encoded condition (the encoder graph's outputs, per row), checked; a
    model without a condition refuses one."""
    if not cfg.cond_len:
        if any(name in feeds for name in CONDITION_INPUTS):
            raise DllmError("this model takes no condition (it was trained without one); leave the condition out")
        return {}
    memory, bias = (None if feeds.get(n) is None else np.asarray(feeds[n], dtype=np.float32) for n in CONDITION_INPUTS)
    width = cfg.cond_len + 1
    if memory is None or bias is None or memory.shape != (batch, width, cfg.d_model) or bias.shape != (batch, width) \
            or not (np.isfinite(memory).all() and np.isfinite(bias).all()):
        raise DllmError(f"a conditional model's graphs take its condition's encoding (the encoder graph's memory ({batch}, {width}, "
                        f"{cfg.d_model}) and memory_bias ({batch}, {width}), finite); run the encoder graph first")
    return {"memory": np.ascontiguousarray(memory), "memory_bias": np.ascontiguousarray(bias)}


def encoder_inputs(feeds: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The encoder graph's inputs, checked: the condition's ids (B, cond_len) in the vocabulary and each row's length."""
    tokens, lengths = feeds.get("tokens"), feeds.get("condition_len")
    tokens = None if tokens is None else np.asarray(tokens)
    lengths = None if lengths is None else np.asarray(lengths)
    if tokens is None or tokens.ndim != 2 or tokens.shape[1] != cfg.cond_len or not np.issubdtype(tokens.dtype, np.integer):
        raise DllmError(f"the encoder graph takes tokens, the condition's ids, shaped (batch, {cfg.cond_len})")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise DllmError(f"the condition's ids must be in 0..{cfg.vocab_size - 1}")
    if lengths is None or lengths.shape != (tokens.shape[0],) or not np.issubdtype(lengths.dtype, np.integer) \
            or (lengths.size and (lengths.min() < 0 or lengths.max() > cfg.cond_len)):
        raise DllmError(f"the encoder graph takes condition_len, each row's condition length in 0..{cfg.cond_len}")
    return {"tokens": np.ascontiguousarray(tokens, dtype=np.int32), "condition_len": np.ascontiguousarray(lengths, dtype=np.int32)}


def graph_soft_inputs(graph: str, feeds: dict[str, np.ndarray], shape: tuple[int, int], cfg: ModelConfig) -> dict[str, np.ndarray] | None:
    """A call's soft inputs for `graph` (`soft_inputs`: zeros when it brings none), or None when the graph takes none
    (soft inputs brought to it are refused): the one check every runner makes."""
    if SOFT_INPUTS[0] not in graph_spec(graph, cfg).inputs:
        if any(name in feeds for name in SOFT_INPUTS):
            raise DllmError(f"the {graph} graph of this model takes no soft inputs (it was trained without them)")
        return None
    return dict(zip(SOFT_INPUTS, soft_inputs(feeds, shape, cfg.soft_k, cfg.vocab_size)))


def soft_inputs(feeds: dict[str, np.ndarray], shape: tuple[int, int], k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A canvas call's soft inputs (ids (B, T, k) int32, probabilities (B, T, k) float32), checked: both or neither
    (neither: zeros, no soft input), k at most the model's, ids in the vocabulary, probabilities in [0, 1] summing to
    at most 1 per position (true softmax values of k candidates). Fewer than k candidates are padded with zeros."""
    ids, probs = feeds.get("soft_ids"), feeds.get("soft_probs")
    full = (*shape, k)
    if ids is None and probs is None:
        return np.zeros(full, dtype=np.int32), np.zeros(full, dtype=np.float32)
    if ids is None or probs is None:
        raise DllmError("soft inputs come as a pair: soft_ids and soft_probs")
    ids, probs = np.asarray(ids), np.asarray(probs)
    if ids.shape != probs.shape or ids.ndim != 3 or ids.shape[:2] != tuple(shape):
        raise DllmError(f"soft_ids and soft_probs must both be shaped (batch, canvas, k) = {(*shape, 'k')}, got {ids.shape} and {probs.shape}")
    if ids.shape[2] > k:
        raise DllmError(f"{ids.shape[2]} soft candidates per position; this model's graph takes at most {k} (its soft_k)")
    if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() >= vocab_size)):
        raise DllmError(f"soft_ids must be token ids in 0..{vocab_size - 1}")
    sums = probs.sum(-1, dtype=np.float64) if probs.size else np.zeros(1)
    if not np.isfinite(probs).all() or (probs.size and probs.min() < 0) or sums.max() > 1 + 1e-3:
        raise DllmError("soft_probs must be probabilities: each in [0, 1], each position's summing to at most 1")
    if ids.shape[2] < k:
        pad = ((0, 0), (0, 0), (0, k - ids.shape[2]))
        ids, probs = np.pad(ids, pad), np.pad(probs, pad)
    return np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(probs, dtype=np.float32)
