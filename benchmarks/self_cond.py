"""Self-conditioning for masked diffusion (issue 25): the steps-vs-generative-perplexity curve with and without, on
the same data and budget, and what it costs per step.

    python benchmarks/self_cond.py --data runs/adapt/data --judge runs/smollm2 --out runs/selfcond [--steps 1000]

Four tiny MDLM runs, each on the same batches (batch 16 x 128, one thread, step budgets so the machine's load does not
move the numbers): `mdlm` (plain, --steps), `mdlm-sc` (the standard recipe from scratch: --self-cond 8, a first pass
on half the steps), and from `mdlm`'s checkpoint --post-steps more steps each of `mdlm+` (plain: the control) and
`mdlm+sc` (post-trained to self-condition at rate 1, as SCMDM). A finished run is not trained again and a measured
model (OUT/measured-sc/NAME.json) not measured again, so the script resumes where it stopped.

Per model: the held-out NLL bound (`dllm eval`: a self-conditioned model's with its second pass), then at 8, 16, 32
and 64 denoising steps, `--samples` stories of 64 tokens from nothing (temperature 0.8, batch 1) scored by the judge
(SmolLM2-135M imported with `dllm import`: none of our models), with repetition and distinct-2; the network calls are
the same with and without (the soft inputs ride on the calls the sampler makes anyway). The cost per step: the FP32
canvas graph on onnxruntime (one thread, batch 1, a 64-token canvas) with and without the soft inputs, median of
interleaved calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adapt import generate, reference_texts

COMMON = ["--threads", "1", "--log-every", "20", "--eval-canvases", "64", "--batch-size", "16", "--canvas-len", "128", "--seed", "0"]
STEPS = (8, 16, 32, 64)


def plan(steps: int, post: int) -> dict[str, dict]:
    """name -> {args, after (the run it starts from)}."""
    base = ["--family", "mdlm", "--lr", "2e-3", "--warmup", "40"]
    after = ["--family", "mdlm", "--lr", "5e-4", "--warmup", "5", "--steps", str(post), "--eval-every", str(post)]
    return {
        "mdlm": {"args": [*base, "--steps", str(steps), "--eval-every", str(steps)]},
        "mdlm-sc": {"args": [*base, "--steps", str(steps), "--eval-every", str(steps), "--self-cond", "8"]},
        "mdlm+": {"args": after, "after": "mdlm"},
        "mdlm+sc": {"args": [*after, "--self-cond", "8", "--self-cond-rate", "1"], "after": "mdlm"},
    }


def train(name: str, spec: dict, data: str, out: Path, size: list[str] = ()) -> None:
    """Train one run of a plan unless its folder holds a checkpoint; `size` (shape options) goes to the runs that do not
    start from another (with --init the shape is the parent's)."""
    folder = out / name
    if (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("step_*")):
        return
    init = ["--init", str(out / spec["after"])] if "after" in spec else []
    t0 = time.time()
    with (out / f"{name}.log").open("w") as log:
        done = subprocess.run([sys.executable, "-m", "jetson_dllm", "train", "--data", data, "--out", str(folder), *COMMON, *spec["args"], *init,
                               *(size if not init else [])],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"trained {name} in {time.time() - t0:.0f} s (rc {done.returncode})", file=sys.stderr, flush=True)
    if done.returncode:
        raise SystemExit(f"training {name} failed: see {out / name}.log")


def train_seconds(run: Path) -> float:
    """The run's own training time (its last logged `elapsed`), for the compute column."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"elapsed"' in line]
    return rows[-1]["elapsed"] if rows else float("nan")


def measure(name: str, out: Path, data: str, judge_path: str, samples: int) -> dict:
    import torch

    from train_host.evaluate import evaluate_checkpoint
    from train_host.judge import Judge, sample_quality

    torch.set_num_threads(1)
    path = out / "measured-sc" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    run, judge = out / name, Judge(judge_path)
    row = {"nll": evaluate_checkpoint(run, data, canvases=10_000, threads=1)["val_nll"], "train_s": train_seconds(run), "steps": {}}
    for s in STEPS:
        texts, calls = generate(run, {"steps": s, "strategy": "confidence"}, samples, 64)
        row["steps"][str(s)] = {**sample_quality(texts), "judge_ppl": judge.perplexity(texts), "calls_per_token": calls, "sample": texts[0][:300]}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def step_cost(out: Path, calls: int = 60) -> dict[str, float]:
    """ms per canvas-graph call (onnxruntime FP32, one thread, batch 1, 64 positions): the plain model, the
    self-conditioned one fed zeros (its first step) and fed a previous prediction; interleaved, medians."""
    import numpy as np

    from jetson_dllm.runners.loaders import open_runner
    from train_host.export import export_bundle

    runners = {}
    for name in ("mdlm+", "mdlm+sc"):
        bundle = out / "bundles" / name
        if not (bundle / "manifest.json").is_file():
            export_bundle(out / name, bundle, precisions=("fp32",), overwrite=True)
        runners[name] = open_runner("onnx", bundle, threads=1)
    rng = np.random.default_rng(0)
    tokens = np.full((1, 64), runners["mdlm+"].cfg.mask_id, np.int32)
    vocab = runners["mdlm+"].cfg.vocab_size
    soft = {"soft_ids": rng.integers(3, vocab, (1, 64, 8)).astype(np.int32), "soft_probs": np.full((1, 64, 8), 0.1, np.float32)}
    cases = {"plain": ("mdlm+", {}), "self-conditioned, no soft input": ("mdlm+sc", {}), "self-conditioned, soft input": ("mdlm+sc", soft)}
    times = {label: [] for label in cases}
    for _ in range(calls):
        for label, (name, extra) in cases.items():
            t0 = time.perf_counter()
            runners[name].run("canvas", {"tokens": tokens, **extra})
            times[label].append(1e3 * (time.perf_counter() - t0))
    return {label: float(np.median(v[min(5, len(v) - 1):])) for label, v in times.items()}  # the first calls warm up


def report(rows: dict, reference: dict, cost: dict, load: str) -> str:
    lines = [f"Machine load while measuring: {load}", "",
             "| model | training | held-out NLL bound | " + " | ".join(f"judge ppl @{s}" for s in STEPS) + " | repetition @64 | distinct-2 @64 |",
             "|---|---|---|" + "---|" * len(STEPS) + "---|---|"]
    for name, r in rows.items():
        ppl = " | ".join(f"{r['steps'][str(s)]['judge_ppl']:.1f}" for s in STEPS)
        last = r["steps"][str(STEPS[-1])]
        lines.append(f"| {name} | {r['train_s'] / 60:.1f} min | {r['nll']:.3f} | {ppl} | {last['repetition']:.3f} | {last['distinct2']:.3f} |")
    lines.append(f"| held-out stories | | | {reference['judge_ppl']:.1f} (all) | | | | {reference['repetition']:.3f} | {reference['distinct2']:.3f} |")
    lines += ["", "| canvas call (onnxruntime FP32, 1 thread, 64 positions) | ms (median) |", "|---|---|"]
    lines += [f"| {label} | {ms:.2f} |" for label, ms in cost.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a `dllm data` folder (TinyStories)")
    p.add_argument("--judge", required=True, help="the judge checkpoint (dllm import of SmolLM2-135M)")
    p.add_argument("--out", default="runs/selfcond")
    p.add_argument("--steps", type=int, default=1000, help="training steps of the from-scratch runs")
    p.add_argument("--post-steps", type=int, default=200, help="steps after `mdlm` of the post-trained runs")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--lanes", type=int, default=2, help="runs trained / measured at once (one thread each)")
    p.add_argument("--calls", type=int, default=60, help="interleaved calls per case of the per-call cost")
    p.add_argument("--size", default="", help='shape options for every run, e.g. "--d-model 64 --n-layer 2 --n-head 2" (default: tiny)')
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(args.steps, args.post_steps)
    with ThreadPoolExecutor(args.lanes) as pool:
        list(pool.map(lambda n: train(n, runs[n], args.data, out, args.size.split()), ["mdlm", "mdlm-sc"]))
        list(pool.map(lambda n: train(n, runs[n], args.data, out, args.size.split()), ["mdlm+", "mdlm+sc"]))
    load = os.popen("uptime").read().strip()
    with ThreadPoolExecutor(args.lanes) as pool:
        rows = dict(zip(runs, pool.map(lambda n: measure(n, out, args.data, args.judge, args.samples), runs)))
    from train_host.judge import Judge, sample_quality

    texts = reference_texts(args.data, args.samples, 64)
    reference = {**sample_quality(texts), "judge_ppl": Judge(args.judge).perplexity(texts)}
    cost = step_cost(out, args.calls)
    table = report(rows, reference, cost, load)
    (out / "self_cond.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
