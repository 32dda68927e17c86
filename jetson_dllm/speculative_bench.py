"""`dllm bench PARENT --draft CHILD`: speculative decoding against the parent alone, in one run, on one machine.

Per point (draft steps, and the parent alone): generated tokens/s (prompt read and all, median of `repeats` timed
runs after `warmup`), network calls per generated token with both models counted (the prompt's prefill apart: the
parent alone is one call per token but the first, which its prefill's last position gives), tokens accepted per
round, each model's milliseconds per call, and whether the greedy text is the parent's own. `launch_bound_speedup`
is the parent's calls per token over the point's: the speed-up on a device where every call costs about the same
(a launch-bound Jetson, docs/speculative.md), where the CPU's `speedup` also pays for each call's arithmetic.
numpy only: any runner pair.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, fields

from jetson_dllm.families.ar import decode_tokens
from jetson_dllm.runners.calls import DRAFT, MAIN, drive
from jetson_dllm.sampler import SamplerConfig
from jetson_dllm.speculative import open_drafter, speculative_loop


@dataclass
class SpeculativePoint:
    draft_steps: int  # 0: the parent alone
    tokens: int  # generated, all prompts
    seconds: float  # median over the timed repeats, all prompts
    calls_per_token: float
    accepted_per_round: float = 0.0
    rounds: int = 0
    verify_ms: float = 0.0  # per verify call (the parent alone: per decode call)
    drafter_ms: float = 0.0  # per drafter call
    identical: bool = True  # the text is the parent's own (always so under greedy; sampled: not compared)
    accepted_by_offset: list[float] = field(default_factory=list)  # P(the i-th drafted token accepted | drafted)
    results: list = field(default_factory=list, repr=False)  # the last timed run's SpeculativeResult per prompt (not in the JSON)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def parent_alone(verifier, prompt: list[int], tokens: int, sampler: SamplerConfig, stop_at_end: bool):
    """The parent's own decoding of one prompt (its prefill included): a DecodeResult."""
    return decode_tokens(verifier, prompt, tokens, 1, sampler, stop_at_end)


def speculate(verifier, drafter, steps: int, prompt: list[int], tokens: int, sampler: SamplerConfig, stop_at_end: bool):
    """One prompt written speculatively: a SpeculativeResult."""
    return drive({MAIN: verifier, DRAFT: drafter}, speculative_loop(verifier, drafter, steps, prompt, tokens, sampler, stop_at_end))


def same_text(alone, spec) -> bool:
    """The speculative text is the parent's own: the same tokens, as many (the parent's rows pad after an end)."""
    n = spec.tokens.shape[1]
    return alone.new_tokens == spec.new_tokens and alone.tokens[0, :n].tolist() == spec.tokens[0].tolist()


def _timed(fn, repeats: int, warmup: int):
    """(the last run's results, the median seconds of the timed runs)."""
    for _ in range(warmup):
        fn()
    seconds, results = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = fn()
        seconds.append(time.perf_counter() - t0)
    return results, statistics.median(seconds)


def bench_speculative(verifier, drafter, draft_steps: list[int], tokens: int, prompts: list[list[int]] | None = None,
                      sampler: SamplerConfig | None = None, repeats: int = 3, warmup: int = 1, stop_at_end: bool = False) -> list[SpeculativePoint]:
    """The parent alone, then the parent with the drafter at each of `draft_steps`, over every prompt (ids; default:
    the start token only), `tokens` tokens each (`stop_at_end=False`: end-of-text banned, every run the same length)."""
    sampler = (sampler or SamplerConfig(temperature=0.0)).validate()
    prompts = prompts if prompts is not None else [[]]
    for steps in draft_steps:
        open_drafter(verifier, drafter, steps)  # every setting checked before anything is timed
    alone, seconds = _timed(lambda: [parent_alone(verifier, p, tokens, sampler, stop_at_end) for p in prompts], repeats, warmup)
    made = sum(r.new_tokens for r in alone)
    decode_ms = [ms for r in alone for ms in r.step_ms[len(r.step_ms) - r.new_tokens + 1 :]] or [0.0]  # after the prefill
    # after the prefill, one decode call per token but the first (the prefill's last position gives it)
    points = [SpeculativePoint(0, made, seconds, sum(r.new_tokens - 1 for r in alone) / max(made, 1), verify_ms=statistics.mean(decode_ms))]
    for steps in draft_steps:
        runs, seconds = _timed(lambda s=steps: [speculate(verifier, drafter, s, p, tokens, sampler, stop_at_end) for p in prompts], repeats, warmup)
        rounds, drafter_calls = sum(r.rounds for r in runs), sum(r.drafter_calls for r in runs)
        offsets = max((d for r in runs for d in r.drafted_at), default=0)
        by_offset = [sum(a > i for r in runs for a, d in zip(r.accepted_at, r.drafted_at) if d > i)
                     / max(1, sum(d > i for r in runs for d in r.drafted_at)) for i in range(offsets)]
        points.append(SpeculativePoint(
            steps, sum(r.new_tokens for r in runs), seconds, sum(r.rounds + r.drafter_calls for r in runs) / max(1, sum(r.new_tokens for r in runs)),
            sum(r.accepted for r in runs) / max(rounds, 1), rounds, 1e3 * sum(r.verify_s for r in runs) / max(rounds, 1),
            1e3 * sum(r.drafter_s for r in runs) / max(drafter_calls, 1),
            sampler.temperature > 0 or all(same_text(a, r) for a, r in zip(alone, runs)), by_offset, runs))
    return points


