"""Block-by-block generation, the same for every runner: the sampler denoises one block at a time while the blocks
before it sit in an exact KV cache that the runner keeps (torch tensors, or buffers bound once to onnxruntime).

Blocks are aligned to position 0, as the model was trained: the prompt's complete blocks are committed first, the
prompt's tail becomes fixed tokens of the first noised block, and each block, once final, is committed (its keys
and values appended at the cache's valid length). A runner with a commit-step graph folds that commit into the next
block's first network call instead (the same keys and values, one call fewer per block). Generation ends at an
end-of-text or after `max_new` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import SamplerConfig, SpecialIds, Step, sample

OnStep = Callable[[np.ndarray, Step], None]


@dataclass
class BlockResult:
    tokens: np.ndarray  # (B, prompt + generated) int32
    new_tokens: int
    evaluations: int  # denoising network calls
    commits: int  # cache passes (one per committed block)
    seconds: float
    step_ms: list[float] = field(default_factory=list)  # each network evaluation's time
    commit_ms: list[float] = field(default_factory=list)  # each cache pass's time
    sampler_s: float = 0.0  # the sampler's own time, all blocks
    folded: int = 0  # commits done inside the next block's first step (no cache pass of their own)


class _Steps:
    """The sampler's network for one block: the block step, or for its first call, when a finished block is pending,
    the commit step (that block's commit and this block's step in one call)."""

    def __init__(self, step, commit_step, valid: int, pending: tuple[np.ndarray, int] | None):
        self.step, self.commit_step, self.valid, self.pending = step, commit_step, valid, pending
        self.folded = 0

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pending is None:
            return self.step(z, self.valid)
        (prev, start), self.pending = self.pending, None
        self.folded += 1
        return self.commit_step(prev, z, start)


class _Timed:
    """A commit callable that keeps each call's time."""

    def __init__(self, commit: Callable[[np.ndarray, int], None]):
        self.commit, self.ms = commit, []

    def __call__(self, tokens: np.ndarray, valid: int) -> None:
        t0 = time.perf_counter()
        self.commit(tokens, valid)
        self.ms.append((time.perf_counter() - t0) * 1e3)


def _relay(on_step: OnStep | None, out: np.ndarray, s: int, e: int) -> OnStep | None:
    """The sampler's per-step callback for one block, shown on the whole text so far (the stream grows block by
    block: earlier blocks final, this one denoising, later ones not there yet)."""
    if on_step is None:
        return None

    def relay(canvas: np.ndarray, step: Step) -> None:
        view = out[:, :e].copy()
        view[:, s:e] = canvas[:, : e - s]
        committed = np.zeros(view.shape, dtype=bool)
        committed[:, s:e] = step.committed[:, : e - s]
        on_step(view, replace(step, committed=committed))

    return relay


def generate_blocks(step: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], commit: Callable[[np.ndarray, int], None],
                    prompt: list[int], max_new: int, special: SpecialIds, sampler: SamplerConfig, block: int, max_len: int,
                    num_samples: int = 1, on_step: OnStep | None = None, commit_step=None) -> BlockResult:
    """`step(tokens (B, b), valid_len)` returns the block's top-K (log-probabilities, ids) over the cache's first
    `valid_len` positions; `commit(tokens, valid_len)` appends a final block's keys and values at `valid_len`;
    `commit_step(previous block, tokens, its start)`, when the runner has it, does both in one call.
    `on_step(text so far, Step)` sees every denoising step (the live view)."""
    total = min(len(prompt) + max_new, max_len)
    if len(prompt) >= total:
        raise DllmError(f"the prompt is {len(prompt)} tokens; this model's context is {max_len}, leaving no room to generate")
    t0 = time.perf_counter()
    commit = _Timed(commit)
    step_ms, sampler_s = [], 0.0
    out = np.full((num_samples, total), special.pad, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    first = len(prompt) // block
    for j in range(first):  # the prompt's complete blocks
        commit(out[:, j * block : (j + 1) * block], j * block)
    evaluations, commits, e, folded, pending = 0, first, 0, 0, None
    for j in range(first, -(-total // block)):
        s, e = j * block, min((j + 1) * block, total)
        canvas = np.full((num_samples, block), special.mask, dtype=np.int32)
        fixed = np.zeros_like(canvas, dtype=bool)
        tail = max(0, len(prompt) - s)  # the prompt's part of this block
        canvas[:, :tail], fixed[:, :tail] = out[:, s : s + tail], True
        fixed[:, e - s :] = True  # past `total`: not generated (the graph's block is always whole)
        canvas[:, e - s :] = special.pad
        network = _Steps(step, commit_step, s, pending)
        result = sample(network, canvas, fixed, special, replace(sampler, seed=sampler.seed + j), on_step=_relay(on_step, out, s, e))
        folded += network.folded
        if network.pending is not None:  # no network call in this block (nothing to denoise): commit on its own
            commit(*network.pending)
            commits += 1
        evaluations += result.evaluations
        step_ms += [h.network_ms for h in result.history if h.evaluated]
        sampler_s += result.sampler_s
        out[:, s:e] = result.tokens[:, : e - s]
        ended = ((result.tokens == special.eot) | (result.tokens == special.pad)) & ~fixed
        if ended.any(axis=1).all() or e == total:
            break
        if commit_step is not None:
            pending = (out[:, s:e].copy(), s)
        else:
            commit(out[:, s:e], s)
            commits += 1
    return BlockResult(out[:, :e], max(0, e - len(prompt)), evaluations, commits, time.perf_counter() - t0, step_ms, commit.ms,
                       sampler_s, folded)
