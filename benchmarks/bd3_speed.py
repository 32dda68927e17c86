"""Tokens per second on onnxruntime, same config and backend: MDLM over the whole canvas, BD3 block by block over an
exact KV cache, and AR as BD3 with block size 1 (token by token through the same graphs, with the same cache).

    python benchmarks/bd3_speed.py --config tiny --tokens 256 --blocks 1,4,8,16,32 --block-steps 1,4,8 --mdlm-steps 32,64,128

Random weights and fixed-length generation (no end-of-text): the cost does not depend on the weights. Models are
made and exported once into --work (random checkpoints, `dllm export`'s own path). Each point runs `--repeats` times
after a warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.families.bd3 import generate_blocks
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.runners.protocol import sampling_fn
from jetson_dllm.sampler import SamplerConfig, SpecialIds, sample
from train_host.checkpoint import save_checkpoint
from train_host.corpus import stories
from train_host.data import train_tokenizer
from train_host.export import export_bundle
from train_host.model import Denoiser


def bundle(work: Path, name: str, cfg: ModelConfig, tokenizer) -> Path:
    run, out = work / f"{name}-run", work / f"{name}-bundle"
    if not (out / "manifest.json").is_file():
        torch.manual_seed(0)
        save_checkpoint(run, 0, Denoiser(cfg), cfg, tokenizer, {"note": "random weights for benchmarks"})
        export_bundle(run, out, precisions=("fp32",), parity_canvases=2, overwrite=True)
    return out


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--blocks", default="1,4,8,16,32")
    p.add_argument("--block-steps", default="1,4,8")
    p.add_argument("--mdlm-steps", default="32,64,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default="runs/bd3-speed")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(stories(2000), vocab_size=8192)
    base = dict(vocab_size=8192, canvas_len=args.tokens, mask_id=tokenizer.mask_id)
    special = SpecialIds(tokenizer.mask_id, tokenizer.eot_id, tokenizer.pad_id)
    rows = []
    with open_runner("onnx", bundle(work, f"{args.config}-mdlm", ModelConfig.from_name(args.config, **base), tokenizer), threads=args.threads) as r:
        canvas = np.full((1, args.tokens), tokenizer.mask_id, dtype=np.int32)
        for steps in map(int, args.mdlm_steps.split(",")):
            cfg = SamplerConfig(steps=steps, allow_end=False, seed=0)
            ms = median_ms(lambda cfg=cfg: sample(sampling_fn(r), canvas, np.zeros_like(canvas, bool), special, cfg), args.repeats)
            rows.append(("MDLM, whole canvas", "-", steps, steps, 0, ms))
    for b in map(int, args.blocks.split(",")):
        path = bundle(work, f"{args.config}-bd3-b{b}", ModelConfig.from_name(args.config, family="bd3", block_size=b, **base), tokenizer)
        with open_runner("onnx", path, threads=args.threads) as r:
            for per_block in map(int, args.block_steps.split(",")):
                if per_block > b:
                    continue
                cfg = SamplerConfig(steps=per_block, allow_end=False, seed=0)
                result = {}

                def go(cfg=cfg, r=r, result=result):
                    result["r"] = generate_blocks(r, [tokenizer.eot_id], args.tokens - 1, 1, cfg)

                ms = median_ms(go, args.repeats)
                label = "AR (BD3, block 1: token by token)" if b == 1 else "BD3"
                rows.append((label, b, per_block, result["r"].evaluations, result["r"].commits, ms))
    print(f"{args.config}, {args.tokens} tokens, batch 1, onnxruntime CPU, {args.threads} threads, median of {args.repeats}\n")
    ar = next((ms for label, b, *_rest, ms in rows if b == 1), None)
    print("| model | block | steps (per block) | network evaluations | cache passes | ms | tokens/s | x AR |")
    print("|---|---|---|---|---|---|---|---|")
    for label, b, steps, evals, commits, ms in rows:
        print(f"| {label} | {b} | {steps} | {evals} | {commits} | {ms:,.0f} | {args.tokens / ms * 1e3:,.0f} | {ar / ms if ar else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
