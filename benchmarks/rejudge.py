"""Score the stories a `dllm bench --quality` kept with other judges, beside the judge it ran with.

`dllm bench --quality` keeps each point's samples in bench.json (`extra.samples`); this reads them back and asks
each `--judge` (an autoregressive checkpoint: one of ours, or a model brought in with `dllm import`, e.g. SmolLM2)
for their generative perplexity. The texts are the same, so the columns compare judges, not samples:

    python benchmarks/rejudge.py runs/readme/bench-quality/bench.json --judge runs/smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from train_host.judge import Judge


def points(bench_json: Path) -> list[dict]:
    """The results of a bench.json that kept quality samples; a clear error when none did."""
    try:
        results = json.loads(bench_json.read_text())["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {bench_json} is not a dllm bench result ({e})") from None
    kept = [r for r in results if (r.get("extra") or {}).get("samples")]
    if not kept:
        raise SystemExit(f"error: {bench_json} kept no samples: run dllm bench with --quality")
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json", nargs="+", type=Path)
    p.add_argument("--judge", action="append", required=True, help="autoregressive checkpoint (repeatable)")
    args = p.parse_args()
    judges = {j: Judge(j) for j in args.judge}
    names = " | ".join(f"gen. ppl ({Path(j).name})" for j in judges)
    print(f"| model | backend | precision | steps | strategy | samples | gen. ppl (the bench's judge) | {names} | repetition | distinct-2 |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(judges) + "---|---|")
    for path in args.bench_json:
        for r in points(path):
            texts = r["extra"]["samples"]
            scores = " | ".join(f"{judge.perplexity(texts):.1f}" for judge in judges.values())
            before = "-" if r.get("gen_ppl") is None else f"{r['gen_ppl']:.1f}"
            print(f"| {Path(r['model']).name} | {r['backend']} | {r['precision']} | {r['steps']} | {r['strategy']} | {len(texts)} | "
                  f"{before} | {scores} | {r['repetition']:.3f} | {r['distinct2']:.3f} |")


if __name__ == "__main__":
    main()
