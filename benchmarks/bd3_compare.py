"""MDLM, block diffusion at several block sizes and the autoregressive baseline, trained the same way, on one table:
held-out NLL, tokens per second, network evaluations, generative perplexity, repetition and distinct-2.

Every model is exported (FP32) and run on onnxruntime, batch 1, generating `--tokens` tokens from nothing through
`dllm bench` (jetson_dllm.bench.run_sweep): MDLM over its whole canvas at several step counts, BD3 block by block at
several steps per block (confidence and the entropy-bounded sampler), AR token by token with its KV cache. The NLL
is `dllm eval` on the whole validation split (diffusion: the bound; AR: exact). The judge, an AR model that is not
among the judged, scores `--samples` stories per row (temperature 0.8) for the quality columns; `--judge` again adds
another judge's column for the same stories (e.g. the old same-data judge and SmolLM2 imported, side by side).

    python benchmarks/bd3_compare.py --data runs/ts --judge runs/cmp/judge --out runs/readme/bd3_compare \
        mdlm=runs/cmp/mdlm bd3-4=runs/cmp/bd3-4 bd3-8=runs/cmp/bd3-8 bd3-16=runs/cmp/bd3-16 bd3-32=runs/cmp/bd3-32 ar=runs/cmp/ar
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from jetson_dllm.bench import run_sweep
from jetson_dllm.families import model_graphs
from train_host.checkpoint import load_model
from train_host.evaluate import evaluate_checkpoint
from train_host.export import export_bundle
from train_host.judge import Judge


def settings(cfg, tokens: int) -> list[tuple[list[int], str]]:
    """The sweeps for a model, (steps, strategy) each: confidence at several step counts (MDLM over the canvas, BD3 per
    block, up to one per token), then the entropy-bounded and the threshold samplers (their defaults: 0.1 nats, 0.9)
    with one step per token as their cap; AR: one."""
    if cfg.attention == "causal":  # (the model config's own field `causal` became its family's attention)
        return [([1], "confidence")]
    most = cfg.block_size or tokens
    return [(sorted({max(1, most // 4), max(1, most // 2), most}), "confidence"), ([most], "eb"), ([most], "threshold")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="name=RUN_FOLDER")
    ap.add_argument("--data", required=True)
    ap.add_argument("--judge", action="append", required=True, help="AR checkpoint scoring the stories (repeatable)")
    ap.add_argument("--out", default="runs/readme/bd3_compare")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prepare-only", action="store_true", help="evaluate and export only (cached), measure nothing: "
                    "the part that may share the CPU with other work")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judges = {} if args.prepare_only else {j: Judge(j) for j in args.judge}
    rows = []
    for spec in args.models:
        name, run = spec.split("=", 1)
        model, _, config = load_model(run)
        cfg = model.cfg
        cached = out / f"{name}.eval.json"
        if not cached.is_file():
            cached.write_text(json.dumps(evaluate_checkpoint(run, args.data, canvases=10_000, n_t=8), default=str))
        metrics = json.loads(cached.read_text())
        bundle = out / f"{name}-bundle"
        if not (bundle / "manifest.json").is_file():
            reads_data = "canvas" in model_graphs(cfg)  # only the canvas graph's parity reads the data (no --int8 here)
            export_bundle(run, bundle, precisions=("fp32",), data_dir=args.data if reads_data else None)
        if args.prepare_only:
            print(f"{name}: NLL {metrics['val_nll']:.3f}, bundle {bundle}", flush=True)
            continue
        results = []
        for steps, strategy in settings(cfg, args.tokens):
            done, env, _ = run_sweep([str(bundle)], ["onnx"], ["fp32"], steps, [args.tokens], [1], [strategy], repeats=args.repeats,
                                     threads=args.threads, out_dir=out / f"{name}-{strategy}", quality=True,
                                     quality_samples=args.samples)
            for r in done:  # every judge scores the same stories once; gen_ppl is the first judge's
                r.extra["judged"] = {j: judge.perplexity(r.extra["samples"]) for j, judge in judges.items()}
                r.gen_ppl = r.extra["judged"][args.judge[0]]
            results += done
        for r in results:
            rows.append({"name": name, "objective": f"bd3 b={cfg.block_size}" if cfg.block_size else cfg.family,
                         "train_steps": config.get("step"), "val_nll": metrics["val_nll"], **asdict(r)})
        print(f"{name}: NLL {metrics['val_nll']:.3f}, " + ", ".join(f"{r.steps}/{r.strategy}: {r.tokens_per_s:.0f} tok/s, "
                                                                  f"ppl {r.gen_ppl:.1f}" for r in results), flush=True)
    if args.prepare_only:
        return
    (out / "bd3_compare.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    (out / "bd3_compare.md").write_text(table(rows, args.judge))
    print(table(rows, args.judge))


def table(rows: list[dict], judges: list[str]) -> str:
    ar = next((r for r in rows if r["objective"] == "ar"), None)
    names = " | ".join(f"gen. ppl ({Path(j).name})" for j in judges)
    lines = [f"| model | objective | train steps | held-out NLL | steps | strategy | network evals | cache passes (folded) | tokens/s | x AR | {names} | repetition | distinct-2 |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(judges) + "---|---|"]
    for r in rows:
        steps = "-" if r["objective"] == "ar" else (f"{r['steps']}/block" if r["block_size"] else str(r["steps"]))
        speed = f"{r['tokens_per_s'] / ar['tokens_per_s']:.2f}" if ar else "-"
        lines.append(f"| {r['name']} | {r['objective']} | {r['train_steps']} | {r['val_nll']:.3f} | {steps} | "
                     f"{r['strategy'] if r['objective'] != 'ar' else '-'} | {r['evaluations']:.0f} | "
                     f"{r['cache_passes']:.0f} ({r['folded_commits']:.0f}) | {r['tokens_per_s']:.0f} | {speed} | "
                     + "".join(f"{r['extra']['judged'][j]:.1f} | " for j in judges)
                     + f"{r['repetition']:.3f} | {r['distinct2']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
