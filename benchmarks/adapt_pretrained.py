"""A pretrained model adapted into block diffusion on a CPU budget: the imported parent's exact NLL, the shifted child's
bound before any training (zero-shot) and after `--steps` adaptation steps, on the same held-out canvases, with a
sample from each (issue 23, on the model `dllm import` brings in).

    python benchmarks/adapt_pretrained.py --parent runs/smollm2 --text ../shared/data/tinystories/*.txt \
        --out runs/smol-adapt --steps 150

The data is tokenized with the parent's own tokenizer (`dllm data --tokenizer PARENT`); training is `dllm train
--family bd3 --block-size B --shift --complementary --init PARENT` (one thread, a step budget). The bound is estimated
on `--canvases` held-out canvases with `--n-t` noise levels each (a 135M model's bound costs minutes per hundred
canvases on this CPU), the parent's exact NLL on the same canvases and tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def dllm(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "jetson_dllm", *args], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"dllm {args[0]} failed (exit {done.returncode})")


def bound(model, tokenizer, data: Path, canvas: int, canvases: int, n_t: int) -> float:
    from train_host.data import CanvasDataset
    from train_host.evaluate import evaluate

    ds = CanvasDataset(data, "val", canvas, tokenizer.pad_id)
    return evaluate(model, ds, model.cfg.mask_id, n_canvases=canvases, n_t=n_t, batch_size=8, bos_id=tokenizer.bos_id)["val_nll"]


def child_of(parent_path: str, block: int, canvas: int):
    """The parent's weights as a shifted block-diffusion model, untrained (the zero-shot child)."""
    from jetson_dllm.config import ModelConfig
    from train_host import checkpoint as ck
    from train_host.model import Denoiser

    cfg, weights, tok, _ = ck.load_checkpoint(parent_path)
    child = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": "bd3", "block_size": block, "shift": True, "canvas_len": canvas})).eval()
    ck.load_weights(child, weights, parent_path)
    return child, tok


def sample(run: str, prompt: str, length: int) -> str:
    from jetson_dllm.families import family_of
    from jetson_dllm.runners import open_runner
    from jetson_dllm.sampler import SamplerConfig

    with open_runner("torch", run, threads=1) as r:
        options = {} if family_of(r.cfg).attention == "causal" else {"steps": r.cfg.block_size}
        g = family_of(r.cfg).runtime_module().complete(r, prompt, length=length, sampler=SamplerConfig(temperature=0.0, **options))
        return g.texts[0]


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
    ap.add_argument("--canvases", type=int, default=32)
    ap.add_argument("--n-t", type=int, default=4)
    ap.add_argument("--prompt", default="Once upon a time")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, child_run = out / "data", out / "child"
    if not (data / "data.json").is_file():
        dllm("data", *args.text, "-o", str(data), "--tokenizer", args.parent, "--val-fraction", "0.05")
    from train_host import checkpoint as ck

    results = {}
    parent_model, tok, _ = ck.load_model(args.parent)
    results["parent_exact_nll"] = bound(parent_model, tok, data, args.canvas, args.canvases, args.n_t)
    zero, tok = child_of(args.parent, args.block, args.canvas)
    results["zero_shot_bound"] = bound(zero, tok, data, args.canvas, args.canvases, args.n_t)
    del zero, parent_model
    if not (child_run / "checkpoints").is_dir():
        t0 = time.time()
        dllm("train", "--data", str(data), "-o", str(child_run), "--family", "bd3", "--block-size", str(args.block), "--shift",
             "--complementary", "--init", args.parent, "--canvas-len", str(args.canvas), "--batch-size", str(args.batch_size),
             "--steps", str(args.steps), "--lr", args.lr, "--warmup", "10", "--t-min", "0.001", "--t-max", "1",
             "--eval-every", str(args.steps), "--eval-canvases", "8", "--threads", "1")
        results["train_s"] = time.time() - t0
    child_model, tok, _ = ck.load_model(child_run)
    results["adapted_bound"] = bound(child_model, tok, data, args.canvas, args.canvases, args.n_t)
    del child_model
    results["parent_sample"] = sample(args.parent, args.prompt, 48)
    results["adapted_sample"] = sample(str(child_run), args.prompt, 48)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    p = results["parent_exact_nll"]
    print(f"| model | held-out NLL ({args.canvases} canvases of {args.canvas}) | vs parent |\n|---|---:|---:|\n"
          f"| parent (AR, exact) | {p:.3f} | |\n"
          f"| BD3 b={args.block}, shifted, zero-shot (bound) | {results['zero_shot_bound']:.3f} | {results['zero_shot_bound'] / p - 1:+.1%} |\n"
          f"| BD3 b={args.block} after {args.steps} steps of {args.batch_size} canvases (bound) | {results['adapted_bound']:.3f} | "
          f"{results['adapted_bound'] / p - 1:+.1%} |\n\nparent: {results['parent_sample']!r}\nadapted: {results['adapted_sample']!r}")


if __name__ == "__main__":
    main()
