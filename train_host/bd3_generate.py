"""Block diffusion's generation: block after block, left to right, each denoised by the one sampler while the
blocks before it sit in an exact KV cache.

Blocks are aligned to position 0, as in training, so the cache holds exactly the clean copy's keys and values:
the prompt's complete blocks are committed first (each runs once, clean, attending to the cache and itself),
then each block is denoised (its queries attend to the cache and to the block itself; nothing is written) with
the prompt's tail, if any, as fixed tokens of the first block, and committed once final. Generation ends at an
end-of-text or after `max_new` tokens: there is no fixed canvas beyond the model's longest context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import SamplerConfig, SpecialIds, sample
from train_host.model import Denoiser, KVCache, topk_logprobs


@dataclass
class BlockResult:
    tokens: np.ndarray  # (B, prompt + generated) int32
    new_tokens: int
    evaluations: int  # denoising network calls
    commits: int  # cache passes (one per committed block)
    seconds: float


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


@torch.no_grad()
def generate_blocks(model: Denoiser, prompt: list[int], max_new: int, special: SpecialIds, sampler: SamplerConfig,
                    num_samples: int = 1, k: int = 64) -> BlockResult:
    """Generate up to `max_new` tokens after `prompt`, `sampler.steps` denoising steps per block."""
    cfg, b = model.cfg, model.cfg.block_size
    if not b:
        raise DllmError("not a block-diffusion model (trained without --objective bd3)")
    total = min(len(prompt) + max_new, cfg.canvas_len)
    if len(prompt) >= total:
        raise DllmError(f"the prompt is {len(prompt)} tokens; this model's context is {cfg.canvas_len}, leaving no room to generate")
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    out = np.full((num_samples, total), special.pad, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    cache = KVCache(cfg, num_samples, cfg.canvas_len, device)
    first = len(prompt) // b
    for j in range(first):  # the prompt's complete blocks
        commit(model, cache, torch.from_numpy(out[:, j * b : (j + 1) * b]).long().to(device))
    evaluations, commits = 0, first
    for j in range(first, -(-total // b)):
        s, e = j * b, min((j + 1) * b, total)
        canvas = np.full((num_samples, e - s), special.mask, dtype=np.int32)
        fixed = np.zeros_like(canvas, dtype=bool)
        tail = max(0, len(prompt) - s)  # the prompt's part of this block
        canvas[:, :tail], fixed[:, :tail] = out[:, s : s + tail], True

        def run(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lp, ids = block_step(model, cache, torch.from_numpy(z).long().to(device), k)
            return lp.cpu().numpy(), ids.cpu().numpy()

        result = sample(run, canvas, fixed, special, SamplerConfig(**{**sampler.__dict__, "seed": sampler.seed + j}))
        evaluations += result.evaluations
        out[:, s:e] = result.tokens
        ended = ((result.tokens == special.eot) | (result.tokens == special.pad)) & ~fixed
        if ended.any(axis=1).all() or e == total:
            break
        if e - s == b:
            commit(model, cache, torch.from_numpy(out[:, s:e]).long().to(device))
            commits += 1
    generated = int(max(0, min(e, total) - len(prompt)))
    return BlockResult(out[:, :e], generated, evaluations, commits, time.perf_counter() - t0)
