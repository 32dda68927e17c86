"""`dllm bench`: latency vs steps, memory and power, over configs, backends, precisions and shapes.

A sweep is a list of groups (one model on one runner at one precision); each group runs in a fresh
worker process (`python -m jetson_dllm.bench`), so its peak RSS is its own and a big config does not
leave memory behind for the next. A group's points are (batch, canvas, steps, strategy); each point is
generated `warmup` times unmeasured, then `repeats` times measured. Generation runs at fixed length
(ends banned), so every point runs exactly the steps it names, and latency does not depend on what the
weights happen to predict; random weights (`--config`) therefore measure the same as trained ones.

This module knows bundle and checkpoint paths only: the random-weight models of a config sweep are made
by `python -m train_host.bench_models` in a process of its own (the host side; it needs torch), and
generative perplexity reaches the sweep as a callable (`judge`, texts -> perplexity).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from jetson_dllm.bench_report import check_writable, environment, write_outputs
from jetson_dllm.config import BENCH_VOCAB, SIZES, ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.generate import complete
from jetson_dllm.precisions import PRECISIONS, RUNNERS, for_runner, parse_precisions
from jetson_dllm.profiler import PeakRSS, PowerMonitor, memory_plan, read_meminfo, unified_memory
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import STRATEGIES, SamplerConfig
from jetson_dllm.textstats import distinct, repetition

QUALITY_PROMPT = "Once upon a time"


@dataclass
class Group:
    """One model on one runner at one precision, and the points to measure on it."""

    model: str  # a config name (random weights) or a path (checkpoint for torch, bundle for onnx/trt)
    backend: str
    precision: str
    points: list[dict]  # {batch, canvas, steps, strategy}
    repeats: int = 3
    warmup: int = 1
    threads: int = 0
    canvas_len: int = 256
    quality: bool = False  # also generate with ends allowed, for the quality columns
    quality_samples: int = 8
    path: str = ""  # what the runner opens: the model itself, or the prepared random-weight model of a config


@dataclass
class Result:
    model: str
    backend: str
    precision: str
    batch: int
    canvas: int
    steps: int
    strategy: str
    evaluations: float
    step_ms_median: float
    step_ms_p90: float
    generation_ms: float
    generation_ms_spread: float  # (max - min) / median of the whole-generation times
    tokens_per_s: float
    sampler_share: float  # the sampler's own time / the whole generation
    peak_rss_mb: float
    weights_mb: float
    device_mb: float | None = None
    memory_available_mb: float | None = None
    gpu_nvmap_mb: float | None = None
    power_mw: float | None = None
    energy_mj_per_token: float | None = None
    repeats: int = 0
    gen_ppl: float | None = None  # --quality: generative perplexity under the judge
    repetition: float | None = None  # --quality
    distinct2: float | None = None  # --quality
    block_size: int = 0  # a block-diffusion model: its block; `steps` is then steps per block, `canvas` tokens generated
    cache_passes: float = 0.0  # block diffusion: commits of finished blocks to the KV cache, per generation (calls of their own)
    folded_commits: float = 0.0  # block diffusion: commits done inside the next block's first step
    commit_ms_median: float | None = None
    extra: dict = field(default_factory=dict)


# --- planning a sweep ---------------------------------------------------------------------------------


def plan(
    models: list[str],
    backends: list[str],
    precisions: list[str],
    steps: list[int],
    canvases: list[int],
    batches: list[int],
    strategies: list[str],
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 0,
) -> list[Group]:
    """Validate a sweep and cut it into groups; a clear error for anything out of range or unknown."""
    for b in backends:
        if b not in RUNNERS:
            raise DllmError(f"unknown backend {b!r}; choose from {', '.join(RUNNERS)}")
    parse_precisions(",".join(precisions))
    for s in strategies:
        if s not in STRATEGIES:
            raise DllmError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    for v, what in [(steps, "--steps"), (canvases, "--canvas"), (batches, "--batch")]:
        if not v or min(v) < 1:
            raise DllmError(f"{what} values must be positive")
    if repeats < 1 or warmup < 0 or threads < 0:
        raise DllmError("--repeats must be at least 1, --warmup and --threads not negative")
    for m in models:
        if m not in SIZES and not Path(m).exists():
            raise DllmError(f"unknown config or missing path {m!r}; configs: {', '.join(SIZES)}, or a bundle / checkpoint folder")
    canvas_len = max(canvases)
    points = [{"batch": b, "canvas": c, "steps": s, "strategy": st} for b in batches for c in canvases for s in steps for st in strategies]
    groups = [Group(m, b, p, points, repeats, warmup, threads, canvas_len)
              for m in models for b in backends for p in precisions if p in for_runner(b)]
    if not groups:
        raise DllmError(f"no backend takes the precisions {precisions}: " +
                        "; ".join(f"{r} runs {'/'.join(for_runner(r))}" for r in RUNNERS))
    return groups


def memory_needed(group: Group) -> int:
    """A generous estimate of a group's peak memory (bytes): the run (profiler.memory_plan, the one estimator)
    with the weights held twice by the host runtime and, for random configs, the export beside it."""
    if group.model not in SIZES:
        return 0
    cfg = ModelConfig.from_name(group.model, vocab_size=BENCH_VOCAB, canvas_len=group.canvas_len)
    B = max(p["batch"] for p in group.points)
    T = max(p["canvas"] for p in group.points)
    run = memory_plan(cfg, "fp32", B, T, device=False)
    export = 4 * cfg.weight_bytes("fp32") if group.backend != "torch" else 0  # torch model + graph + fp16 / quantized copies
    return int(run["run_total"] + cfg.weight_bytes("fp32") + export)


def check_memory(groups: list[Group], available: int) -> None:
    if not available:
        return
    for g in groups:
        need = memory_needed(g)
        if need > available:
            raise DllmError(f"{g.model} on {g.backend} ({g.precision}) needs about {need / 2**30:.1f} GiB, but "
                            f"{available / 2**30:.1f} GiB is available; leave it out of the sweep (or lower --canvas / --batch)")


# --- measuring ----------------------------------------------------------------------------------------


def measure_group(group: Group) -> list[Result]:
    """Run one group in this process (the worker) and return its results."""
    options = {"threads": group.threads} if group.backend in ("torch", "onnx") else {}
    with open_runner(group.backend, group.path or group.model, precision=group.precision, **options) as runner:
        return [measure_point(runner, group, p) for p in group.points]


def measure_point(runner, group: Group, p: dict) -> Result:
    """One (batch, canvas, steps, strategy) point: warm-up, then `repeats` timed generations of `canvas` tokens at
    fixed length (ends banned), each through the model family's loop (`bench_generate`)."""
    family = family_of(runner.cfg).runtime_module()
    name = Path(group.model).name if group.model not in SIZES else group.model
    cfg = SamplerConfig(steps=p["steps"], strategy=p["strategy"], seed=0, allow_end=False)
    for _ in range(group.warmup):
        family.bench_generate(runner, name, p["batch"], p["canvas"], cfg)
    runs = []
    with PeakRSS() as rss, PowerMonitor() as power:
        for _ in range(group.repeats):
            runs.append(family.bench_generate(runner, name, p["batch"], p["canvas"], cfg))
    step_ms = [ms for r in runs for ms in r.call_ms]
    more = {}
    if "commits" in runs[0].extra:  # a cached family's cache passes (block diffusion)
        commit_ms = [ms for r in runs for ms in r.extra["commit_ms"]]
        more = {"block_size": runs[0].extra["block_size"], "cache_passes": float(np.mean([r.extra["commits"] for r in runs])),
                "folded_commits": float(np.mean([r.extra["folded"] for r in runs])),
                "commit_ms_median": float(np.median(commit_ms)) if commit_ms else None}
    return _result(runner, group, p, name, step_ms, [r.seconds for r in runs], [r.sampler_s for r in runs],
                   [r.evaluations for r in runs], rss, power, **more)


