"""Speculative decoding with adapted block-diffusion drafters against the AR parent alone (issue 39): accepted tokens
per round, network calls per generated token with both models counted, tokens/s on onnxruntime in the same run, and
the quality beside it (the parent's by construction: greedy text identical, sampled text under the judge).

    python benchmarks/speculative.py --data runs/spec/data --out runs/spec --judge runs/smollm2

The parent and the children are benchmarks/adapt.py's recipe (trained here when OUT/NAME has no checkpoint): AR,
400 steps, canvas 128, batch 16; BD3 children b = 4, 8, 16 with the token shift and complementary masks at 30% of
the parent's compute. Each is exported (FP32) and run on onnxruntime, one thread, batch 1. The prompts are the first
`--prompt-tokens` tokens of the first `--openings` held-out stories; each generates `--tokens` tokens, end-of-text
banned (every run the same length). Per child, temperature (0 and 0.8) and draft steps (1, 2, a whole block):
jetson_dllm.speculative_bench's points (the parent alone first, in the same run), acceptance by draft offset and
by the first drafted token's position in the block. At temperature 0.8 the judge's perplexity and distinct-2 of the
parent's texts alone and with each child at one draft step (the same distribution by construction: a check).

    python benchmarks/speculative.py --data runs/smol-data --parent runs/smollm2-bundle --children runs/smol-bd3-4

`--parent` measures a pair that exists (an imported SmolLM2's bundle, a child adapted from it; runs or bundles,
each on its own backend: onnxruntime for a bundle, torch for a run) instead of training the recipe's; the data's
held-out stories are then tokenized with the parent's tokenizer (`dllm data --tokenizer PARENT`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from adapt import runs, train_all  # noqa: E402  (the recipe, shared)

CHILDREN = "bd3-4-shift-comp,bd3-8-shift-comp,bd3-16-shift-comp"


def openings(data: str, count: int, tokens: int) -> list[list[int]]:
    """The first `tokens` tokens of the first `count` held-out stories (ids of the data's tokenizer)."""
    import numpy as np

    from jetson_dllm.tokenizer import TextTokenizer
    from train_host.data import CanvasDataset

    tok = TextTokenizer.from_file(Path(data) / "tokenizer.json")
    rows = CanvasDataset(data, "val", tokens, tok.pad_id).batch(np.arange(count))
    return [[int(t) for t in row if t != tok.pad_id] for row in rows]


def bundle(run: Path, out: Path) -> Path:
    from train_host.export import export_bundle

    path = out / "bundles" / run.name
    if not (path / "manifest.json").is_file():
        export_bundle(run, path, overwrite=True)
    return path


def by_block_position(points_runs, block: int, shifted: bool) -> list[float]:
    """Acceptance of a round's first drafted token by its position in the drafter's block."""
    hits, seen = [0] * block, [0] * block
    for r in points_runs:
        for start, drafted, accepted in zip(r.starts, r.drafted_at, r.accepted_at):
            if drafted:
                at = (start + int(shifted)) % block
                seen[at] += 1
                hits[at] += accepted > 0
    return [h / s if s else float("nan") for h, s in zip(hits, seen)]


def quality(verifier, drafter, prompts, tokens: int, judge, tok) -> dict:
    """Judge perplexity and distinct-2 of the parent's sampled texts alone and with the drafter (one draft step)."""
    from jetson_dllm.sampler import SamplerConfig
    from jetson_dllm.speculative_bench import parent_alone, speculate
    from jetson_dllm.textstats import distinct

    out = {}
    for label, make in (("parent alone", lambda p, s: parent_alone(verifier, p, tokens, s, False)),
                        ("with the drafter", lambda p, s: speculate(verifier, drafter, 1, p, tokens, s, False))):
        texts = [tok.decode([int(t) for t in make(p, SamplerConfig(temperature=0.8, seed=i)).tokens[0]]) for i, p in enumerate(prompts)]
        out[label] = {"judge_ppl": judge.perplexity(texts) if judge else None, "distinct2": distinct(texts, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/spec")
    ap.add_argument("--judge", default="", help="an AR checkpoint none of these is (SmolLM2 from dllm import); none: no judge column")
    ap.add_argument("--children", default=CHILDREN)
    ap.add_argument("--openings", type=int, default=12)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--parent", default="", help="an existing parent (run or bundle): --children are then paths, nothing is trained")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = Path(args.out)
    names = args.children.split(",")
    if args.parent:
        models = {"parent": Path(args.parent), **{Path(n).name: Path(n) for n in names}}
        names = [Path(n).name for n in names]
    else:
        plan = {n: spec for n, spec in runs(400, 0.3, "1e-3").items() if n == "ar" or n in names}
        train_all(plan, args.data, out, args.lanes, ["--canvas-len", "128", "--batch-size", "16"], [])
        models = {"parent": bundle(out / "ar", out), **{n: bundle(out / n, out) for n in names}}

    from jetson_dllm.generate import open_model
    from jetson_dllm.sampler import SamplerConfig
    from jetson_dllm.speculative_bench import bench_speculative, points_json

    prompts = openings(args.data, args.openings, args.prompt_tokens)
    judge = None
    if args.judge:
        from train_host.judge import Judge

        judge = Judge(args.judge)
    results = {"uptime": os.popen("uptime").read().strip(), "prompts": len(prompts), "tokens": args.tokens, "children": {}}
    with open_model(models["parent"], threads=1) as verifier:
        tok = verifier.tokenizer
        for name in names:
            with open_model(models[name], threads=1) as drafter:
                block = drafter.cfg.block_size
                steps = sorted({1, 2, block})
                row = {"block": block}
                for temperature in (0.0, 0.8):
                    sampler = SamplerConfig(temperature=temperature, seed=0)
                    points = bench_speculative(verifier, drafter, steps, args.tokens, prompts, sampler, repeats=1, warmup=1)
                    row[f"t={temperature:g}"] = points_json(points)
                    # the one-step point's own runs (steps sort 1 first)
                    row[f"t={temperature:g}"][1]["accepted_by_block_position"] = by_block_position(points[1].results, block, drafter.cfg.shift)
                    print(f"{name} t={temperature:g}: " + ", ".join(f"steps {p['draft_steps']}: {p['calls_per_token']:.2f} calls/token, "
                                                                  f"{p['tokens_per_s']:.0f} tok/s" for p in row[f"t={temperature:g}"]), file=sys.stderr, flush=True)
                row["quality"] = quality(verifier, drafter, prompts, args.tokens, judge, tok)
                results["children"][name] = row
    results["uptime_after"] = os.popen("uptime").read().strip()
    results["parent"] = str(models["parent"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    lines = [f"{results['prompts']} held-out openings, {results['tokens']} tokens each, one thread ({results['uptime']})", "",
             "| drafter | temperature | setting | calls/token (both) | accepted/round | tokens/s | speed-up (CPU) | launch-bound speed-up | parent's text |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["children"].items():
        for key in ("t=0", "t=0.8"):
            for p in row[key]:
                setting = "parent alone" if not p["draft_steps"] else f"{p['draft_steps']} draft step{'s' if p['draft_steps'] > 1 else ''}"
                lines.append(f"| {name} | {key[2:]} | {setting} | {p['calls_per_token']:.2f} | {p['accepted_per_round']:.2f} | {p['tokens_per_s']:.0f} | "
                             f"{p['speedup']:.2f}x | {p['launch_bound_speedup']:.2f}x | {'yes' if p['identical'] else 'NO'}"
                             f"{' (sampled)' if key != 't=0' else ''} |")
    lines += ["", "| drafter | temperature | accepted by draft offset (1 draft step) | first drafted token accepted, by its position in the block |", "|---|---|---|---|"]
    for name, row in results["children"].items():
        for key in ("t=0", "t=0.8"):
            p = row[key][1]
            lines.append(f"| {name} | {key[2:]} | {', '.join(f'{a:.2f}' for a in p['accepted_by_offset'])} | "
                         f"{', '.join(f'{a:.2f}' for a in p['accepted_by_block_position'])} |")
    lines += ["", "| drafter | texts | judge perplexity | distinct-2 |", "|---|---|---|---|"]
    for name, row in results["children"].items():
        for label, q in row["quality"].items():
            lines.append(f"| {name} | {label} | {q['judge_ppl']:.2f} | {q['distinct2']:.3f} |" if q["judge_ppl"] is not None
                         else f"| {name} | {label} | - | {q['distinct2']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
