"""Block diffusion's generation: block after block, left to right, each denoised by the one sampler while the
blocks before it sit in an exact KV cache.

Blocks are aligned to position 0, as in training, so the cache holds exactly the clean copy's keys and values:
the prompt's complete blocks are committed first (each runs once, clean, attending to the cache and itself),
then each block is denoised (its queries attend to the cache and to the block itself; nothing is written) with
the prompt's tail, if any, as fixed tokens of the first block, and committed once final. Generation ends at an
end-of-text or after `max_new` tokens: there is no fixed canvas beyond the model's longest context.
"""

from __future__ import annotations

import numpy as np
import torch

from jetson_dllm.blocks import BlockResult, generate_blocks
from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import SamplerConfig, SpecialIds
from train_host.model import Denoiser, KVCache, topk_logprobs


def commit(model: Denoiser, cache: KVCache, block: torch.Tensor) -> None:
    """Append a final (clean) block's keys and values to the cache."""
    cache.frozen = False
    model.hidden(block, cache=cache)


def block_step(model: Denoiser, cache: KVCache, block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling head over a noised block that sees the cache and itself; the cache is left as it was."""
    cache.frozen = True
    try:
        return topk_logprobs(model(block, cache=cache), k)
    finally:
        cache.frozen = False


def commit_step(model: Denoiser, cache: KVCache, prev: torch.Tensor, block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The finished block `prev` committed and the noised `block` after it stepped, in one forward pass under
    training's mask (the clean block block-causal, the noised one seeing it); the cache keeps `prev` only."""
    from train_host.bd3_export import fused_mask

    start, b = cache.len, block.shape[1]
    past = torch.ones(2 * b, start, dtype=torch.bool, device=block.device)
    cache.frozen = False
    logits = model(torch.cat([prev, block], dim=1), cache=cache, attn_mask=torch.cat([past, fused_mask(b, block.device)], dim=1))
    cache.len = start + b  # the noised block's keys were written past it: masked, and overwritten later
    return topk_logprobs(logits[:, b:], k)


@torch.no_grad()
def generate_blocks_torch(model: Denoiser, prompt: list[int], max_new: int, special: SpecialIds, sampler: SamplerConfig,
                          num_samples: int = 1, k: int = 64, on_step=None) -> BlockResult:
    """`jetson_dllm.blocks.generate_blocks` over this model with a torch KV cache."""
    cfg = model.cfg
    if not cfg.block_size:
        raise DllmError("not a block-diffusion model (trained without --objective bd3)")
    device = next(model.parameters()).device
    cache = KVCache(cfg, num_samples, cfg.canvas_len, device)

    def step(tokens: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
        cache.len = valid
        lp, ids = block_step(model, cache, torch.from_numpy(tokens).long().to(device), k)
        return lp.cpu().numpy(), ids.cpu().numpy()

    def add(tokens: np.ndarray, valid: int) -> None:
        cache.len = valid
        commit(model, cache, torch.from_numpy(tokens).long().to(device))

    def fused(prev: np.ndarray, tokens: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        cache.len = start
        lp, ids = commit_step(model, cache, torch.from_numpy(prev).long().to(device), torch.from_numpy(tokens).long().to(device), k)
        return lp.cpu().numpy(), ids.cpu().numpy()

    return generate_blocks(step, add, prompt, max_new, special, sampler, cfg.block_size, cfg.canvas_len, num_samples, on_step, fused)
