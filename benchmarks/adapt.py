"""Block diffusion adapted from an autoregressive parent, against the parent, the parent trained on, and diffusion
from scratch at the same compute: held-out NLL, generative perplexity under an external judge, and network calls per
generated token at each decoding setting (issue 23).

    python benchmarks/adapt.py --data runs/adapt/data --judge runs/smollm2 --out runs/adapt [--parent-steps 400]

Compute is counted in network positions (rows x positions through the transformer per optimizer step): AR and MDLM
pass B x L, block diffusion B x 2L (the noised and the clean copy), twice that with complementary masks. Every run has
the same batch and canvas; step budgets, not time budgets, so the machine's load does not move the numbers. The
adaptation budget is `--adapt-fraction` of the parent's compute; the from-scratch rows and the AR parent trained on
get the parent's compute plus that budget. Training runs, then measurements, go `--lanes` at a time, one thread
each; a finished run (its folder holds a checkpoint) is not trained again and a measured model (OUT/measured/NAME.json)
not measured again, so the script resumes where it stopped.

Measured per model: the held-out NLL (`dllm eval` on the validation split: AR exact, diffusion the bound, over the
same text tokens, padding never scored), then `--samples` stories from the start token at temperature 0.8 for each
decoding setting, scored by the judge (a model none of these is: SmolLM2-135M imported with `dllm import`), with the
network calls each token cost (block steps plus the commits not folded into them; AR: one per token); the real
held-out stories' score under the same judge is the reference row. Tokens/s on onnxruntime (batch 1, `--tokens`
tokens, greedy, end-of-text banned, one thread) for the models named by `--speed`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path

COMMON = ["--threads", "1", "--log-every", "20", "--eval-canvases", "64"]


def runs(parent_steps: int, fraction: float, adapt_lr: str) -> dict[str, dict]:
    """name -> {args, after (a run it starts from), cost (network positions per step, in AR steps)}."""
    budget = fraction * parent_steps  # in AR-step equivalents
    total = parent_steps + budget
    adapt = ["--t-min", "0.001", "--t-max", "1", "--warmup", "5", "--min-lr-ratio", "0.1"]
    out = {
        "ar": {"args": ["--family", "ar", "--steps", str(parent_steps), "--lr", "2e-3", "--warmup", "40",
                        "--eval-every", str(parent_steps)], "cost": 1},
        "ar+": {"args": ["--family", "ar", "--steps", str(round(budget)), "--lr", adapt_lr, "--warmup", "5",
                         "--eval-every", str(round(budget))], "after": "ar", "cost": 1},
        "mdlm-scratch": {"args": ["--family", "mdlm", "--steps", str(round(total)), "--lr", "2e-3", "--warmup", "40",
                                  "--eval-every", str(round(total))], "cost": 1},
        "bd3-4-scratch": {"args": ["--family", "bd3", "--block-size", "4", "--steps", str(round(total / 2)), "--lr", "2e-3",
                                   "--warmup", "40", "--eval-every", str(round(total / 4))], "cost": 2},
    }
    for block, shift, comp in ((4, True, True), (4, True, False), (4, False, True), (4, False, False), (8, True, True),
                               (16, True, True), (16, False, False)):
        cost = 2 * (2 if comp else 1)
        steps = str(max(1, round(budget / cost)))
        name = f"bd3-{block}" + ("-shift" if shift else "") + ("-comp" if comp else "")
        out[name] = {"args": ["--family", "bd3", "--block-size", str(block), "--steps", steps, "--lr", adapt_lr,
                              "--eval-every", steps, *adapt, *(["--shift"] if shift else []), *(["--complementary"] if comp else [])],
                     "after": "ar", "cost": cost}
    for lr in ("3e-4", "3e-3"):  # the adaptation learning rate, measured on the best recipe
        steps = str(max(1, round(budget / 4)))
        out[f"bd3-4-shift-comp-lr{lr}"] = {"args": ["--family", "bd3", "--block-size", "4", "--steps", steps, "--lr", lr,
                                                    "--eval-every", steps, *adapt, "--shift", "--complementary"], "after": "ar", "cost": 4}
    steps = str(max(1, round(budget / (4 + 1 / 3))))  # distillation: the frozen parent's forward pass (a third of a step) on top
    out["bd3-4-shift-comp-distill0.5"] = {"args": ["--family", "bd3", "--block-size", "4", "--steps", steps, "--lr", adapt_lr, "--eval-every",
                                                   steps, *adapt, "--shift", "--complementary", "--distill", "0.5"], "after": "ar", "cost": 4 + 1 / 3}
    return out


def train_all(plan: dict, data: str, out: Path, lanes: int, common: list[str], size: list[str]) -> None:
    """Every run of the plan, `lanes` at a time (the parent first); `size` goes to the runs that do not start from
    the parent (with --init the shape is the parent's)."""
    def job(name: str) -> None:
        spec, folder = plan[name], out / name
        if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("step_*")):
            return
        init = ["--init", str(out / spec["after"])] if "after" in spec else []
        log = (out / f"{name}.log").open("w")
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "jetson_dllm", "train", "--data", data, "--out", str(folder), *COMMON,
                               *common, *spec["args"], *(size if not init else []), *init], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"trained {name} in {time.time() - t0:.0f} s (rc {done.returncode})", file=sys.stderr, flush=True)
        if done.returncode:
            raise SystemExit(f"training {name} failed: see {out / name}.log")

    with ThreadPoolExecutor(lanes) as pool:  # the parent first; the rest as lanes free up
        pool.submit(job, "ar").result()
        list(pool.map(job, [n for n in plan if n != "ar"]))


