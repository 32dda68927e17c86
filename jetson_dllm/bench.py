"""`dllm bench`: latency vs steps, memory and power, over configs, backends, precisions and shapes.

A sweep is a list of groups (one model on one backend at one precision); each group runs in a fresh
worker process (`python -m jetson_dllm.bench`), so its peak RSS is its own and a big config does not
leave memory behind for the next. A group's points are (batch, canvas, steps, strategy); each point is
generated `warmup` times unmeasured, then `repeats` times measured. Generation runs at fixed length
(ends banned), so every point runs exactly the steps it names, and latency does not depend on what the
weights happen to predict; random weights (`--config`) therefore measure the same as trained ones.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from jetson_dllm.config import SIZES, ModelConfig
from jetson_dllm.errors import DllmError

BACKENDS = ("torch", "onnx", "trt")
PRECISIONS = {"torch": ("fp32",), "onnx": ("fp32", "fp16", "int8", "int8-dynamic"), "trt": ("fp16", "int8", "fp32")}
CACHE = Path(os.environ.get("JETSON_DLLM_CACHE", Path.home() / ".cache" / "jetson-dllm"))
BENCH_VOCAB = 8192


@dataclass
class Group:
    """One model on one backend at one precision, and the points to measure on it."""

    model: str  # a config name (random weights) or a path (checkpoint for torch, bundle for onnx/trt)
    backend: str
    precision: str
    points: list[dict]  # {batch, canvas, steps, strategy}
    repeats: int = 3
    warmup: int = 1
    threads: int = 0
    canvas_len: int = 256
    quality: bool = False  # also generate with ends allowed and judge the text
    judge: str | None = None
    quality_samples: int = 8


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
    extra: dict = field(default_factory=dict)


# --- models for a sweep -------------------------------------------------------------------------------


def random_model_dir(name: str, canvas_len: int) -> Path:
    """A checkpoint with random weights for a named config (latency does not depend on the weights), cached."""
    from train_host.checkpoint import list_checkpoints, save_checkpoint
    from train_host.corpus import stories
    from train_host.data import train_tokenizer
    from train_host.model import Denoiser

    run = CACHE / "random" / f"{name}-v{BENCH_VOCAB}-c{canvas_len}"
    if list_checkpoints(run):
        return run
    import torch

    tokenizer = train_tokenizer(stories(2000), vocab_size=BENCH_VOCAB)  # the built-in corpus gives ~1.2k tokens
    cfg = ModelConfig.from_name(name, vocab_size=BENCH_VOCAB, canvas_len=canvas_len, mask_id=tokenizer.mask_id)
    torch.manual_seed(0)
    save_checkpoint(run, 0, Denoiser(cfg), cfg, tokenizer, {"note": "random weights for benchmarks"})
    return run


def bundle_for(model: str, precision: str, canvas_len: int) -> Path:
    """The bundle of a config name (exported once from random weights, cached) or the given bundle."""
    if model not in SIZES:
        return Path(model)
    path = CACHE / "bundles" / f"{model}-v{BENCH_VOCAB}-c{canvas_len}"
    wanted = ("fp32", "fp16", "int8") if precision.startswith("int8") else ("fp32", "fp16")
    if (path / "manifest.json").is_file():
        have = json.loads((path / "manifest.json").read_text())["precisions"]
        if all(p in have for p in wanted):
            return path
    from train_host.export import export_bundle  # torch: only when there is something to export

    export_bundle(random_model_dir(model, canvas_len), path, precisions=wanted, parity_canvases=4, overwrite=True,
                  int8_options={"n_canvases": 16, "eval_canvases": 8, "budget": 100.0})
    return path


def open_group_backend(group: Group):
    from jetson_dllm.backends import open_backend

    if group.backend == "torch":
        path = random_model_dir(group.model, group.canvas_len) if group.model in SIZES else Path(group.model)
        return open_backend("torch", str(path), threads=group.threads)
    bundle = bundle_for(group.model, group.precision, group.canvas_len)
    options = {"threads": group.threads} if group.backend == "onnx" else {}
    return open_backend(group.backend, str(bundle), precision=group.precision, **options)


# --- measuring ----------------------------------------------------------------------------------------


def measure_group(group: Group) -> list[Result]:
    """Run one group in this process (the worker) and return its results."""
    from jetson_dllm.profiler import PeakRSS, PowerMonitor, unified_memory
    from jetson_dllm.sampler import SamplerConfig, SpecialIds, sample

    backend = open_group_backend(group)
    tok = backend.tokenizer
    special = SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id)
    name = Path(group.model).name if group.model not in SIZES else group.model
    judge = None  # --quality: loaded at the first point that needs it
    results = []
    for p in group.points:
        if p["canvas"] not in backend.canvas_lengths:
            raise DllmError(f"canvas {p['canvas']} is not one of {name}'s shapes ({', '.join(map(str, backend.canvas_lengths))})")
        tokens = np.full((p["batch"], p["canvas"]), tok.mask_id, dtype=np.int32)
        fixed = np.zeros_like(tokens, dtype=bool)
        cfg = SamplerConfig(steps=p["steps"], strategy=p["strategy"], seed=0, allow_end=False)

        def run(canvas, be=backend):
            out = be.run({"tokens": canvas})
            return out["topk_logprobs"], out["topk_ids"]

        for _ in range(group.warmup):
            sample(run, tokens, fixed, special, cfg)
        step_ms, totals, sampler_s, evals = [], [], [], []
        with PeakRSS() as rss, PowerMonitor() as power:
            for _ in range(group.repeats):
                r = sample(run, tokens, fixed, special, cfg)
                step_ms += [s.network_ms for s in r.history if s.evaluated]
                totals.append(r.total_s)
                sampler_s.append(r.sampler_s)
                evals.append(r.evaluations)
        gen = float(np.median(totals))
        generated = p["batch"] * p["canvas"]
        mem = backend.memory()
        unified = unified_memory()
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
            repeats=group.repeats,
        )
        if power.mean_mw is not None:
            result.power_mw = power.mean_mw
            result.energy_mj_per_token = power.mean_mw * gen / generated  # mW * s / token = mJ / token
            result.extra["power_source"] = power.source
        if group.quality:
            if judge is None and group.judge:
                judge = load_judge(group)
            quality_of(result, backend, p, group, judge)
        results.append(result)
    backend.close()
    return results


QUALITY_PROMPT = "Once upon a time"


def load_judge(group: Group):
    """The group's judge (loaded once, after the timed points), or None without --judge."""
    try:
        from train_host.judge import Judge
    except ImportError:
        raise DllmError("--quality needs torch (the judge is a PyTorch checkpoint): pip install 'jetson-dllm[train]'") from None
    return Judge(group.judge) if group.judge else None