def _result(runner, group: Group, p: dict, name: str, step_ms, totals, sampler_s, evals, rss, power, **more) -> Result:
    gen = float(np.median(totals))
    generated = p["batch"] * p["canvas"]
    mem, unified = runner.memory(), unified_memory()
    result = Result(
        model=name, backend=group.backend, precision=group.precision, batch=p["batch"], canvas=p["canvas"],
        steps=p["steps"], strategy=p["strategy"], evaluations=float(np.mean(evals)),
        step_ms_median=float(np.median(step_ms)), step_ms_p90=float(np.percentile(step_ms, 90)),
        generation_ms=gen * 1e3, generation_ms_spread=float((max(totals) - min(totals)) / gen),
        tokens_per_s=generated / gen, sampler_share=float(np.sum(sampler_s) / np.sum(totals)),
        peak_rss_mb=rss.peak / 2**20, weights_mb=mem.get("weights", 0) / 2**20,
        device_mb=mem["device_used"] / 2**20 if "device_used" in mem else None,
        memory_available_mb=unified.get("available", 0) / 2**20 or None,
        gpu_nvmap_mb=unified["gpu_nvmap"] / 2**20 if "gpu_nvmap" in unified else None,
        repeats=group.repeats, **more,
    )
    if power.mean_mw is not None:
        result.power_mw = power.mean_mw
        result.energy_mj_per_token = power.mean_mw * gen / generated  # mW * s / token = mJ / token
        result.extra["power_source"] = power.source
    if group.quality:
        quality_samples(result, runner, p, group)
    return result


