"""Continuous embedding diffusion beside AR and MDLM on the same data, size and budget (issue 26), DDIM and DDPM.

    python benchmarks/continuous.py --data runs/adapt/data --judge runs/smollm2 --out runs/sdd [--steps 1000]

Trains `continuous` (--latent-dim 64), `continuous-sc` (the same, self-conditioned on the previous step's top-8,
at the standard rate 0.5) and `continuous-shift4` (the cosine schedule shifted by 4: its signal-to-noise ratio / 16
at every level) with the recipe of benchmarks/sdd.py (batch 16 x 128, one thread, the same
step budget, the same seed); a run already in OUT/NAME is not trained again, so point --out at the SDD study's folder
to put the row beside its `ar` and `mdlm` (their measured rows are read from OUT/measured, as benchmarks/sdd.py left
them). Per sampler (DDIM: eta 0; DDPM: eta 1; DDIM with clamping) and step count (16, 64, 256): `--samples` stories of
64 tokens from nothing at temperature 0.8 (the final rounding's), judged by the external judge (SmolLM2-135M
imported), repetition, distinct-2; the time to generate 64 tokens on onnxruntime (FP32, batch 1, one thread, median
of 3) per step count; the held-out denoising loss and accuracies (no likelihood: none is computed) and two stories.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sdd import plan as study_plan
from sdd import speed_ms, study_args
from self_cond import train

STEP_COUNTS = (16, 64, 256)
SAMPLERS = {"DDIM": {"eta": 0.0}, "DDPM": {"eta": 1.0}, "DDIM + clamp": {"eta": 0.0, "clamp": True}}


def plan(steps: int) -> dict:
    base = study_plan(steps)["mdlm"]["args"][2:]  # the study's recipe (lr, warmup, steps, evaluation), another family
    run = ["--family", "continuous", "--latent-dim", "64", *base]
    return {"continuous": {"args": run}, "continuous-sc": {"args": [*run, "--self-cond", "8"]},
            "continuous-shift4": {"args": [*run, "--noise-shift", "4"]}}


def stories(run: Path, samples: int, steps: int, **knobs) -> list[str]:
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    with open_runner("torch", run, threads=1) as runner:
        module = family_of(runner.cfg).runtime_module()
        return [module.generate(runner, runner.tokenizer, "", 64, 1, SamplerConfig(steps=steps, temperature=0.8, seed=i, **knobs),
                                allow_empty=True).texts[0] for i in range(samples)]


def measure(name: str, out: Path, data: str, judge, samples: int) -> dict:
    from train_host.evaluate import evaluate_checkpoint
    from train_host.judge import sample_quality

    path = out / "measured" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    m = evaluate_checkpoint(out / name, data, canvases=10_000, threads=1)
    row = {"metrics": {k: v for k, v in m.items() if k.startswith("val_")}, "samplers": {}}
    for label, knobs in SAMPLERS.items():
        for steps in STEP_COUNTS if label != "DDIM + clamp" else (64,):
            texts = stories(out / name, samples, steps, **knobs)
            row["samplers"][f"{label} @ {steps}"] = {**sample_quality(texts), "judge_ppl": judge.perplexity(texts), "samples": texts[:2]}
            print(f"{name} {label} @ {steps}: judge {row['samplers'][f'{label} @ {steps}']['judge_ppl']:.1f}", file=sys.stderr, flush=True)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def speeds(out: Path, name: str) -> dict[int, float]:
    """ms for 64 tokens at each step count (onnxruntime FP32, one thread), all in this one run."""
    return {steps: speed_ms(out / name, out, steps) for steps in STEP_COUNTS}


def table(rows: dict, others: dict, load: str) -> str:
    lines = [f"Machine load while timing: {load}", ""]
    for name, row in rows.items():
        m = row["metrics"]
        lines.append(f"- {name}: held-out denoising loss {m['val_loss']:.3f} nats/token (not an NLL), top-1 accuracy "
                     f"{m['val_acc']:.3f} (stratified levels), {m['val_acc_t1']:.3f} at t = 1.")
    lines += ["", "| model | sampler @ steps | network calls for 64 tokens | 64 tokens, onnxruntime (ms) | judge ppl | repetition | distinct-2 |",
              "|---|---|---|---|---|---|---|"]
    for name, r in others.items():
        lines.append(f"| {name} | {'one call per token' if name == 'ar' else 'confidence @ 64'} | 64 | {r.get('gen_ms', float('nan')):.0f} "
                     f"| {r['judge_ppl']:.1f} | {r['repetition']:.3f} | {r['distinct2']:.3f} |")
    for name, row in rows.items():
        for label, r in row["samplers"].items():
            steps = int(label.split("@ ")[1])
            lines.append(f"| {name} | {label} | {steps} | {row['gen_ms'][steps]:.0f} | {r['judge_ppl']:.1f} | {r['repetition']:.3f} | {r['distinct2']:.3f} |")
    lines += ["", "Two stories each (temperature 0.8):", ""]
    for name, row in rows.items():
        for label in ("DDIM @ 256", "DDPM @ 256"):
            lines += [f"- **{name}, {label}**: {s[:240]!r}" for s in row["samplers"][label]["samples"]]
    return "\n".join(lines)


def main() -> None:
    args = study_args(__doc__, "runs/sdd")
    from train_host.judge import Judge

    out = Path(args.out)
    runs = plan(args.steps)
    runs = {n: spec for n, spec in runs.items() if not args.runs or n in args.runs.split(",")}
    for name, spec in runs.items():
        train(name, spec, args.data, out, args.size.split())
    judge = Judge(args.judge)
    rows = {name: measure(name, out, args.data, judge, args.samples) for name in runs}
    others = {n: json.loads((out / "measured" / f"{n}.json").read_text()) for n in ("ar", "mdlm") if (out / "measured" / f"{n}.json").is_file()}
    load = os.popen("uptime").read().strip()
    for name in rows:
        rows[name]["gen_ms"] = speeds(out, name)
    for name in others:  # the peers timed in this same run, so the times compare
        others[name]["gen_ms"] = speed_ms(out / name, out)
    report = table(rows, others, load)
    (out / "continuous.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
