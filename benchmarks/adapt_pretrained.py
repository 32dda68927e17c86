"""A pretrained model adapted into block diffusion: the imported parent's exact NLL, the shifted child's bound before
any training (zero-shot) and after adaptation, on the same held-out canvases, the bound's curve over training, and
each child's text and network calls per token at several decoding settings (issue 23, on the model `dllm import`
brings in).

    python benchmarks/adapt_pretrained.py --parent runs/smollm2 --text ../shared/data/tinystories/*.txt \\
        --out runs/smol-adapt --steps 150                                     # CPU, one thread
    python benchmarks/adapt_pretrained.py --parent runs/smollm2 --text ../shared/data/tinystories/*.txt \\
        --out runs/smol-gpu --device cuda --dtype bf16 --batch-size 16 --steps 2000 --time-budget 270s \\
        --eval-every 300 --eval-canvases 64 --canvases 256 --n-t 8 --distill 0 0.5 --samples 6 --length 64 \\
        --threads 4 --parent-ft                                            # docs/adaptation.md's GPU run

The data is tokenized with the parent's own tokenizer (`dllm data --tokenizer PARENT`); each child is `dllm train
--family bd3 --block-size B --shift --complementary --init PARENT [--distill A]`, one per `--distill` value, trained
side by side (a step budget; `--time-budget` only caps it, and the curve compares the children at equal steps). The
bound is estimated on `--canvases` held-out canvases with `--n-t` noise levels each, the parent's exact NLL on the
same canvases and tokens. Samples: greedy from `--prompt`, and `--samples` stories at temperature 0.8 from the start
token whose perplexity the parent scores (the parent is no outside judge here: it says how close the child stays to
it, not how good the text is; the TinyStories-trained models of benchmarks/adapt.py have SmolLM2 as their judge).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {  # a block model's decoding settings: label -> sampler options for block size b
    "block steps": lambda b: {"steps": b},
    "half the steps": lambda b: {"steps": max(1, b // 2)},
    "threshold 0.9": lambda b: {"steps": b, "strategy": "threshold", "threshold": 0.9},
    "threshold 0.5": lambda b: {"steps": b, "strategy": "threshold", "threshold": 0.5},
}


def dllm(*args: str, threads: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jetson_dllm", *args], env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def bound(model, tokenizer, data: Path, canvas: int, canvases: int, n_t: int, device: str) -> float:
    from train_host.data import CanvasDataset
    from train_host.evaluate import evaluate

    ds = CanvasDataset(data, "val", canvas, tokenizer.pad_id)
    return evaluate(model.to(device), ds, model.cfg.mask_id, n_canvases=canvases, n_t=n_t, batch_size=8, bos_id=tokenizer.bos_id,
                    device=device)["val_nll"]


def child_of(parent_path: str, block: int, canvas: int):
    """The parent's weights as a shifted block-diffusion model, untrained (the zero-shot child)."""
    from jetson_dllm.config import ModelConfig
    from train_host import checkpoint as ck
    from train_host.model import Denoiser

    cfg, weights, tok, _ = ck.load_checkpoint(parent_path)
    child = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": "bd3", "block_size": block, "shift": True, "canvas_len": canvas})).eval()
    ck.load_weights(child, weights, parent_path)
    return child, tok


def decode(runner, prompt: str, length: int, options: dict, temperature: float = 0.0, seed: int = 0) -> tuple[str, float]:
    """One generation's text and its network calls per generated token (a block model's block steps and the commits
    not folded into them; AR: one per token)."""
    from jetson_dllm.families import family_of
    from jetson_dllm.sampler import SamplerConfig

    family = family_of(runner.cfg)
    sampler = SamplerConfig(temperature=temperature, seed=seed, **({"strategy": "confidence"} | options))
    g = family.runtime_module().complete(runner, prompt, length=length, sampler=sampler)
    r = g.result
    calls = r.evaluations + r.commits if family.attention == "block" else len(r.step_ms)
    return g.texts[0], calls / max(1, r.new_tokens)


def samples(run: str, args, judge) -> dict:
    """Per decoding setting: the greedy text from the prompt, and `--samples` stories' parent-judged perplexity,
    distinct-2 and calls per token. On `--device` when its runner takes it, else on the CPU (the error is kept)."""
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from train_host.judge import sample_quality

    out = {}
    try:
        runner, where = open_runner("torch", run, device=args.device, threads=args.threads), args.device
    except Exception as e:  # noqa: BLE001  (a benchmark: record why, go on where it runs)
        runner, where = open_runner("torch", run, threads=args.threads), "cpu"
        out["runner_error"] = f"{type(e).__name__}: {e}"[:300]
    with runner:
        causal = family_of(runner.cfg).attention == "causal"
        settings = {"token by token": {}} if causal else {label: f(runner.cfg.block_size) for label, f in SETTINGS.items()}
        for label, options in settings.items():
            text, calls = decode(runner, args.prompt, args.length, options)
            stories = [decode(runner, "", args.length, options, temperature=0.8, seed=i) for i in range(args.samples)]
            texts = [s for s, _ in stories]
            out[label] = {"greedy": text, "greedy_calls_per_token": calls, "calls_per_token": sum(c for _, c in stories) / len(stories),
                          **sample_quality(texts), "parent_ppl": judge.perplexity(texts), "sample": texts[0][:300], "on": where}
    return out


