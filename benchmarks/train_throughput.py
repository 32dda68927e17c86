"""Training throughput per config on this machine: tokens/s and seconds per optimizer step.

    python benchmarks/train_throughput.py --configs tiny,small,medium --batch 32 --canvas 128 --steps 3

Each step is what `dllm train` does: mask at antithetic times, forward with the output head over the
masked positions only, the MDLM loss, backward, gradient clipping, AdamW. Random weights and tokens
(throughput does not depend on them), vocabulary 8192. Prints a Markdown table; --json for raw numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from jetson_dllm.config import SIZES, ModelConfig
from train_host import diffusion
from train_host.model import Denoiser


def measure(name: str, batch: int, canvas: int, steps: int, warmup: int, device: str, dtype: torch.dtype | None) -> dict:
    cfg = ModelConfig.from_name(name, vocab_size=8192, canvas_len=canvas, mask_id=2)
    torch.manual_seed(0)
    model = Denoiser(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, cfg.vocab_size, (batch, canvas), generator=g).to(device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = diffusion.mdlm_loss(model, x, diffusion.sample_t(batch, g), cfg.mask_id, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    return {"config": name, "params_m": cfg.num_params() / 1e6, "batch": batch, "canvas": canvas,
            "s_per_step": step_s, "tokens_per_s": batch * canvas / step_s, "steps_measured": steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,small,medium")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--canvas", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if args.device == "cuda" else None
    names = list(SIZES) if args.configs == "all" else args.configs.split(",")
    rows = [measure(n, args.batch, args.canvas, args.steps, args.warmup, args.device, dtype) for n in names]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from jetson_dllm.bench import environment

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{environment()['cpu']}, {torch.get_num_threads()} threads"
    print(f"training throughput, batch {args.batch} x canvas {args.canvas}, {'bf16/fp16 autocast' if dtype else 'fp32'}, on {where}\n")
    print("| config | params | s/step | tokens/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['params_m']:.1f} M | {r['s_per_step']:.2f} | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
