"""Load on `dllm serve`: tokens per second and p50/p99 latency at several concurrent clients, batched and not.

    python benchmarks/serve_load.py BUNDLE --clients 1,4,8,16 --requests 6 --max-tokens 64 --steps 32 \\
        --out runs/readme/serve_load.json --figure benchmarks/figures/serve_load.png

Each mode starts its own server (`dllm serve BUNDLE`, then `--no-batching`) on a free port on 127.0.0.1; each
client sends `--requests` completions one after another (fixed seeds; every request asks the same `--max-tokens`
and `--steps`). Tokens per second count the tokens the server returned (usage.completion_tokens) over the wall time
of the whole level; positions per second count the `--max-tokens` positions every request had denoised (the work,
whatever the model's end-of-text left of it); latency is per request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def start(bundle: str, batching: bool, threads: int, backend: str, precision: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jetson_dllm", "serve", bundle, "--port", str(port), "--max-batch", "16", "--max-queue", "256",
           "--threads", str(threads), "--backend", backend, "--precision", precision, "--batching" if batching else "--no-batching"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def level(url: str, clients: int, requests: int, max_tokens: int, steps: int) -> dict:
    latencies, tokens, errors, lock = [], [0], [0], threading.Lock()
    positions = clients * requests * max_tokens

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                t0 = time.perf_counter()
                resp = http.post(f"{url}/v1/completions", json={"prompt": "Once upon a time", "max_tokens": max_tokens, "steps": steps,
                                                                "seed": 1000 * c + r, "temperature": 0.8})
                with lock:
                    if resp.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                        tokens[0] += resp.json()["usage"]["completion_tokens"]
                    else:
                        errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "requests": len(latencies), "errors": errors[0], "tokens": tokens[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall, "positions_per_s": positions / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def table(rows: list[dict]) -> str:
    single = {r["mode"]: r for r in rows if r["clients"] == 1}
    lines = ["| mode | clients | requests | tokens/s | positions/s | x one client | p50 ms | p99 ms | p99 / one client's p99 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = single[r["mode"]]
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:,.0f} | {r['positions_per_s']:,.0f} "
                     f"| {r['positions_per_s'] / one['positions_per_s']:.2f}x "
                     f"| {r['p50_ms']:,.0f} | {r['p99_ms']:,.0f} | {r['p99_ms'] / one['p99_ms']:.2f}x |")
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, style in (("batched", "o-"), ("unbatched", "s--")):
        rs = [r for r in rows if r["mode"] == mode]
        axes[0].plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], style, label=mode)
        axes[1].plot([r["clients"] for r in rs], [r["p99_ms"] for r in rs], style, label=f"{mode} p99")
        axes[1].plot([r["clients"] for r in rs], [r["p50_ms"] for r in rs], style, alpha=0.4, label=f"{mode} p50")
    axes[0].set_ylabel("tokens / s")
    axes[1].set_ylabel("latency per request (ms)")
    for ax in axes:
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=6, help="requests per client, one after another")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--backend", default="auto", help="the server's backend (onnx here; trt on a Jetson)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--out", default="")
    p.add_argument("--figure", default="")
    args = p.parse_args()
    rows = []
    for mode in ("batched", "unbatched"):
        proc, url = start(args.bundle, mode == "batched", args.threads, args.backend, args.precision)
        try:
            level(url, 1, 1, args.max_tokens, args.steps)  # warm-up
            for clients in map(int, args.clients.split(",")):
                rows.append({"mode": mode, **level(url, clients, args.requests, args.max_tokens, args.steps)})
                print(f"{mode} {clients}: {rows[-1]['tokens_per_s']:.0f} tok/s, p99 {rows[-1]['p99_ms']:.0f} ms", file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"{args.bundle}, backend {args.backend} {args.precision}, {args.max_tokens} tokens and {args.steps} steps per request, {machine}\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
