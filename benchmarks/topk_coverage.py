"""How much of the predicted distribution the sampling head's top-K carries: the case for K = 64.

    python benchmarks/topk_coverage.py runs/ts-tiny --data runs/ts-data

On validation canvases masked at ratios spread over (0, 1], for each K: the mean probability mass of the
top-K at masked positions, and the share of positions whose top-K holds the whole top-p = 0.9 / 0.95
nucleus (then top-p sampling over the head is exact). Also what crosses to the host per step for a
1 x 256 canvas: logits vs the top-K.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from calibration.data import stratified_masking
from jetson_dllm.runners.loaders import open_runner
from train_host.data import CanvasDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--canvases", type=int, default=64)
    p.add_argument("--ks", default="8,16,32,64,128,256")
    args = p.parse_args()
    be = open_runner("torch", args.checkpoint)
    tok, V = be.tokenizer, be.cfg.vocab_size
    ds = CanvasDataset(args.data, "val", be.cfg.canvas_len, tok.pad_id)
    x = stratified_masking(ds.batch(np.arange(min(args.canvases, len(ds)))), tok.mask_id, tok.pad_id, seed=0)
    with torch.inference_mode():
        probs = torch.softmax(be.model(torch.from_numpy(x).long()).float(), -1)[torch.from_numpy(x == tok.mask_id)]
    sorted_p = torch.sort(probs, -1, descending=True).values.numpy()
    cum = np.cumsum(sorted_p, -1)
    print(f"{len(sorted_p):,} masked positions of {len(x)} validation canvases, vocabulary {V:,}\n")
    print("| K | mean top-K mass | nucleus 0.9 inside top-K | nucleus 0.95 inside top-K | host bytes per 1x256 step |")
    print("|---|---|---|---|---|")
    for k in map(int, args.ks.split(",")):
        mass = cum[:, k - 1]
        print(f"| {k} | {mass.mean():.4f} | {(mass >= 0.9).mean():.3f} | {(mass >= 0.95).mean():.3f} | {256 * k * 8:,} |")
    print(f"| logits ({V:,}) | 1 | 1 | 1 | {256 * V * 4:,} |")


if __name__ == "__main__":
    main()
