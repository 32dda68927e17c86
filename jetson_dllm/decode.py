"""Token-by-token decoding for the autoregressive baseline on any runner that has a decode step with a KV cache
(train_host/ar_export.py's graph): numpy only, the same for every runtime, as jetson_dllm.blocks is for block diffusion.

`step(tokens (B, 1), valid_len)` returns the next token's top-K (log-probabilities, ids), sorted, and has written
the read token's keys and values into the runner's cache at `valid_len`. The start token and the prompt are read
one per step; each new token is read by the step that predicts the one after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import candidate_distribution


@dataclass
class DecodeResult:
    tokens: np.ndarray  # (B, prompt + generated); end-of-text, then padding, after a row ends
    new_tokens: int  # tokens generated (decoding steps after the prompt)
    seconds: float
    step_ms: list[float] = field(default_factory=list)  # every network call's time, the prompt's included


def _pick(lp: np.ndarray, ids: np.ndarray, banned: tuple[int, ...], temperature: float, top_k: int, top_p: float,
          rng: np.random.Generator) -> np.ndarray:
    """The next token of every row from its top-K; `banned` ids (end-of-text for fixed-length runs) never chosen."""
    if banned:
        lp = np.where(np.isin(ids, banned), -np.inf, lp)
        order = np.argsort(-lp, axis=-1, kind="stable")
        lp, ids = np.take_along_axis(lp, order, -1), np.take_along_axis(ids, order, -1)
    if temperature == 0:
        return ids[:, 0]
    scores = candidate_distribution(lp, temperature, top_k, top_p)
    gumbel = -np.log(-np.log(rng.random(scores.shape) + 1e-20) + 1e-20)
    return ids[np.arange(len(ids)), np.argmax(scores + gumbel, -1)]


def decode_tokens(step: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]], prompt: list[int], max_new: int,
                  bos: int, eot: int, pad: int, max_len: int, num_samples: int = 1, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_end: bool = True) -> DecodeResult:
    """Sample continuations of `prompt`; rows stop at end-of-text (`stop_at_end=False`: exactly `max_new` tokens)."""
    max_new = min(max_new, max_len - len(prompt))  # the cache holds the start token, the prompt and max_new - 1 more
    if max_new <= 0:
        raise DllmError(f"the prompt is {len(prompt)} tokens; the model takes {max_len}")
    rng = np.random.default_rng(seed)
    B, t0, times = num_samples, time.perf_counter(), []

    def timed(tokens: np.ndarray, valid: int):
        s = time.perf_counter()
        out = step(tokens.reshape(B, 1).astype(np.int32), valid)
        times.append((time.perf_counter() - s) * 1e3)
        return out

    for i, t in enumerate([bos] + prompt):
        lp, ids = timed(np.full(B, t), i)
    out = np.full((B, len(prompt) + max_new), pad, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    done = np.zeros(B, dtype=bool)
    i = 0
    while True:
        nxt = np.where(done, pad, _pick(lp[:, 0], ids[:, 0], () if stop_at_end else (eot, pad), temperature, top_k, top_p, rng))
        out[:, len(prompt) + i] = nxt
        done |= nxt == eot
        if done.all() or i == max_new - 1:
            return DecodeResult(out, i + 1, time.perf_counter() - t0, times)
        lp, ids = timed(nxt, 1 + len(prompt) + i)  # the token just chosen is read by the call that predicts the next
        i += 1
