"""Block-by-block generation, the same for every runner: the sampler denoises one block at a time while the blocks
before it sit in an exact KV cache that the runner keeps (torch tensors, or buffers bound once to onnxruntime).

Blocks are aligned to position 0, as the model was trained: the prompt's complete blocks are committed first, the
prompt's tail becomes fixed tokens of the first noised block, and each block, once final, is committed (its keys
and values appended at the cache's valid length). Generation ends at an end-of-text or after `max_new` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import SamplerConfig, SpecialIds, sample


@dataclass
class BlockResult:
    tokens: np.ndarray  # (B, prompt + generated) int32
    new_tokens: int
    evaluations: int  # denoising network calls
    commits: int  # cache passes (one per committed block)
    seconds: float


def generate_blocks(step: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], commit: Callable[[np.ndarray, int], None],
                    prompt: list[int], max_new: int, special: SpecialIds, sampler: SamplerConfig, block: int, max_len: int,
                    num_samples: int = 1) -> BlockResult:
    """`step(tokens (B, b), valid_len)` returns the block's top-K (log-probabilities, ids) over the cache's first
    `valid_len` positions; `commit(tokens, valid_len)` appends a final block's keys and values at `valid_len`."""
    total = min(len(prompt) + max_new, max_len)
    if len(prompt) >= total:
        raise DllmError(f"the prompt is {len(prompt)} tokens; this model's context is {max_len}, leaving no room to generate")
    t0 = time.perf_counter()
    out = np.full((num_samples, total), special.pad, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    first = len(prompt) // block
    for j in range(first):  # the prompt's complete blocks
        commit(out[:, j * block : (j + 1) * block], j * block)
    evaluations, commits, e = 0, first, 0
    for j in range(first, -(-total // block)):
        s, e = j * block, min((j + 1) * block, total)
        canvas = np.full((num_samples, block), special.mask, dtype=np.int32)
        fixed = np.zeros_like(canvas, dtype=bool)
        tail = max(0, len(prompt) - s)  # the prompt's part of this block
        canvas[:, :tail], fixed[:, :tail] = out[:, s : s + tail], True
        fixed[:, e - s :] = True  # past `total`: not generated (the graph's block is always whole)
        canvas[:, e - s :] = special.pad
        result = sample(lambda z, valid=s: step(z, valid), canvas, fixed, special, replace(sampler, seed=sampler.seed + j))
        evaluations += result.evaluations
        out[:, s:e] = result.tokens[:, : e - s]
        ended = ((result.tokens == special.eot) | (result.tokens == special.pad)) & ~fixed
        if ended.any(axis=1).all() or e == total:
            break
        commit(out[:, s:e], s)
        commits += 1
    return BlockResult(out[:, :e], max(0, e - len(prompt)), evaluations, commits, time.perf_counter() - t0)
