"""What one network evaluation costs: an MDLM full-canvas step, a BD3 block step over an exact KV cache, and an AR
token step over its KV cache, for the same config, on torch (the only backend that runs BD3 so far).

    python benchmarks/bd3_step.py --config tiny --canvas 256 --block 16 --threads 2

Random weights: the cost of a step does not depend on them. The BD3 and AR steps are timed with the cache filled to
`canvas - block` positions (the last, most expensive block of a canvas).
"""

from __future__ import annotations

import argparse
import time

import torch

from jetson_dllm.config import ModelConfig
from train_host.cached_graphs import block_step, commit
from train_host.model import Denoiser, KVCache, topk_logprobs


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = dict(vocab_size=args.vocab, canvas_len=args.canvas, mask_id=2)
    mdlm = Denoiser(ModelConfig.from_name(args.config, **base)).eval()
    bd3 = Denoiser(ModelConfig.from_name(args.config, family="bd3", block_size=args.block, **base)).eval()
    ar = Denoiser(ModelConfig.from_name(args.config, family="ar", **base)).eval()
    canvas = torch.randint(3, args.vocab, (1, args.canvas))
    full_ms = timed(lambda: topk_logprobs(mdlm(canvas), 64), args.repeats)
    cache = KVCache(bd3.cfg, 1, args.canvas, "cpu")
    for j in range(args.canvas // args.block - 1):
        commit(bd3, cache, canvas[:, j * args.block : (j + 1) * args.block])
    block = canvas[:, -args.block :]
    block_ms = timed(lambda: block_step(bd3, cache, block, 64), args.repeats)
    ar_cache = KVCache(ar.cfg, 1, args.canvas, "cpu")
    ar.hidden(canvas[:, :-1], cache=ar_cache)

    def ar_step():
        ar_cache.len = args.canvas - 1
        return topk_logprobs(ar.logits_from_hidden(ar.hidden(canvas[:, -1:], cache=ar_cache)), 64)

    ar_ms = timed(ar_step, args.repeats)
    print(f"{args.config}, canvas {args.canvas}, block {args.block}, vocabulary {args.vocab}, torch CPU, {args.threads} threads\n")
    print("| evaluation | ms | x MDLM step | tokens it can commit |")
    print("|---|---|---|---|")
    print(f"| MDLM full-canvas step ({args.canvas} positions) | {full_ms:.2f} | 1.00 | up to {args.canvas} |")
    print(f"| BD3 block step ({args.block} positions over a {args.canvas - args.block}-token cache) | {block_ms:.2f} | {block_ms / full_ms:.2f} | up to {args.block} |")
    print(f"| AR token step (over a {args.canvas - 1}-token cache) | {ar_ms:.2f} | {ar_ms / full_ms:.2f} | 1 |")


if __name__ == "__main__":
    main()