def quality_of(result: Result, backend, point: dict, group: Group, judge) -> None:
    """Generate `quality_samples` stories at the point's settings (ends allowed) and judge them."""
    from jetson_dllm.generate import generate
    from jetson_dllm.sampler import SamplerConfig
    from train_host.judge import sample_quality

    cfg = SamplerConfig(steps=point["steps"], strategy=point["strategy"], temperature=0.8, seed=1)
    gen = generate(backend, backend.tokenizer, QUALITY_PROMPT, length=point["canvas"] - 8, num_samples=group.quality_samples, sampler=cfg)
    q = sample_quality(gen.texts, judge)
    result.gen_ppl, result.repetition, result.distinct2 = q.get("gen_ppl"), q["repetition"], q["distinct2"]


def prepare_group(group: Group) -> None:
    """Make what a config-name group runs (random-weight checkpoint, exported bundle) if it is not cached."""
    if group.model not in SIZES:
        return
    if group.backend == "torch":
        random_model_dir(group.model, group.canvas_len)
    else:
        bundle_for(group.model, group.precision, group.canvas_len)


def _in_worker(group: Group, mode: str) -> str:
    """Run `mode` ("prepare" or "measure") for a group in a fresh process; its last stdout line."""
    proc = subprocess.run([sys.executable, "-m", "jetson_dllm.bench", mode], input=json.dumps(asdict(group)),
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        message = next((ln[7:] for ln in proc.stderr.splitlines() if ln.startswith("error: ")), None)
        raise DllmError(message or f"the {group.model} / {group.backend} / {group.precision} worker failed: {proc.stderr.strip()[-300:]}")
    return lines[-1]


def run_groups(groups: list[Group], isolate: bool = True, progress=None) -> list[Result]:
    """Measure every group, each in a fresh worker process unless `isolate` is off.

    A config-name group is prepared (checkpoint, export, calibration) in a process of its own first, so
    the measuring process holds only the backend: its RSS is what running the model costs, not torch's
    leftovers from exporting it.
    """
    results = []
    for i, group in enumerate(groups):
        if progress:
            progress(i, len(groups), group)
        if not isolate:
            prepare_group(group)
            results += measure_group(group)
            continue
        if group.model in SIZES:
            _in_worker(group, "prepare")
        results += [Result(**r) for r in json.loads(_in_worker(group, "measure"))]
    if progress:
        progress(len(groups), len(groups), None)
    return results


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
    """Validate a sweep and cut it into groups; a clear error for anything out of range."""
    from jetson_dllm.sampler import STRATEGIES

    for b in backends:
        if b not in BACKENDS:
            raise DllmError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for s in strategies:
        if s not in STRATEGIES:
            raise DllmError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    for v, what in [(steps, "--steps"), (canvases, "--canvas"), (batches, "--batch")]:
        if not v or min(v) < 1:
            raise DllmError(f"{what} values must be positive")
    if repeats < 1 or warmup < 0:
        raise DllmError("--repeats must be at least 1 and --warmup not negative")
    for m in models:
        if m not in SIZES and not Path(m).exists():
            raise DllmError(f"unknown config or missing path {m!r}; configs: {', '.join(SIZES)}, or a bundle / checkpoint folder")
    canvas_len = max(canvases)
    points = [{"batch": b, "canvas": c, "steps": s, "strategy": st} for b in batches for c in canvases for s in steps for st in strategies]
    groups = []
    for m in models:
        for b in backends:
            for p in precisions:
                if p not in PRECISIONS[b]:
                    continue
                groups.append(Group(m, b, p, points, repeats, warmup, threads, canvas_len))
    if not groups:
        raise DllmError(f"no backend takes the precisions {precisions}: torch runs fp32; onnx fp32/fp16/int8/int8-dynamic; trt fp16/int8/fp32")
    return groups


def memory_needed(group: Group) -> int:
    """A generous estimate of a group's peak memory (bytes): weights in the forms the backend holds them,
    activations of the largest point, and, for random configs, the export."""
    cfg = ModelConfig.from_name(group.model, vocab_size=BENCH_VOCAB, canvas_len=group.canvas_len) if group.model in SIZES else None
    if cfg is None:
        return 0
    fp32 = cfg.weight_bytes("fp32")
    B = max(p["batch"] for p in group.points)
    T = max(p["canvas"] for p in group.points)
    activations = B * T * (3 * cfg.d_model + 2 * cfg.d_ff + cfg.vocab_size) * 4 + B * cfg.n_head * T * T * 4
    export = 4 * fp32 if group.backend != "torch" else 0  # torch model + graph + fp16 / quantized copies
    return int(2 * fp32 + activations + export + (400 << 20))


def check_memory(groups: list[Group], available: int) -> None:
    if not available:
        return
    for g in groups:
        need = memory_needed(g)
        if need > available:
            raise DllmError(f"{g.model} on {g.backend} ({g.precision}) needs about {need / 2**30:.1f} GiB, but "
                            f"{available / 2**30:.1f} GiB is available; leave it out of the sweep (or lower --canvas / --batch)")


# --- the environment and the outputs ------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What the numbers depend on: CPU, GPU, memory, L4T/JetPack, library versions, power mode and clocks."""
    import psutil

    from jetson_dllm.engine import read_l4t_release

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "l4t": read_l4t_release() or None,
        "gpu": None,
        "versions": {p: _version(p) for p in ("jetson-dllm", "torch", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy", "pycuda")},
        "power_mode": None,
        "clocks_pinned": None,
    }
    if env["versions"]["tensorrt"] is None:
        try:
            import tensorrt

            env["versions"]["tensorrt"] = tensorrt.__version__  # JetPack's apt package has no pip metadata
        except ImportError:
            pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        if smi.returncode == 0 and smi.stdout.strip():
            env["gpu"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if env["l4t"]:
        try:
            model = Path("/proc/device-tree/model").read_text().strip("\0\n ")
            env["gpu"] = env["gpu"] or f"{model} (integrated)"
        except OSError:
            pass
        try:
            q = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
            env["power_mode"] = next((ln.split(":", 1)[1].strip() for ln in q.stdout.splitlines() if "Power Mode" in ln), None)
        except (OSError, subprocess.TimeoutExpired):
            pass
        env["clocks_pinned"] = clocks_pinned()
    return env


def clocks_pinned(cpu_dir: str = "/sys/devices/system/cpu/cpu0/cpufreq") -> bool | None:
    """jetson_clocks pins the minimum frequency to the maximum; None when unreadable."""
    try:
        low = Path(cpu_dir, "scaling_min_freq").read_text().strip()
        high = Path(cpu_dir, "scaling_max_freq").read_text().strip()
    except OSError:
        return None
    return low == high


COLUMNS = ["model", "backend", "precision", "batch", "canvas", "steps", "strategy", "evaluations", "step_ms_median",
           "step_ms_p90", "generation_ms", "generation_ms_spread", "tokens_per_s", "sampler_share", "peak_rss_mb",
           "weights_mb", "device_mb", "memory_available_mb", "gpu_nvmap_mb", "power_mw", "energy_mj_per_token", "repeats"]
QUALITY_COLUMNS = ["gen_ppl", "repetition", "distinct2"]


def columns(results: list[Result]) -> list[str]:
    """The table's columns; the quality ones only when the sweep measured quality (--quality)."""
    has_quality = any(r.repetition is not None for r in results)
    return COLUMNS + (QUALITY_COLUMNS if has_quality else [])


def write_outputs(results: list[Result], env: dict, out_dir: Path) -> dict[str, Path]:
    """bench.csv, bench.json, bench.md and latency_vs_steps.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = set(columns(results)) | {"extra"}
    rows = [{k: v for k, v in asdict(r).items() if k in keep} for r in results]
    paths = {"csv": out_dir / "bench.csv", "json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "latency_vs_steps.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(results), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    paths["md"].write_text(markdown(results, env))
    plot(results, paths["png"])
    return paths


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def headline(results: list[Result]) -> tuple[list[str], list[list[str]]]:
    """Latency vs steps: one row per model/backend/precision/batch/canvas, one column per step count
    (whole-generation ms, median)."""
    steps = sorted({r.steps for r in results})
    keys = []
    for r in results:
        key = (r.model, r.backend, r.precision, r.batch, r.canvas, r.strategy)
        if key not in keys:
            keys.append(key)
    header = ["model", "backend", "precision", "batch x canvas", "step ms (median)", "step speedup"] + [f"{s} steps" for s in steps]
    rows, baseline = [], {}
    for key in keys:
        mine = [r for r in results if (r.model, r.backend, r.precision, r.batch, r.canvas, r.strategy) == key]
        by_steps = {r.steps: r for r in mine}
        step_ms = float(np.median([r.step_ms_median for r in mine]))
        # relative to the first backend/precision measured for the same model and shape, in the same run
        base = baseline.setdefault((key[0], key[3], key[4], key[5]), step_ms)
        rows.append([key[0], key[1], key[2], f"{key[3]} x {key[4]}", f"{step_ms:,.1f}", f"{base / step_ms:.2f}x"] +
                    [f"{by_steps[s].generation_ms:,.0f} ms" if s in by_steps else "-" for s in steps])
    return header, rows


def markdown(results: list[Result], env: dict) -> str:
    header, rows = headline(results)
    lines = [f"Latency vs steps (whole generation, median of {results[0].repeats if results else 0} runs) on "
             f"{env['cpu']} ({env['cores_physical']} cores){', ' + env['gpu'] if env.get('gpu') else ''}, {env['date']}:", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    cols = [c for c in columns(results) if c != "repeats"]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        d = asdict(r)
        lines.append("| " + " | ".join(_fmt(d[c], 3 if c in ("sampler_share", "generation_ms_spread", "repetition", "distinct2") else 1) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[Result]] = {}
    for r in results:
        series.setdefault((r.model, r.backend, r.precision, r.batch, r.canvas), []).append(r)
    # one colour per model (in size order), one line style per backend/precision
    models = sorted({k[0] for k in series}, key=lambda m: list(SIZES).index(m) if m in SIZES else len(SIZES))
    kinds = list(dict.fromkeys((k[1], k[2]) for k in series))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(models), 1)))
    styles = ["o-", "s--", "^:", "d-.", "v-", "x--"]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (model, backend, precision, batch, canvas), rs in series.items():
        rs = sorted(rs, key=lambda r: r.steps)
        ax.plot([r.steps for r in rs], [r.generation_ms for r in rs], styles[kinds.index((backend, precision)) % len(styles)],
                color=colours[models.index(model)], label=f"{model} {backend} {precision} {batch}x{canvas}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("generation latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DllmError(f"cannot write to {out_dir} ({e.strerror}); choose another --out") from None


def _worker() -> None:
    """The worker process: one Group as JSON on stdin; `prepare` makes its model, `measure` prints its
    results as JSON on the last stdout line."""
    mode = sys.argv[1] if len(sys.argv) > 1 else "measure"
    group = Group(**json.loads(sys.stdin.read()))
    try:
        if mode == "prepare":
            prepare_group(group)
            print("prepared")
        else:
            print(json.dumps([asdict(r) for r in measure_group(group)]))
    except DllmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _worker()
