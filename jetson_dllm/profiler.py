"""Where memory and power go: process RSS, /proc/meminfo, the Jetson's unified memory, tegrastats and jtop.

On a Jetson, CPU and GPU share the DRAM: `nvidia-smi` shows nothing and cudaMemGetInfo ignores swap and
counts page cache, so the profiler reads process RSS (psutil), MemAvailable and NvMapMemUsed (the GPU's
share) from /proc/meminfo, and power from jtop (jetson-stats) or, without it, a tegrastats subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.bundle import load_bundle
from jetson_dllm.config import SIZES, ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import engine_graphs_of, family_of
from jetson_dllm.precisions import parse_precisions
from jetson_dllm.precisions import precision as precision_record


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, SwapFree, NvMapMemUsed on a Jetson, ...); {} if unreadable."""
    info = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():  # (/proc/self/status also has text fields)
                    info[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return info


_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"SWAP (\d+)/(\d+)MB")
_GPU = re.compile(r"GR3D_FREQ (\d+)%")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)mW/(\d+)mW")


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line: RAM/SWAP (MiB), GPU load (%), and each power rail's current and average (mW)."""
    out: dict = {"rails": {}}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _SWAP.search(line):
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _GPU.search(line):
        out["gpu_load"] = int(m.group(1))
    for rail, cur, avg in _RAIL.findall(line):
        out["rails"][rail] = (int(cur), int(avg))
    if "VDD_IN" in out["rails"]:  # the module's input: the total on Orin Nano (as jtop counts it)
        out["power_mw"] = out["rails"]["VDD_IN"][0]
    elif out["rails"]:
        out["power_mw"] = sum(cur for cur, _ in out["rails"].values())
    return out


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak` in bytes after the block."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process, self.interval = psutil.Process(), interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return False


def peak_rss_ever() -> int:
    """The process's high-water mark (VmHWM), the kernel's own count; 0 where unavailable."""
    return read_meminfo("/proc/self/status").get("VmHWM", 0)


@dataclass
class PowerMonitor:
    """Power samples (mW) during a block, from jtop when its service runs, else tegrastats; none elsewhere."""

    interval_ms: int = 100
    samples: list[float] = field(default_factory=list)
    source: str = "none"

    def __enter__(self):
        self.samples = []
        self._stop = threading.Event()
        self._proc = None
        self._jetson = None
        try:
            from jtop import jtop

            self._jetson = jtop(interval=self.interval_ms / 1000)
            self._jetson.start()
            self.source = "jtop"
        except Exception:  # not installed, or its service is not running
            self._jetson = None
        if self._jetson is None and shutil.which("tegrastats"):
            self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)], stdout=subprocess.PIPE, text=True)
            self.source = "tegrastats"
        if self._jetson is not None or self._proc is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._jetson is not None:
                power = self._jetson.power.get("tot", {}).get("power")
                if power is not None:
                    self.samples.append(float(power))
                self._stop.wait(self.interval_ms / 1000)
            else:
                line = self._proc.stdout.readline()
                if not line:
                    return
                reading = parse_tegrastats(line)
                if "power_mw" in reading:
                    self.samples.append(float(reading["power_mw"]))

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._jetson is not None:
            self._jetson.close()
        if hasattr(self, "_thread"):
            self._thread.join(timeout=5)
        return False

    @property
    def mean_mw(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def unified_memory() -> dict[str, int]:
    """The Jetson's memory picture (bytes): total, available, swap free, and what the GPU holds (NvMap)."""
    info = read_meminfo()
    keys = {"MemTotal": "total", "MemAvailable": "available", "SwapFree": "swap_free", "NvMapMemUsed": "gpu_nvmap"}
    return {name: info[key] for key, name in keys.items() if key in info}


def time_peak_rss(cmd: list[str]) -> int:
    """Peak RSS of a command measured by GNU time (-v), in bytes; for checking our own number."""
    result = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if result.returncode != 0 or not m:
        raise RuntimeError(f"/usr/bin/time failed: {result.stderr[-300:]}")
    return int(m.group(1)) * 1024


# --- will it fit on an Orin Nano 8GB? -----------------------------------------------------------------

# What an application can count on (bytes). tegrastats shows ~7620 MB total on an Orin Nano 8GB; a headless
# JetPack 6 (multi-user target) keeps ~1.2 GB for itself. A CUDA context on Orin costs a few hundred MB, and
# the Python runtime (numpy, tokenizers, TensorRT's libraries) about 250 MB. These are estimates from the
# public numbers in shared/docs/tensorrt-jetson.md §6, not measurements on our own board.
ORIN_NANO_VISIBLE = 7620 << 20
ORIN_NANO_SYSTEM = 1200 << 20
CUDA_CONTEXT = 350 << 20
HOST_RUNTIME = 250 << 20


def memory_plan(cfg, precision: str, batch: int, canvas: int, k: int = 64, workspace: int = 1 << 30, device: bool = True) -> dict[str, int]:
    """Where a run's memory goes (bytes), for running and for building an engine: the one estimator of the
    project (`dllm profile`, the Orin Nano verdict and bench's memory check all use it).

    `device` adds a CUDA context (an engine on a GPU); without it the estimate is for a host process. The model's
    family says how many positions one call computes (the canvas, a block, one token) and whether it runs over a
    key/value cache of the whole context, allocated once, which is then part of the plan."""
    record = precision_record(precision)
    weights = cfg.weight_bytes(precision)
    act_bytes = record.activation_bytes
    B, T = batch, canvas
    family = family_of(cfg)
    cached = family.cached
    Q = family.positions_per_call(cfg, T)  # positions per network call
    widest = max(3 * cfg.d_model, 2 * cfg.d_ff, cfg.vocab_size)
    # The two widest live tensors of a block (or the head's logits), the attention scores, in the run's precision.
    activations = 2 * B * Q * widest * act_bytes + B * cfg.n_head * Q * (T + (Q if cached else 0)) * act_bytes
    cache = 2 * cfg.n_layer * B * cfg.n_kv_head * cfg.canvas_len * cfg.head_dim * 4 if cached else 0  # keys and values, FP32, the whole context
    io = B * Q * (4 + 8 * k + 3 * 4 * cfg.latent_dim)  # tokens, the top-K; continuous diffusion's x, x0 and x0_top1
    runtime = HOST_RUNTIME + (CUDA_CONTEXT if device else 0)
    run = weights + activations + cache + io + runtime
    onnx_bytes = cfg.weight_bytes("fp32" if precision == "fp32" else "fp16")
    build = 3 * onnx_bytes + workspace + runtime
    return {"weights": weights, "activations": activations, "kv_cache": cache, "io": io, "runtime": runtime,
            "run_total": run, "build_total": build}


def orin_nano_verdict(plan: dict[str, int], usable: int = ORIN_NANO_VISIBLE - ORIN_NANO_SYSTEM) -> dict:
    run_headroom = usable - plan["run_total"]
    build_headroom = usable - plan["build_total"]
    return {"fits": run_headroom > 0, "headroom": run_headroom, "builds": build_headroom > 0, "build_headroom": build_headroom}


def memory_rows(bundle_dir: str | None = None, configs: list[str] | None = None, precisions: str = "fp32,fp16,int8",
                canvas: int = 256, batch: int = 1, measure: bool = False, draft: str | None = None) -> list[dict]:
    """`dllm profile`: per config (or the bundle's model) and precision, the memory plan and the Orin Nano
    verdict; with `measure`, the peak RSS of the onnx runner on this host too (bundle only); with `draft` (a
    speculative drafter's bundle), the drafter's rows and both models together in one process."""
    if draft is not None:
        return speculative_rows(bundle_dir, draft, precisions, canvas, batch, measure)
    if canvas < 1 or batch < 1:
        raise DllmError(f"--canvas and --batch must be positive, got {canvas} and {batch}")
    if measure and bundle_dir is None:
        raise DllmError("--measure runs a bundle on onnxruntime here; give a bundle (dllm profile BUNDLE --measure) or leave it out")
    if configs and bundle_dir is not None:
        raise DllmError("--config profiles named sizes; a bundle profiles its own model: give one or the other")
    names = parse_precisions(precisions)
    if bundle_dir is not None:
        bundle = load_bundle(bundle_dir)
        cfgs, k = [bundle.config], bundle.topk
        names = [p for p in names if p in bundle.precisions]
    else:
        cfgs = [ModelConfig.from_name(n, vocab_size=8192, canvas_len=max(canvas, 256)) for n in (configs or list(SIZES))]
        k = 64
    rows = []
    for cfg in cfgs:
        if canvas > cfg.canvas_len:
            raise DllmError(f"--canvas {canvas} is longer than the model's canvas ({cfg.canvas_len})")
        for p in names:
            plan = memory_plan(cfg, p, batch, canvas, k)
            verdict = orin_nano_verdict(plan)
            if not engine_graphs_of(cfg):  # nothing to build: TensorRT engines for this family are not made yet
                verdict["builds"] = None
            rows.append({"config": cfg.name, "precision": p, **plan, **verdict})
    if measure and bundle_dir is not None:
        for row in rows:
            row["host_rss_measured"] = measure_rss(bundle_dir, row["precision"], batch, canvas)
    return rows


def speculative_rows(parent: str | None, draft: str, precisions: str, canvas: int, batch: int, measure: bool) -> list[dict]:
    """The parent's rows, the drafter's, and per precision both together: one process holds both models' weights and
    caches and one runtime (one CUDA context); their calls take turns, so the larger activations count once. Built
    separately: the larger build peak."""
    if parent is None or measure:
        raise DllmError("--draft profiles a parent bundle with its drafter's: give the parent's bundle, and leave --measure out")
    mine, theirs = memory_rows(parent, None, precisions, canvas, batch), memory_rows(draft, None, precisions, canvas, batch)
    rows = [{**r, "config": f"parent {r['config']}"} for r in mine] + [{**r, "config": f"drafter {r['config']}"} for r in theirs]
    for a in mine:
        b = next((r for r in theirs if r["precision"] == a["precision"]), None)
        if b is None:
            continue
        both = {k: a[k] + b[k] for k in ("weights", "kv_cache", "io")} | {"activations": max(a["activations"], b["activations"]),
                                                                          "runtime": a["runtime"], "build_total": max(a["build_total"], b["build_total"])}
        both["run_total"] = both["weights"] + both["activations"] + both["kv_cache"] + both["io"] + both["runtime"]
        rows.append({"config": "both (speculative)", "precision": a["precision"], **both, **orin_nano_verdict(both),
                     **({"builds": None} if a["builds"] is None or b["builds"] is None else {})})
    return rows


def measure_rss(bundle_dir: str, precision: str, batch: int, canvas: int) -> int:
    """Peak RSS (bytes) of a fresh process that opens the bundle on onnxruntime and runs one step
    (jetson_dllm.rss_probe: a process of its own, so nothing else this one holds is counted)."""
    cmd = [sys.executable, "-m", "jetson_dllm.rss_probe", str(bundle_dir), precision, str(batch), str(canvas)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DllmError(f"measuring {precision} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1]))


def training_bytes(cfg, micro_batch: int) -> int:
    """A rough peak of one training step on the host (bytes): weights, gradients and AdamW's two moments, the
    activations every layer keeps for the backward pass, and the logits with their gradient."""
    B, T = micro_batch, cfg.canvas_len
    state = 4 * cfg.weight_bytes("fp32")
    per_layer = B * T * (10 * cfg.d_model + 3 * cfg.d_ff) * 4 + B * cfg.n_head * T * T * 4
    logits = 2 * B * T * cfg.vocab_size * 4
    return state + cfg.n_layer * per_layer + logits + HOST_RUNTIME


def check_fits(need: int, what: str, fix: str) -> None:
    """Refuse work whose estimated memory is more than this machine has available, before allocating it."""
    available = read_meminfo().get("MemAvailable", 0)
    if available and need > available:
        raise DllmError(f"{what} needs about {need / 2**30:.1f} GiB of memory, but {available / 2**30:.1f} GiB is available; {fix}")
