"""What `dllm bench` writes: the environment the numbers depend on, bench.csv / .json / .md, the latency figure.

Results are `jetson_dllm.bench.Result` records (dataclasses).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np

from jetson_dllm.config import SIZES
from jetson_dllm.engine import read_l4t_release
from jetson_dllm.errors import DllmError
from jetson_dllm.manifests import check_replaceable

BENCH_FORMAT = "jetson-dllm-bench"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """What the numbers depend on: CPU, GPU, memory, L4T/JetPack, library versions, power mode and clocks."""
    import psutil

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
BLOCK_COLUMNS = ["block_size", "cache_passes", "folded_commits", "commit_ms_median"]


def columns(results: list) -> list[str]:
    """The table's columns; the block-diffusion ones only when a BD3 model was measured, the quality ones only
    when the sweep measured quality (--quality)."""
    has_quality = any(r.repetition is not None for r in results)
    has_blocks = any(r.block_size for r in results)
    return COLUMNS + (BLOCK_COLUMNS if has_blocks else []) + (QUALITY_COLUMNS if has_quality else [])


def write_outputs(results: list, env: dict, out_dir: Path) -> dict[str, Path]:
    """bench.csv, bench.json, bench.md and latency_vs_steps.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = set(columns(results)) | {"extra"}
    rows = [{k: v for k, v in asdict(r).items() if k in keep} for r in results]
    paths = {"csv": out_dir / "bench.csv", "json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "latency_vs_steps.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(results), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(json.dumps({"format": BENCH_FORMAT, "environment": env, "results": rows}, indent=2))
    paths["md"].write_text(markdown(results, env))
    plot(results, paths["png"])
    return paths


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def headline(results: list) -> tuple[list[str], list[list[str]]]:
    """Latency vs steps: one row per model/backend/precision/batch/canvas, one column per step count
    (whole-generation ms, median)."""
    steps = sorted({r.steps for r in results})
    keys = []
    for r in results:
        key = (r.model, r.backend, r.precision, r.batch, r.canvas, r.strategy)
        if key not in keys:
            keys.append(key)
    header = ["model", "backend", "precision", "strategy", "batch x canvas", "step ms (median)", "step speedup"] + [f"{s} steps" for s in steps]
    rows, baseline = [], {}
    for key in keys:
        mine = [r for r in results if (r.model, r.backend, r.precision, r.batch, r.canvas, r.strategy) == key]
        by_steps = {r.steps: r for r in mine}
        step_ms = float(np.median([r.step_ms_median for r in mine]))
        # relative to the first backend/precision measured for the same model and shape, in the same run
        base = baseline.setdefault((key[0], key[3], key[4], key[5]), step_ms)
        rows.append([key[0], key[1], key[2], key[5], f"{key[3]} x {key[4]}", f"{step_ms:,.1f}", f"{base / step_ms:.2f}x"] +
                    [f"{by_steps[s].generation_ms:,.0f} ms" if s in by_steps else "-" for s in steps])
    return header, rows


def markdown(results: list, env: dict) -> str:
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


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list] = {}
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
    """`--out` must be a bench folder (or new, or empty) that can be written; nothing else is written into."""
    check_replaceable(out_dir, "bench.json", BENCH_FORMAT, "bench output folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DllmError(f"cannot write to {out_dir} ({e.strerror}); choose another --out") from None
