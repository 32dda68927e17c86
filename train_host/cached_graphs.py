"""The cached graphs (jetson_dllm.runners.graphs.GRAPHS) on a torch model and its KV cache: what the torch runner runs,
the same computation the exported graphs do (bd3_export, ar_export), through the model's own layers.

    block_step   a noised block's queries attend to the cache and to the block itself; nothing is written
    commit       a final (clean) block's keys and values appended at the cache's length
    commit_step  the finished block committed and the next noised block stepped in one pass (training's mask)
    decode       one token read (its keys and values written), the next token's logits out
    verify       any number of tokens read causally (their keys and values written), each one's next logits out

These run on the model's own KVCache (one valid length for the batch, attending to exactly the filled positions):
the torch runner's path for a batch at one position (`dllm run`, bench), benchmarks and tests. The graphs as
exported, each row at its own valid length, are train_host.graph_modules (the torch runner's path for a server's
rows at different positions); tests/jetson_dllm/test_slots.py checks the two paths write the same tokens.

A shifted model's block graphs return each position's prediction from the position before (`model.shifted`): the
commit also returns its block's, whose position 0 predicts the next block's first token.
"""

from __future__ import annotations

import torch

from jetson_dllm.errors import DllmError
from train_host.bd3 import fused_mask
from train_host.model import Denoiser, KVCache, shifted, topk_logprobs


def commit(model: Denoiser, cache: KVCache, block: torch.Tensor, memory: tuple | None = None) -> torch.Tensor | None:
    """Append a final (clean) block's keys and values to the cache; a shifted model's block logits come back.
    `memory`: a conditional model's encoded condition (every function here takes it)."""
    cache.frozen = False
    h = model.hidden(block, cache=cache, memory=memory)
    return shifted(model.logits_from_hidden(h)) if model.cfg.shift else None


def block_step_logits(model: Denoiser, cache: KVCache, block: torch.Tensor, soft: tuple | None = None,
                      memory: tuple | None = None) -> torch.Tensor:
    """The logits of a noised block that sees the cache and itself; the cache is left as it was. `soft`: a
    self-conditioned model's soft inputs."""
    cache.frozen = True
    try:
        logits = model(block, cache=cache, soft=soft, memory=memory)
        return shifted(logits) if model.cfg.shift else logits
    finally:
        cache.frozen = False


def block_step(model: Denoiser, cache: KVCache, block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling head of `block_step_logits`."""
    return topk_logprobs(block_step_logits(model, cache, block), k)


def commit_step_logits(model: Denoiser, cache: KVCache, prev: torch.Tensor, block: torch.Tensor, memory: tuple | None = None) -> torch.Tensor:
    """The finished block `prev` committed and the noised `block` after it stepped, in one forward pass under
    training's mask (the clean block block-causal, the noised one seeing it); the cache keeps `prev` only."""
    start, b = cache.len, block.shape[1]
    past = torch.ones(2 * b, start, dtype=torch.bool, device=block.device)
    cache.frozen = False
    logits = model(torch.cat([prev, block], dim=1), cache=cache, attn_mask=torch.cat([past, fused_mask(b, block.device)], dim=1), memory=memory)
    cache.len = start + b  # the noised block's keys were written past it: masked, and overwritten later
    return logits[:, b - 1 : 2 * b - 1] if model.cfg.shift else logits[:, b:]  # shifted: from the position before


def decode(model: Denoiser, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """The autoregressive baseline's step: the logits that follow `tokens` (B, 1), whose keys and values are
    written into the cache at its length."""
    return model.logits_from_hidden(model.hidden(tokens, cache=cache))


def verify(model: Denoiser, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """The logits after each of `tokens` (B, W) read causally at the cache's length, their keys and values written:
    an explicit mask (the cache, then a causal triangle), since SDPA's own causal flag aligns its triangle top-left,
    which is wrong once the keys hold a cache before the queries."""
    start, w = cache.len, tokens.shape[1]
    own = torch.ones(w, w, dtype=torch.bool, device=tokens.device).tril()
    mask = torch.cat([torch.ones(w, start, dtype=torch.bool, device=tokens.device), own], dim=1)
    return model.logits_from_hidden(model.hidden(tokens, cache=cache, attn_mask=mask))


def run_cached(model: Denoiser, cache: KVCache, graph: str, valid: int, tokens: torch.Tensor,
               prev_tokens: torch.Tensor | None = None, soft: tuple | None = None, memory: tuple | None = None) -> torch.Tensor | None:
    """One cached graph (jetson_dllm.runners.graphs.GRAPHS) on the model with a torch cache at `valid` positions: the
    logits of `tokens`' positions, or None for an unshifted model's commit (nothing comes back). `soft`: a
    self-conditioned block step's soft inputs; `memory` a conditional model's encoded condition."""
    cache.len = valid
    if graph == "block_step":
        return block_step_logits(model, cache, tokens, soft, memory)
    if graph == "commit":
        return commit(model, cache, tokens, memory)
    if graph == "commit_step":
        return commit_step_logits(model, cache, prev_tokens, tokens, memory)
    if graph == "decode":
        return decode(model, cache, tokens)
    if graph == "verify":
        return verify(model, cache, tokens)
    raise DllmError(f"no cached graph {graph!r}")