def points_json(points: list[SpeculativePoint]) -> list[dict]:
    parent = points[0]
    return [{**{f.name: getattr(p, f.name) for f in fields(p) if f.name != "results"}, "tokens_per_s": p.tokens_per_s, "speedup": p.tokens_per_s / max(parent.tokens_per_s, 1e-9),
             "launch_bound_speedup": parent.calls_per_token / max(p.calls_per_token, 1e-9)} for p in points]


def points_table(points: list[SpeculativePoint], title: str):
    """The points as a rich table, the parent alone first."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("setting", "tokens/s", "speed-up", "calls/token (both)", "launch-bound speed-up", "accepted/round", "verify ms/call",
                "drafter ms/call", "parent's text"):
        table.add_column(col, justify="right" if col != "setting" else "left")
    for p in points_json(points):
        table.add_row("parent alone" if not p["draft_steps"] else f"draft steps {p['draft_steps']}", f"{p['tokens_per_s']:.1f}", f"{p['speedup']:.2f}x",
                      f"{p['calls_per_token']:.2f}", f"{p['launch_bound_speedup']:.2f}x", f"{p['accepted_per_round']:.2f}" if p["draft_steps"] else "-",
                      f"{p['verify_ms']:.2f}", f"{p['drafter_ms']:.2f}" if p["draft_steps"] else "-", "yes" if p["identical"] else "NO")
    return table


BENCH_REFUSES = {"config": "--config", "steps": "--steps", "batch": "--batch", "strategy": "--strategy", "quality": "--quality",
                 "judge": "--judge", "isolate": "--isolate"}


def run_bench(models: list, draft, draft_steps: list[int], canvas: list[int], given: set[str], backend: str = "onnx", precision: str = "fp32",
              threads: int = 0, repeats: int = 3, warmup: int = 1, out_dir=None) -> tuple[list[SpeculativePoint], str]:
    """`dllm bench PARENT --draft CHILD`: one parent, one backend and precision, `canvas` (one value) tokens generated;
    the sweep options of the ordinary bench refused. The points and the table's title; the points also go to
    OUT/speculative.json."""
    import json
    from pathlib import Path

    from jetson_dllm.errors import DllmError
    from jetson_dllm.generate import open_model

    if draft is None:
        raise DllmError("--draft-steps is for speculative decoding: give the drafter with --draft")
    refused = [flag for name, flag in BENCH_REFUSES.items() if name in given]
    if refused:
        raise DllmError(f"{refused[0]} does not apply with --draft (the bench compares the parent alone and with its drafter); leave it out")
    if len(models or []) != 1:
        raise DllmError("--draft benches one parent: give exactly one model (the AR parent) before --draft")
    if "," in backend or "," in precision or len(canvas) != 1:
        raise DllmError("--draft benches one backend, one precision and one --canvas (the tokens generated)")
    with open_model(models[0], backend=backend, precision=precision, threads=threads) as verifier, \
            open_model(draft, backend=backend, precision=precision, threads=threads) as drafter:
        points = bench_speculative(verifier, drafter, draft_steps, canvas[0], repeats=repeats, warmup=warmup)
        title = f"speculative decoding: {Path(models[0]).name} verifying, {Path(draft).name} drafting ({verifier.name}, {canvas[0]} tokens, greedy)"
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "speculative.json").write_text(json.dumps({"title": title, "points": points_json(points)}, indent=1))
    return points, title