def curve(run: Path) -> list[list[float]]:
    """(step, held-out bound) of each evaluation during training."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [[r["step"], r["val_nll"]] for r in rows if "val_nll" in r]


def train_children(args, data: Path, out: Path) -> dict[str, dict]:
    """One child per --distill value (and with --parent-ft the parent trained on as AR), side by side; a run whose
    folder holds a checkpoint is not trained again."""
    runs = {("child" if a == 0 else f"child-distill{a:g}"): ({"distill": a}, [
        "--family", "bd3", "--block-size", str(args.block), "--shift", "--complementary", "--t-min", "0.001", "--t-max", "1",
        "--distill", str(a)]) for a in args.distill}
    if args.parent_ft:  # the parent trained on the same data, steps and learning rate
        runs["parent-ft"] = ({}, ["--family", "ar"])
    common = ["--data", str(data), "--init", args.parent, "--canvas-len", str(args.canvas), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps), "--lr", args.lr, "--warmup", str(args.warmup), "--eval-every", str(args.eval_every or args.steps),
              "--eval-canvases", str(args.eval_canvases), "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype,
              *(["--time-budget", args.time_budget] if args.time_budget else [])]
    jobs, info = {}, {}
    for name, (about, own) in runs.items():
        run = out / name
        info[name] = {"run": str(run), **about}
        if not ((run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*"))):
            jobs[name] = (time.time(), dllm("train", "-o", str(run), *own, *common, threads=args.threads))
    for name, (t0, proc) in jobs.items():
        if proc.wait():
            raise SystemExit(f"training {name} failed (exit {proc.returncode})")
        info[name]["train_s"] = time.time() - t0
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", required=True)
    ap.add_argument("--text", nargs="+", required=True)
    ap.add_argument("--out", default="runs/smol-adapt")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--canvas", type=int, default=128)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", default="1e-4")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--distill", type=float, nargs="+", default=[0.0], help="one child per value (0: none)")
    ap.add_argument("--parent-ft", action="store_true", help="also the parent trained on as AR (same data, steps, lr): the fair row")
    ap.add_argument("--time-budget", default="", help="a cap on each child's training (e.g. 5m); the step budget rules")
    ap.add_argument("--eval-every", type=int, default=0, help="the bound's curve: an evaluation every N steps (0: at the end)")
    ap.add_argument("--eval-canvases", type=int, default=8)
    ap.add_argument("--canvases", type=int, default=32)
    ap.add_argument("--n-t", type=int, default=4)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "data.json").is_file():
        if dllm("data", *args.text, "-o", str(data), "--tokenizer", args.parent, "--val-fraction", "0.05").wait():
            raise SystemExit("dllm data failed: see above")
    from train_host import checkpoint as ck
    from train_host.judge import Judge

    results = {"args": vars(args)}
    parent_model, tok, _ = ck.load_model(args.parent)
    results["parent_exact_nll"] = bound(parent_model, tok, data, args.canvas, args.canvases, args.n_t, args.device)
    zero, tok = child_of(args.parent, args.block, args.canvas)
    results["zero_shot_bound"] = bound(zero, tok, data, args.canvas, args.canvases, args.n_t, args.device)
    del zero, parent_model
    results["children"] = train_children(args, data, out)
    if "parent-ft" in results["children"]:
        ft = results["children"].pop("parent-ft")
        model, tok, _ = ck.load_model(ft["run"])  # its best checkpoint (it overfits the small data first)
        results["parent_ft"] = {**ft, "exact_nll": bound(model, tok, data, args.canvas, args.canvases, args.n_t, args.device),
                                "curve": curve(Path(ft["run"]))}
        del model
    judge = Judge(args.parent)
    results["parent_samples"] = samples(args.parent, args, judge)
    for child in results["children"].values():
        model, tok, _ = ck.load_model(child["run"])
        child["bound"] = bound(model, tok, data, args.canvas, args.canvases, args.n_t, args.device)
        child["curve"] = curve(Path(child["run"]))
        del model
        child["samples"] = samples(child["run"], args, judge)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results, args))


def table(results: dict, args) -> str:
    p = results["parent_exact_nll"]
    lines = [f"| model | held-out NLL ({args.canvases} canvases of {args.canvas}) | vs parent |", "|---|---:|---:|",
             f"| parent (AR, exact) | {p:.3f} | |",
             *([f"| parent trained on as AR, {results['parent_ft']['curve'][-1][0]} steps (exact, best checkpoint) | "
                f"{results['parent_ft']['exact_nll']:.3f} | {results['parent_ft']['exact_nll'] / p - 1:+.1%} |"] if "parent_ft" in results else []),
             f"| BD3 b={args.block}, shifted, zero-shot (bound) | {results['zero_shot_bound']:.3f} | {results['zero_shot_bound'] / p - 1:+.1%} |"]
    for name, c in results["children"].items():
        steps = c["curve"][-1][0] if c["curve"] else "?"
        lines.append(f"| {name}: {steps} steps of {args.batch_size} canvases, distill {c['distill']:g} (bound) | {c['bound']:.3f} | "
                     f"{c['bound'] / p - 1:+.1%} |")
    lines += ["", "| model | decoding | calls/token | greedy calls/token | distinct-2 | parent-judged ppl |", "|---|---|---:|---:|---:|---:|"]
    for name, s in [("parent", results["parent_samples"])] + [(n, c["samples"]) for n, c in results["children"].items()]:
        for label, row in s.items():
            if isinstance(row, dict):
                lines.append(f"| {name} | {label} | {row['calls_per_token']:.2f} | {row['greedy_calls_per_token']:.2f} | "
                             f"{row['distinct2']:.3f} | {row['parent_ppl']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
