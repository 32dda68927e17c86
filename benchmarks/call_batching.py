"""What one network call costs at batch 1/2/4/8/16 (rows at different positions), and what a call on some of a cache
pool's rows adds (their caches copied into the call's buffers): the bound batching in `dllm serve` works under.

    python benchmarks/call_batching.py runs/serve/bd3 runs/serve/ar runs/serve/mdlm --threads 2

Each bundle's generating graph (block step, decode, or the canvas at the bundle's longest canvas) on onnxruntime;
the median of `--calls` calls after 5 warm-up calls. Prints two markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from jetson_dllm.families import family_of
from jetson_dllm.runners.graphs import GRAPHS
from jetson_dllm.runners.loaders import open_runner

BATCHES = (1, 2, 4, 8, 16)


def median_ms(runner, graph: str, feeds: dict, calls: int) -> float:
    for _ in range(5):
        runner.run(graph, feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        runner.run(graph, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def feeds_for(runner, graph: str, batch: int) -> dict:
    cfg = runner.cfg
    width = family_of(cfg).positions_per_call(cfg, max(runner.canvas_lengths))
    feeds = {"tokens": np.full((batch, width), cfg.mask_id, np.int32)}
    if GRAPHS[graph].cache:  # rows at different positions, all inside the context
        feeds["valid_len"] = ((np.arange(batch) * 4 + cfg.canvas_len // 4) % (cfg.canvas_len - width)).astype(np.int32)
    return feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=40)
    args = p.parse_args()
    per_call, pooled = [], []
    for path in args.bundles:
        with open_runner("onnx", path, threads=args.threads) as runner:
            graph = [g for g in runner.graphs if g in ("block_step", "decode", "canvas")][0]
            row = [median_ms(runner, graph, feeds_for(runner, graph, b), args.calls) for b in BATCHES]
            title = f"{family_of(runner.cfg).name} {graph}"
            per_call.append(f"| {title} | {row[0]:.2f} ms | " + " | ".join(f"{x / row[0]:.1f}x" for x in row[1:]) + " |")
            if GRAPHS[graph].cache:
                runner.open_slots(max(BATCHES))
                for b in (1, 4, 8):
                    own = feeds_for(runner, graph, b)
                    slots = (np.arange(b, dtype=np.int32)[::-1] * 2)  # rows spread over the pool, not in order
                    a, c = median_ms(runner, graph, own, args.calls), median_ms(runner, graph, {**own, "slots": slots}, args.calls)
                    pooled.append(f"| {title} | {b} | {a:.2f} ms | {c:.2f} ms | {100 * (c / a - 1):+.0f}% |")
    load = os.getloadavg()[0]
    print(f"onnxruntime, {args.threads} threads, {os.cpu_count()} CPUs, load {load:.1f}; median of {args.calls} calls\n")
    print("| graph | batch 1 | " + " | ".join(map(str, BATCHES[1:])) + " |")
    print("|---" * (len(BATCHES) + 1) + "|")
    print("\n".join(per_call))
    if pooled:
        print("\n| graph | rows | own cache | pool rows (copied in) | difference |\n|---|---|---|---|---|")
        print("\n".join(pooled))


if __name__ == "__main__":
    main()
