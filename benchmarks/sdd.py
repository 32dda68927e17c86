"""Sparse Distribution Diffusion against AR and MDLM (with and without self-conditioning) on the same data and budget:
the comparison study's table re-made here (issue 25), and SDD's sampling variants.

    python benchmarks/sdd.py --data runs/adapt/data --judge runs/smollm2 --out runs/sdd [--steps 1000]

Runs (each batch 16 x 128, one thread, the same step budget; a run already in OUT/NAME is not trained again, so
`benchmarks/self_cond.py`'s MDLM runs can be linked in): `ar`, `mdlm`, `mdlm-sc` (--self-cond 8), `sdd`
(--candidates 8) and `sdd-swap` (the same with --swap-ids: the truth left out at high noise), and `bd3` (block 4, half the steps: it passes two
copies of the canvas, so the same compute). Per model: the held-out NLL where one is defined (AR exact, MDLM a bound; SDD has none), accuracy
(AR next-token; MDLM masked tokens at the ELBO's noise levels; SDD the plain one, inflated by copying, and the two
honest ones: the truth left out of the candidates, and at t = 1), `--samples` stories of 64 tokens from nothing at
temperature 0.8 (diffusion: 64 steps, block diffusion 4 per block of 4: one token per call everywhere) scored by the judge (SmolLM2-135M imported: none of these), repetition,
distinct-2 and the first two stories; generation time for 64 tokens on onnxruntime (FP32, batch 1, one thread,
greedy, median of 3). Then SDD's loop four ways (deterministic or re-noised feedback, greedy or temperature 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from self_cond import COMMON, train  # noqa: F401 (COMMON: the runs' shared options, as self_cond.py trains them)

STEPS = 64  # diffusion steps for 64 tokens: one network call per token, as the AR baseline makes


def plan(steps: int) -> dict[str, dict]:
    base = ["--lr", "2e-3", "--warmup", "40", "--steps", str(steps), "--eval-every", str(steps)]
    return {"ar": {"args": ["--family", "ar", *base]}, "mdlm": {"args": ["--family", "mdlm", *base]},
            "mdlm-sc": {"args": ["--family", "mdlm", *base, "--self-cond", "8"]}, "sdd": {"args": ["--family", "sdd", *base, "--candidates", "8"]},
            "sdd-swap": {"args": ["--family", "sdd", *base, "--candidates", "8", "--swap-ids"]},
            # block diffusion passes two copies of the canvas (noised and clean): half the steps for the same compute
            "bd3": {"args": ["--family", "bd3", "--block-size", "4", "--lr", "2e-3", "--warmup", "40", "--steps", str(max(1, steps // 2)),
                             "--eval-every", str(max(1, steps // 2))]}}


def stories(run: Path, samples: int, temperature: float, renoise: bool | None = None) -> list[str]:
    """`samples` stories of 64 tokens from nothing, batch 1, one seed each."""
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    texts = []
    with open_runner("torch", run, threads=1) as runner:
        family = family_of(runner.cfg)
        module = family.runtime_module()
        for i in range(samples):
            if family.left_to_right:  # AR: a call per token; BD3: block-size steps per block, a token per call too
                steps = runner.cfg.block_size or STEPS
                g = module.complete(runner, "", length=64, sampler=SamplerConfig(steps=steps, temperature=temperature, seed=i))
            else:
                extra = {"renoise": renoise} if renoise is not None else {}
                sampler = SamplerConfig(steps=STEPS, temperature=temperature, seed=i)
                g = module.generate(runner, runner.tokenizer, "", 64, 1, sampler, allow_empty=True, **extra)
            texts += g.texts
    return texts


def speed_ms(run: Path, out: Path, steps: int = STEPS) -> float:
    """ms to generate 64 tokens on onnxruntime (FP32, batch 1, one thread, greedy, end-of-text banned), diffusion in
    `steps` steps."""
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    bundle = out / "bundles" / run.name
    if not (bundle / "manifest.json").is_file():
        export_bundle(run, bundle, precisions=("fp32",), overwrite=True)
    with open_runner("onnx", bundle, threads=1) as runner:
        family = family_of(runner.cfg)
        sampler = SamplerConfig(steps=runner.cfg.block_size or steps, temperature=0.0, allow_end=False)
        times = [family.runtime_module().bench_generate(runner, run.name, 1, 64, sampler).seconds for _ in range(4)][1:]
    return 1e3 * sorted(times)[1]


def measure(name: str, out: Path, data: str, judge, samples: int) -> dict:
    from train_host.evaluate import evaluate_checkpoint
    from train_host.judge import sample_quality

    path = out / "measured" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    m = evaluate_checkpoint(out / name, data, canvases=10_000, threads=1)
    texts = stories(out / name, samples, 0.8)
    row = {"metrics": {k: v for k, v in m.items() if k.startswith("val_")}, "nll_kind": m["nll_kind"], **sample_quality(texts),
           "judge_ppl": judge.perplexity(texts), "samples": texts[:2]}
    if name.startswith("sdd"):
        row["variants"] = {}
        for label, renoise, temperature in (("deterministic, greedy", False, 0.0), ("deterministic, T 0.8", False, 0.8),
                                            ("re-noised, greedy", True, 0.0), ("re-noised, T 0.8", True, 0.8)):
            texts = stories(out / name, samples, temperature, renoise)
            row["variants"][label] = {**sample_quality(texts), "judge_ppl": judge.perplexity(texts), "sample": texts[0][:200]}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def table(rows: dict, reference: dict, load: str) -> str:
    lines = [f"Machine load while timing: {load}", "",
             "| model | held-out NLL | accuracy | honest accuracy (truth hidden / t = 1) | 64 tokens, onnxruntime (ms) | judge ppl | repetition | distinct-2 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        m = r["metrics"]
        nll = f"{m['val_nll']:.3f} ({r['nll_kind']})" if "val_nll" in m else "none (no bound)"
        honest = f"{m['val_acc_hidden']:.3f} / {m['val_acc_t1']:.3f}" if "val_acc_hidden" in m else "-"
        lines.append(f"| {name} | {nll} | {m['val_acc']:.3f} | {honest} | {r['gen_ms']:.0f} | {r['judge_ppl']:.1f} | {r['repetition']:.3f} | {r['distinct2']:.3f} |")
    lines.append(f"| held-out stories | | | | | {reference['judge_ppl']:.1f} | {reference['repetition']:.3f} | {reference['distinct2']:.3f} |")
    lines += ["", "| SDD model | loop (64 steps) | judge ppl | repetition | distinct-2 | first story |", "|---|---|---|---|---|---|"]
    for name in (n for n in rows if "variants" in rows[n]):
        for label, v in rows[name]["variants"].items():
            lines.append(f"| {name} | {label} | {v['judge_ppl']:.1f} | {v['repetition']:.3f} | {v['distinct2']:.3f} | {v['sample'][:120]!r} |")
    lines += ["", "Two stories each (temperature 0.8):", ""]
    for name, r in rows.items():
        lines += [f"- **{name}**: {s[:240]!r}" for s in r["samples"]]
    return "\n".join(lines)


def study_args(doc: str, out: str) -> argparse.Namespace:
    """The options this study and the continuous one share (data, judge, out, steps, samples, runs, size); torch on
    one thread; the output folder made."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--judge", required=True)
    p.add_argument("--out", default=out)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--runs", default="", help="only these runs (comma-separated names), e.g. ar,sdd")
    p.add_argument("--size", default="", help='shape options for every run, e.g. "--d-model 64 --n-layer 2 --n-head 2" (default: tiny)')
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return args


def main() -> None:
    args = study_args(__doc__, "runs/sdd")
    from adapt import reference_texts

    from train_host.judge import Judge, sample_quality

    out = Path(args.out)
    runs = plan(args.steps)
    if args.runs:
        unknown = set(args.runs.split(",")) - set(runs)
        if unknown:
            raise SystemExit(f"unknown run {sorted(unknown)[0]!r}; choose from {', '.join(runs)}")
        runs = {n: runs[n] for n in args.runs.split(",")}
    t0 = time.time()
    for name, spec in runs.items():
        train(name, spec, args.data, out, args.size.split())
    print(f"training done in {time.time() - t0:.0f} s", file=sys.stderr)
    judge = Judge(args.judge)
    rows = {name: measure(name, out, args.data, judge, args.samples) for name in runs}
    load = os.popen("uptime").read().strip()  # the speeds: every model in one run, one after another, so they compare
    for name in runs:
        rows[name]["gen_ms"] = speed_ms(out / name, out)
    texts = reference_texts(args.data, args.samples, 64)
    reference = {**sample_quality(texts), "judge_ppl": judge.perplexity(texts)}
    report = table(rows, reference, load)
    (out / "sdd.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
