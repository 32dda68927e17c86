"""CPU threads on a quiet and on a busy machine: torch and onnxruntime step time, training tokens/s.

    python benchmarks/threads.py                       # idle, then beside two busy processes
    python benchmarks/threads.py --json runs/threads.json

Four settings, each in a fresh process (OpenMP reads its wait policy once, when torch loads):

- `library defaults`: what torch and onnxruntime do untouched (one thread per physical core, idle threads spin
  before they sleep) -- what `dllm` did before it chose;
- `one thread`: `--threads 1`, the library's waiting;
- `sleeping waits`: all physical cores, `OMP_WAIT_POLICY=PASSIVE` and onnxruntime's spinning off;
- `short spins`: all physical cores, libgomp's `GOMP_SPINCOUNT=3000` (spin briefly, then sleep; the default spins
  300,000 times) and onnxruntime's spinning off;
- `dllm default`: what `dllm` does with `--threads 0` (jetson_dllm.threads.quiet_waiting and auto_threads).

The busy machine is two other processes each running single-threaded numpy matrix products, started a minute
before (so that the load average has seen them, as it would have seen a user's other work). Measured: the
forward pass of the `small` config (canvas 128, batch 1) on torch and on onnxruntime (the same network exported),
median of 10 calls after 2; a training step of `tiny` (batch 16 x 128, MDLM loss, AdamW), median of 4 after 1, as
tokens/s. A measurement that would take over `--cap` seconds stops early and says so. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {  # name -> (OpenMP environment, threads: "cores", "auto" or a count, onnxruntime spinning; None: dllm's)
    "library defaults": ({}, "cores", True),
    "one thread": ({}, 1, True),
    "sleeping waits": ({"OMP_WAIT_POLICY": "PASSIVE"}, "cores", False),
    "short spins": ({"GOMP_SPINCOUNT": "3000"}, "cores", False),
    "dllm default": ({}, "auto", None),
}
HOG = "import numpy as np\na = np.random.rand(300, 300)\nwhile True:\n    a = a @ a\n    a /= a.max()\n"


def timed(fn, calls: int, warmup: int, cap: float) -> tuple[float, int]:
    """Median seconds of `calls` calls after `warmup`, stopping after `cap` seconds (then: fewer calls)."""
    times, start = [], time.perf_counter()
    for i in range(warmup + calls):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > cap and times:
            break
    return sorted(times)[len(times) // 2], len(times)


def worker(onnx_path: str, threads: str, spin: str, cap: float, config: str = "small") -> dict:
    """One setting's measurements, in this (fresh) process."""
    from jetson_dllm.threads import quiet_waiting, spinning

    if spin == "dllm":
        quiet_waiting()  # what the `dllm` entry point does, before torch loads
    import numpy as np
    import onnxruntime as ort
    import torch

    from jetson_dllm.config import ModelConfig
    from jetson_dllm.threads import auto_threads, usable_cores
    from train_host import diffusion
    from train_host.model import Denoiser

    n = usable_cores() if threads == "cores" else auto_threads() if threads == "auto" else int(threads)
    torch.set_num_threads(n)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(config, vocab_size=8192, canvas_len=128, mask_id=2)
    model = Denoiser(cfg).eval()
    x = torch.randint(3, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch_s, torch_n = timed(lambda: model(x), 10, 2, cap)

    options = ort.SessionOptions()
    options.intra_op_num_threads = n
    spins = spinning() if spin == "dllm" else spin == "1"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spins else "0")
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy().astype(np.int64)}
    onnx_s, onnx_n = timed(lambda: session.run(None, feed), 10, 2, cap)

    tcfg = ModelConfig.from_name("tiny", vocab_size=8192, canvas_len=128, mask_id=2)
    net = Denoiser(tcfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(3, tcfg.vocab_size, (16, 128), generator=g)

    def step():
        loss, _ = diffusion.mdlm_loss(net, batch, diffusion.sample_t(16, g), tcfg.mask_id, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_s, train_n = timed(step, 4, 1, cap)
    return {"threads": n, "env": {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}, "torch_ms": 1000 * torch_s, "torch_calls": torch_n,
            "onnx_ms": 1000 * onnx_s, "onnx_calls": onnx_n, "train_tokens_s": 16 * 128 / train_s, "train_steps": train_n}


def export_graph(path: Path, config: str = "small") -> None:
    import torch

    from jetson_dllm.config import ModelConfig
    from train_host.model import Denoiser

    torch.manual_seed(0)
    model = Denoiser(ModelConfig.from_name(config, vocab_size=8192, canvas_len=128, mask_id=2)).eval()
    torch.onnx.export(model, (torch.zeros(1, 128, dtype=torch.long),), str(path), input_names=["tokens"],
                      output_names=["logits"], opset_version=17, dynamo=False)


def measure(onnx_path: Path, name: str, cap: float, config: str = "small") -> dict:
    omp, threads, spin = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(omp)
    flag = "dllm" if spin is None else str(int(spin))
    out = subprocess.run([sys.executable, __file__, "--worker", str(onnx_path), str(threads), flag, str(cap), config],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--config", default="small", help="the model whose forward pass is timed (the docs' table: small)")
    p.add_argument("--busy", type=int, default=2, help="busy processes beside us in the second half")
    p.add_argument("--skip-idle", action="store_true", help="measure beside the busy processes only")
    p.add_argument("--settle", type=float, default=60.0, help="seconds the busy processes run before measuring")
    p.add_argument("--cap", type=float, default=30.0, help="seconds at most per measurement")
    p.add_argument("--rounds", type=int, default=3, help="each setting this many times, interleaved; the table shows medians")
    p.add_argument("--json", type=Path, help="also write the raw rows here")
    args = p.parse_args()
    if args.worker:
        path, threads, spin, cap, config = args.worker
        print(json.dumps(worker(path, threads, spin, float(cap), config)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graph = Path(tmp) / "small.onnx"
        export_graph(graph, args.config)
        for busy in ((args.busy,) if args.skip_idle else (0, args.busy)):
            hogs = [subprocess.Popen([sys.executable, "-c", HOG], env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(busy)]
            try:
                time.sleep(args.settle if busy else 0)
                for round_ in range(args.rounds):
                    for name in SETTINGS:
                        row = {"busy": busy, "round": round_, "setting": name, "uptime": os.getloadavg()[0], **measure(graph, name, args.cap, args.config)}
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Medians over rounds, with the range; a capped measurement is marked."""
    lines = ["| machine | setting | threads | torch forward ms | onnxruntime forward ms | training tokens/s |", "|---|---|---|---|---|---|"]
    for busy in sorted({r["busy"] for r in rows}):
        for name in SETTINGS:
            rs = [r for r in rows if r["busy"] == busy and r["setting"] == name]
            if not rs:
                continue
            load = f"{min(r['uptime'] for r in rs):.1f}-{max(r['uptime'] for r in rs):.1f}"
            where = f"idle (load {load})" if not busy else f"{busy} busy processes (load {load})"
            capped = " (capped)" if any(r["torch_calls"] < 10 or r["onnx_calls"] < 10 or r["train_steps"] < 4 for r in rs) else ""
            cells = [spread([r[k] for r in rs], fmt) for k, fmt in (("torch_ms", "{:.0f}"), ("onnx_ms", "{:.0f}"), ("train_tokens_s", "{:,.0f}"))]
            lines.append(f"| {where} | {name}{capped} | {rs[0]['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(values: list[float], fmt: str) -> str:
    values = sorted(values)
    mid = fmt.format(values[len(values) // 2])
    return mid if len(values) == 1 else f"{mid} ({fmt.format(values[0])}-{fmt.format(values[-1])})"


if __name__ == "__main__":
    main()
