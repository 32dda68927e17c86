"""One latency-vs-steps figure from several `dllm bench` runs (their bench.json files).

    python benchmarks/plot_latency.py runs/readme/bench-sweep/bench.json runs/readme/bench-sweep-large/bench.json \\
        -o benchmarks/figures/latency_vs_steps.png --precision fp32,int8-dynamic
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jetson_dllm.bench import Result
from jetson_dllm.bench_report import plot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--backend", default="", help="keep only these backends (comma-separated)")
    p.add_argument("--precision", default="", help="keep only these precisions (comma-separated)")
    args = p.parse_args()
    results = [Result(**r) for f in args.files for r in json.loads(Path(f).read_text())["results"]]
    if args.backend:
        results = [r for r in results if r.backend in args.backend.split(",")]
    if args.precision:
        results = [r for r in results if r.precision in args.precision.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(results, Path(args.out))
    print(f"{len(results)} points -> {args.out}")


if __name__ == "__main__":
    main()