def quality_samples(result: Result, runner, point: dict, group: Group) -> None:
    """Generate `quality_samples` stories at the point's settings (ends allowed); repetition and distinct-2
    here, the texts kept for the judge (who runs in the parent process, after every group)."""
    cfg = SamplerConfig(steps=point["steps"], strategy=point["strategy"], temperature=0.8, seed=1)
    length = family_of(runner.cfg).runtime_module().quality_length(runner, runner.tokenizer.encode(QUALITY_PROMPT), point["canvas"])
    texts = complete(runner, QUALITY_PROMPT, length=length, num_samples=group.quality_samples, sampler=cfg).texts
    result.repetition = float(np.mean([repetition(t) for t in texts])) if texts else 0.0
    result.distinct2 = distinct(texts, 2)
    result.extra["samples"] = texts


def prepare_group(group: Group) -> None:
    """Make what a config-name group runs (random-weight checkpoint, exported bundle), if it is not cached,
    in a process of its own (it needs torch), and point the group at it."""
    if group.model not in SIZES:
        group.path = group.model
        return
    precisions = ("fp32", "fp16", "int8") if PRECISIONS[group.precision].weight_bytes == 1 else ("fp32", "fp16")
    kind = "checkpoint" if group.backend == "torch" else "bundle"
    cmd = [sys.executable, "-m", "train_host.bench_models", kind, group.model, str(group.canvas_len), ",".join(precisions)]
    group.path = _last_line(subprocess.run(cmd, capture_output=True, text=True), group)


def _last_line(proc: subprocess.CompletedProcess, group: Group) -> str:
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        message = next((ln[7:] for ln in proc.stderr.splitlines() if ln.startswith("error: ")), None)
        raise DllmError(message or f"the {group.model} / {group.backend} / {group.precision} worker failed: {proc.stderr.strip()[-300:]}")
    return lines[-1]


def _in_worker(group: Group) -> list[Result]:
    """Measure a group in a fresh process; its results."""
    proc = subprocess.run([sys.executable, "-m", "jetson_dllm.bench"], input=json.dumps(asdict(group)), capture_output=True, text=True)
    return [Result(**r) for r in json.loads(_last_line(proc, group))]


def run_groups(groups: list[Group], isolate: bool = True, progress=None, judge: Callable[[list[str]], float] | None = None) -> list[Result]:
    """Measure every group, each in a fresh worker process unless `isolate` is off; `judge` scores the quality
    samples (generative perplexity) once every group is measured. The samples stay in each result's `extra`
    (bench.json), so other judges can score the same texts (benchmarks/rejudge.py).

    A config-name group is prepared (checkpoint, export, calibration) in a process of its own first, so
    the measuring process holds only the runner: its RSS is what running the model costs, not torch's
    leftovers from exporting it.
    """
    results = []
    for i, group in enumerate(groups):
        if progress:
            progress(i, len(groups), group)
        prepare_group(group)
        results += _in_worker(group) if isolate else measure_group(group)
    if progress:
        progress(len(groups), len(groups), None)
    for r in results:
        texts = r.extra.get("samples")  # kept in bench.json: another judge can score the same texts later
        if texts is not None and judge is not None:
            r.gen_ppl = judge(texts)
    return results


def run_sweep(models: list[str], backends: list[str], precisions: list[str], steps: list[int], canvases: list[int], batches: list[int],
              strategies: list[str], repeats: int = 3, warmup: int = 1, threads: int = 0, out_dir: Path = Path("runs/bench"),
              isolate: bool = True, quality: bool = False, judge: Callable[[list[str]], float] | None = None,
              quality_samples: int = 8, progress=None) -> tuple[list[Result], dict, dict[str, Path]]:
    """`dllm bench`: plan the sweep, check it fits in memory and that `out_dir` is writable, measure every
    group, write bench.csv / .json / .md and the figure. Returns (results, environment, written paths)."""
    if not models:
        raise DllmError("nothing to measure: give bundles / checkpoints, or --config tiny,small,... (or all)")
    if quality_samples < 1:
        raise DllmError(f"--quality-samples must be positive, got {quality_samples}")
    groups = plan(models, backends, precisions, steps, canvases, batches, strategies, repeats=repeats, warmup=warmup, threads=threads)
    for g in groups:
        g.quality, g.quality_samples = quality, quality_samples
    check_memory(groups, read_meminfo().get("MemAvailable", 0))
    check_writable(out_dir)
    env = environment()
    results = run_groups(groups, isolate=isolate, progress=progress, judge=judge)
    return results, env, write_outputs(results, env, Path(out_dir))


def _worker() -> None:
    """The worker process: one Group as JSON on stdin; prints its results as JSON on the last stdout line."""
    group = Group(**json.loads(sys.stdin.read()))
    try:
        print(json.dumps([asdict(r) for r in measure_group(group)]))
    except DllmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _worker()