def settings(cfg) -> list[tuple[str, dict]]:
    """(label, sampler options) of every decoding setting for a model."""
    if cfg.family == "ar":
        return [("token by token", {})]
    if cfg.family == "mdlm":
        return [(f"{s} steps", {"steps": s, "strategy": "confidence"}) for s in (32, 64, 128)]
    b = cfg.block_size
    return ([(f"{s} steps/block", {"steps": s, "strategy": "confidence"}) for s in sorted({b, max(1, b // 2), max(1, b // 4)}, reverse=True)]
            + [(f"threshold {t}", {"steps": b, "strategy": "threshold", "threshold": t}) for t in (0.5, 0.1)]
            + [("eb 1.0", {"steps": b, "strategy": "eb", "eb_bound": 1.0})])


def generate(run: Path, options: dict, samples: int, tokens: int) -> tuple[list[str], float]:
    """`samples` stories from the start token, one at a time (batch 1, as a device runs them: in a batch the least
    confident row sets the calls of all), and the network calls per generated token over all of them."""
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    texts, calls, made = [], 0, 0
    with open_runner("torch", run, threads=1) as runner:
        family = family_of(runner.cfg)
        for i in range(samples):
            sampler = SamplerConfig(temperature=0.8, seed=i, **options)
            if family.attention == "bidirectional":  # MDLM: a whole canvas from nothing (dllm run asks for a prompt)
                g = family.runtime_module().generate(runner, runner.tokenizer, "", tokens, 1, sampler, allow_empty=True)
                calls, made = calls + g.result.evaluations, made + tokens
            else:
                g = family.runtime_module().complete(runner, "", length=tokens, num_samples=1, sampler=sampler)
                r = g.result  # block steps and the commits not folded into them; AR: one call per token
                calls += r.evaluations + r.commits if family.attention == "block" else len(r.step_ms)
                made += max(1, r.new_tokens)
            texts += g.texts
    return texts, calls / made


def reference_texts(data: str, samples: int, tokens: int) -> list[str]:
    """The first held-out stories, cut at `tokens` tokens of our tokenizer."""
    from jetson_dllm.tokenizer import TextTokenizer
    from train_host.data import CanvasDataset, load_manifest

    tok = TextTokenizer.from_file(Path(data) / "tokenizer.json")
    ds = CanvasDataset(data, "val", tokens, tok.pad_id)
    import numpy as np

    rows = ds.batch(np.arange(samples))
    load_manifest(data)
    return [tok.decode([int(t) for t in row if t != tok.pad_id]) for row in rows]


def speed(run: Path, out: Path, options: dict, tokens: int) -> float:
    """Tokens/s on onnxruntime (FP32, batch 1, one thread, end-of-text banned), median of 3."""
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    bundle = out / "bundles" / run.name
    if not (bundle / "manifest.json").is_file():
        export_bundle(run, bundle, overwrite=True)
    with open_runner("onnx", bundle, threads=1) as runner:
        family = family_of(runner.cfg)
        sampler = SamplerConfig(temperature=0.0, allow_end=False, **options)
        times = [family.runtime_module().bench_generate(runner, run.name, 1, tokens, sampler).seconds for _ in range(4)][1:]
    return tokens / sorted(times)[1]


def zero_shot(parent: Path, data: str, canvases: int = 64) -> dict[str, float]:
    """The parent's exact NLL and its weights as block diffusion before any adaptation: shifted at block sizes 1, 4
    and 16 (at 1 it is the parent), unshifted at 4 (its head read at the wrong position); on the first `canvases`
    held-out canvases, the bound with 4 noise levels each (cheap: this is a diagnostic, not a result row)."""
    from jetson_dllm.config import ModelConfig
    from train_host import checkpoint as ck
    from train_host.data import CanvasDataset
    from train_host.evaluate import evaluate
    from train_host.model import Denoiser

    cfg, weights, tok, _ = ck.load_checkpoint(str(parent))
    ds = CanvasDataset(data, "val", cfg.canvas_len, tok.pad_id)
    out = {}
    for family, block, shift in (("ar", 0, False), ("bd3", 1, True), ("bd3", 4, True), ("bd3", 16, True), ("bd3", 4, False)):
        model = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": family, "block_size": block, "shift": shift})).eval()
        ck.load_weights(model, weights, str(parent))
        label = "parent (exact)" if family == "ar" else f"b={block}" + (" shifted" if shift else " unshifted")
        out[label] = evaluate(model, ds, cfg.mask_id, n_canvases=canvases, n_t=4, bos_id=tok.bos_id)["val_nll"]
    return out


def measure(name: str, spec: dict, out: Path, data: str, judge_path: str, samples: int, tokens: int) -> str:
    """One model's row, written once to OUT/measured/NAME.json: its held-out NLL (the whole validation split) and,
    per decoding setting, the judge's perplexity, repetition and distinct-n of `samples` stories, calls per token."""
    import torch

    from train_host.checkpoint import load_checkpoint
    from train_host.evaluate import evaluate_checkpoint
    from train_host.judge import Judge, sample_quality

    torch.set_num_threads(1)
    path = out / "measured" / f"{name}.json"
    if path.is_file():
        return name
    run, judge = out / name, Judge(judge_path)
    m = evaluate_checkpoint(run, data, canvases=10_000, threads=1)
    row = {"nll": m["val_nll"], "nll_kind": m["nll_kind"], "compute": round(spec["cost"] * int(spec["args"][spec["args"].index("--steps") + 1])),
           "decoding": {}}
    for label, options in settings(load_checkpoint(run)[0]):
        texts, calls = generate(run, options, samples, tokens)
        row["decoding"][label] = {**sample_quality(texts), "judge_ppl": judge.perplexity(texts), "calls_per_token": calls,
                                  "sample": texts[0][:300]}
    path.write_text(json.dumps(row, indent=1))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--judge", required=True, help="an AR checkpoint none of the judged is (e.g. SmolLM2 from dllm import)")
    ap.add_argument("--out", default="runs/adapt")
    ap.add_argument("--parent-steps", type=int, default=400)
    ap.add_argument("--adapt-fraction", type=float, default=0.3)
    ap.add_argument("--adapt-lr", default="1e-3")
    ap.add_argument("--lanes", type=int, default=2, help="runs trained, and models measured, at a time (one thread each)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--speed", default="ar,bd3-4-shift-comp,bd3-16-shift-comp", help="models timed on onnxruntime")
    ap.add_argument("--runs", default="", help="only these runs (the parent always), e.g. for a quick check")
    ap.add_argument("--canvas", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", default="", help="size flags of the runs from scratch, e.g. '--d-model 64 --n-layer 2 --n-head 2' "
                    "(default: the tiny config)")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "measured").mkdir(parents=True, exist_ok=True)
    plan = runs(args.parent_steps, args.adapt_fraction, args.adapt_lr)
    if args.runs:
        plan = {n: spec for n, spec in plan.items() if n == "ar" or n in args.runs.split(",")}
    train_all(plan, args.data, out, args.lanes, ["--canvas-len", str(args.canvas), "--batch-size", str(args.batch)], args.size.split())
    with ProcessPoolExecutor(args.lanes, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(measure, n, spec, out, args.data, args.judge, args.samples, args.tokens) for n, spec in plan.items()]
        for job in as_completed(jobs):
            print(f"measured {job.result()}", file=sys.stderr, flush=True)
    results = {n: json.loads((out / "measured" / f"{n}.json").read_text()) for n in plan}
    extra = out / "measured" / "_extra.json"  # the reference row, the zero-shot bounds, the speeds: computed once
    more = json.loads(extra.read_text()) if extra.is_file() else {}
    if "reference" not in more:
        from train_host.judge import Judge

        more["reference"] = {"judge_ppl": Judge(args.judge).perplexity(reference_texts(args.data, args.samples, args.tokens))}
    if "zero_shot" not in more:
        more["zero_shot"] = zero_shot(out / "ar", args.data)
    from train_host.checkpoint import load_checkpoint

    for name in [n for n in args.speed.split(",") if n in plan]:
        for label, options in settings(load_checkpoint(out / name)[0]):
            more.setdefault("speed", {}).setdefault(name, {}).setdefault(label, speed(out / name, out, options, args.tokens))
        extra.write_text(json.dumps(more, indent=1))
    extra.write_text(json.dumps(more, indent=1))
    print(table({**results, **more}, plan, args))


def table(results: dict, plan: dict, args) -> str:
    parent = results["ar"]["nll"]
    lines = [f"Parent: AR, {args.parent_steps} steps; adaptation budget {args.adapt_fraction:.0%} of its compute; judge "
             f"{args.judge} (real held-out stories: perplexity {results['reference']['judge_ppl']:.1f}). Compute in AR steps "
             "(B x L network positions). On the first 64 held-out canvases, the parent and its weights as block diffusion "
             "before any adaptation (bound): " + ", ".join(f"{k} {v:.3f}" for k, v in results.get("zero_shot", {}).items()) + ".", "",
             "| model | from | compute | held-out NLL | vs parent | decoding | calls/token | judge ppl | tokens/s (onnx) |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, spec in plan.items():
        row = results[name]
        start = "ar" if "after" in spec else "scratch"
        for i, (label, d) in enumerate(row["decoding"].items()):
            head = (f"| {name} | {start} | {row['compute']} | {row['nll']:.3f} ({row['nll_kind']}) | {row['nll'] / parent - 1:+.1%} "
                    if i == 0 else "| | | | | ")
            tps = results.get("speed", {}).get(name, {}).get(label)
            rep = f" (distinct-2 {d['distinct2']:.2f})" if "distinct2" in d else ""  # the judge rewards loops: this shows them
            lines.append(head + f"| {label} | {d['calls_per_token']:.2f} | {d['judge_ppl']:.1f}{rep} | {f'{tps:.0f}' if tps else ''} |")
    first = {n: next(iter(results[n]["decoding"].values()))["sample"] for n in plan}
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}: {text!r}" for n, text in first.items())


if __name__ == "__main__":
    main()
