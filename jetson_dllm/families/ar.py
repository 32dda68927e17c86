"""The autoregressive baseline, at run time: token by token through the decode graph over the runner's KV cache,
numpy only, the same loop for every runner.

A `decode` call reads one token (its keys and values go into the cache at `valid_len`) and returns the next token's
top-K, sorted; each new token is read by the call that predicts the one after it. The start token and the prompt are
read first: by the verify graph where the runner has it (up to PREFILL tokens a call: a prompt in one call), else
one decode call per token. `--steps` does not apply: one network call per generated token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.families.common import (  # noqa: F401 (quality_length is part of the family interface)
    BenchRun,
    Generated,
    Served,
    check_bench_length,
    check_context,
    left_to_right_ids,
    left_to_right_request,
    quality_length,
)
from jetson_dllm.runners.calls import Call, drive
from jetson_dllm.sampler import SamplerConfig, candidate_distribution


@dataclass
class DecodeResult:
    tokens: np.ndarray  # (B, prompt + generated); end-of-text, then padding, after a row ends
    new_tokens: int  # tokens generated (decoding steps after the prompt)
    seconds: float
    step_ms: list[float] = field(default_factory=list)  # every network call's time, the prompt's included


@dataclass
class ArGeneration(Generated):
    """What the autoregressive baseline generated (`result`: a DecodeResult)."""

    def to_json(self) -> dict:
        r = self.result
        return {"texts": self.texts, "tokens": r.tokens.tolist(), "backend": self.backend, "new_tokens": r.new_tokens,
                "evaluations": len(r.step_ms), "total_ms": r.seconds * 1e3}

    def summary(self) -> str:
        return f"autoregressive: {self.result.new_tokens} tokens with a KV cache in {self.result.seconds * 1e3:.0f} ms"


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


PREFILL = 64  # the most prompt tokens one verify call reads


def prefill_calls(tokens: list[int], rows: int, prefill: int, times: list[float] | None = None) -> Generator[Call, dict, dict]:
    """`tokens` read into the cache from position 0 (their keys and values written): verify calls of up to `prefill`
    tokens, or one decode call per token when `prefill` is 0; the last call's outputs at its last token (the next
    token's top-K, shaped (rows, 1, K)). Each call's time goes into `times`."""
    got, at = {}, 0
    while at < len(tokens):
        w = min(prefill, len(tokens) - at) if prefill else 1
        s = time.perf_counter()
        feeds = {"tokens": np.tile(np.asarray(tokens[at : at + w], np.int32), (rows, 1)), "valid_len": np.int32(at)}
        got = yield Call("verify" if prefill else "decode", feeds)
        if times is not None:
            times.append((time.perf_counter() - s) * 1e3)
        at += w
    return {k: v[:, -1:] for k, v in got.items()}


def decode_calls(prompt: list[int], max_new: int, bos: int, eot: int, pad: int, max_len: int, num_samples: int = 1,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_at_end: bool = True, on_token: Callable[[np.ndarray], None] | None = None,
                 prefill: int = 0) -> Generator[Call, dict, DecodeResult]:
    """Continuations of `prompt` as decode calls; rows stop at end-of-text (`stop_at_end=False`: exactly `max_new`
    tokens). `on_token(text so far)` sees each new token (the server streams it). `prefill`: the start token and the
    prompt read by verify calls of up to that many tokens (0: one decode call each)."""
    max_new = min(max_new, max_len - len(prompt))  # the cache holds the start token, the prompt and max_new - 1 more
    if max_new <= 0:
        raise DllmError(f"the prompt is {len(prompt)} tokens; the model takes {max_len}")
    rng = np.random.default_rng(seed)
    B, t0, times = num_samples, time.perf_counter(), []

    def call(token: np.ndarray, valid: int):
        return Call("decode", {"tokens": np.asarray(token, np.int32).reshape(B, 1), "valid_len": np.int32(valid)})

    got = yield from prefill_calls([bos, *prompt], B, prefill, times)
    out = np.full((B, len(prompt) + max_new), pad, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    done = np.zeros(B, dtype=bool)
    i = 0
    while True:
        nxt = np.where(done, pad, _pick(got["topk_logprobs"][:, 0], got["topk_ids"][:, 0], () if stop_at_end else (eot, pad),
                                        temperature, top_k, top_p, rng))
        out[:, len(prompt) + i] = nxt
        if on_token is not None:
            on_token(out[:, : len(prompt) + i + 1])
        done |= nxt == eot
        if done.all() or i == max_new - 1:
            return DecodeResult(out, i + 1, time.perf_counter() - t0, times)
        s = time.perf_counter()
        got = yield call(nxt, 1 + len(prompt) + i)  # the token just chosen is read by the call that predicts the next
        times.append((time.perf_counter() - s) * 1e3)
        i += 1


def prefill_of(runner) -> int:
    """The most prompt tokens a call of this runner reads: PREFILL with the verify graph, 0 (one a call) without it (a
    bundle exported before it came)."""
    return min(PREFILL, runner.cfg.canvas_len) if "verify" in runner.graphs else 0


def decode_tokens(runner, prompt_ids: list[int], max_new: int, num_samples: int, sampler: SamplerConfig,
                  stop_at_end: bool = True) -> DecodeResult:
    """`decode_calls` on a runner, from the tokenizer's start token (end-of-text for our own tokenizers), the prompt
    read by verify calls where the runner has the graph."""
    tok = runner.tokenizer
    return drive(runner, decode_calls(prompt_ids, max_new, tok.bos_id, tok.eot_id, tok.pad_id, runner.cfg.canvas_len,
                                      num_samples, sampler.temperature, sampler.top_k, sampler.top_p, sampler.seed, stop_at_end,
                                      prefill=prefill_of(runner)))


def serve_calls(runner, prompt: str, suffix: str | None, max_tokens: int, n: int, sampler: SamplerConfig, on_step=None) -> Served:
    """A server request: `max_tokens` tokens after the prompt, one decode call per token over the request's own
    cache rows; `on_step(text so far, None)` sees each token."""
    ids = left_to_right_ids(runner, prompt, "the autoregressive baseline")
    fixed = left_to_right_request(runner, ids, max_tokens, n)  # the start token, and the last token is never read
    tok = runner.tokenizer
    calls = decode_calls(ids, max_tokens, tok.bos_id, tok.eot_id, tok.pad_id, runner.cfg.canvas_len, n, sampler.temperature,
                         sampler.top_k, sampler.top_p, sampler.seed, on_token=None if on_step is None else (lambda view: on_step(view, None)),
                         prefill=prefill_of(runner))
    return Served(calls, fixed)


def complete(runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None, gap: int = 12,
             on_step=None) -> ArGeneration:
    sampler = (sampler or SamplerConfig()).validate()
    ids = left_to_right_ids(runner, prompt, "the autoregressive baseline")
    check_context(runner, [runner.tokenizer.bos_id, *ids], length and length - 1)  # the start token, the last token never read
    r = decode_tokens(runner, ids, length or runner.cfg.canvas_len - len(ids), num_samples, sampler)
    return ArGeneration([runner.tokenizer.decode(row) for row in r.tokens], r, runner.name)


def bench_generate(runner, name: str, batch: int, tokens: int, sampler: SamplerConfig) -> BenchRun:
    """`tokens` tokens one by one from the start token, end-of-text banned; `steps` does not apply."""
    check_bench_length(runner, name, tokens)
    r = decode_tokens(runner, [], tokens, batch, SamplerConfig(temperature=0.0), stop_at_end=False)
    return BenchRun(r.seconds, r.step_ms, r.seconds - sum(r.step_ms) / 1e3, len(r.step_ms))
