"""Load on `dllm serve`: tokens per second, p50/p99 latency, time to first token and rows per network call at
several concurrent clients, batched and not, for any family's bundle (MDLM, block diffusion, AR).

    python benchmarks/serve_load.py BUNDLE --clients 1,4,8,16 --requests 6 --max-tokens 64 --steps 32 \\
        --out runs/readme/serve_load.json --figure benchmarks/figures/serve_load.png

Each mode starts its own server (`dllm serve BUNDLE`, then `--no-batching`) on a free port on 127.0.0.1; each
client sends `--requests` streamed completions one after another (fixed seeds; every request asks the same
`--max-tokens`, and `--steps` where the family uses steps; end-of-text is allowed). Tokens per second count the
tokens the server returned over the wall time of the whole level; positions per second count the `--max-tokens`
positions every request asked for; latency is per request, to its last chunk; time to first token, to its first
chunk with text. Rows per call and the wait from arrival to a request's first network call come from the server's
/metrics (their change over the level).
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


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln and not ln.startswith("#")}


def level(url: str, clients: int, requests: int, max_tokens: int, knobs: dict) -> dict:
    latencies, firsts, tokens, errors, lock = [], [], [0], [0], threading.Lock()
    positions = clients * requests * max_tokens

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(requests):
                t0, first, text, ok = time.perf_counter(), None, [], False
                body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "seed": 1000 * c + r, "temperature": 0.8, "stream": True, **knobs}
                with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
                    for line in resp.iter_lines():
                        if line == "data: [DONE]":
                            ok = resp.status_code == 200
                        elif line.startswith("data: "):
                            piece = json.loads(line[6:]).get("choices", [{}])[0].get("text", "")
                            if piece and first is None:
                                first = time.perf_counter() - t0
                            text.append(piece)
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - t0)
                        firsts.append(first if first is not None else latencies[-1])
                        tokens[0] += len("".join(text).split())  # words: the tokenizer is the server's
                    else:
                        errors[0] += 1

    before = scrape(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = scrape(url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    lat, first = np.array(latencies) * 1e3, np.array(firsts) * 1e3
    calls = max(delta.get("dllm_batch_rows_count", 0.0), 1.0)
    waits = max(delta.get("dllm_time_to_first_call_seconds_count", 0.0), 1.0)
    return {"clients": clients, "requests": len(latencies), "errors": errors[0], "words": tokens[0], "wall_s": wall,
            "words_per_s": tokens[0] / wall, "positions_per_s": positions / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "ttft_p50_ms": float(np.percentile(first, 50)), "ttft_p99_ms": float(np.percentile(first, 99)),
            "calls": int(calls), "rows_per_call": delta.get("dllm_batch_rows_sum", 0.0) / calls,
            "first_call_wait_ms": 1e3 * delta.get("dllm_time_to_first_call_seconds_sum", 0.0) / waits}


def table(rows: list[dict]) -> str:
    single = {r["mode"]: r for r in rows if r["clients"] == 1}
    lines = ["| mode | clients | requests | positions/s | x one client | rows per call | p50 ms | p99 ms | p99 / one client's "
             "(bound: clients) | first token p50 ms | wait for first call ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = single[r["mode"]]
        ratio = r["p99_ms"] / one["p99_ms"]
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['positions_per_s']:,.0f} "
                     f"| {r['positions_per_s'] / one['positions_per_s']:.2f}x | {r['rows_per_call']:.2f} "
                     f"| {r['p50_ms']:,.0f} | {r['p99_ms']:,.0f} | {ratio:.2f}x {'within' if ratio <= r['clients'] else 'OVER'} "
                     f"| {r['ttft_p50_ms']:,.0f} | {r['first_call_wait_ms']:,.1f} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, style in (("batched", "o-"), ("unbatched", "s--")):
        rs = [r for r in rows if r["mode"] == mode]
        axes[0].plot([r["clients"] for r in rs], [r["positions_per_s"] for r in rs], style, label=mode)
        axes[1].plot([r["clients"] for r in rs], [r["p99_ms"] for r in rs], style, label=f"{mode} p99")
        axes[1].plot([r["clients"] for r in rs], [r["p50_ms"] for r in rs], style, alpha=0.4, label=f"{mode} p50")
    axes[0].set_ylabel("positions / s")
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
            family = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
            knobs = {"steps": args.steps} if "steps" in family.get("knobs", ["steps"]) else {}
            level(url, 1, 1, args.max_tokens, knobs)  # warm-up
            for clients in map(int, args.clients.split(",")):
                rows.append({"mode": mode, "family": family.get("family", "mdlm"), **level(url, clients, args.requests, args.max_tokens, knobs)})
                print(f"{mode} {clients}: {rows[-1]['positions_per_s']:.0f} positions/s, {rows[-1]['rows_per_call']:.2f} rows/call, "
                      f"p99 {rows[-1]['p99_ms']:.0f} ms", file=sys.stderr, flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.bundle} ({rows[0]['family'] if rows else '?'}), backend {args.backend} {args.precision}, {args.max_tokens} tokens "
          f"and {args.steps} steps per request where the family uses steps, {machine}, load {load:.1f} at the end\n")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
