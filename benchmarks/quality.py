"""Diffusion vs the autoregressive baseline, trained the same way: likelihood, speed, samples, infilling.

    python benchmarks/quality.py --diffusion runs/ts-tiny --ar runs/ts-ar --data runs/ts-data

1. Validation NLL (the diffusion model's ELBO bound, the AR model's exact NLL, over the same tokens),
   masked-token / next-token accuracy, and the time to generate 128 tokens (diffusion at each step count,
   AR token by token with a KV cache; batch 1, torch on this CPU).
2. Infilling: held-out stories with a span of --span tokens removed from the middle. The diffusion model
   fills the gap seeing both sides; the AR model can only continue the prefix (then the original suffix
   follows). The judge (by default the AR checkpoint; `--judge` names others, repeatable, e.g. SmolLM2
   imported) scores the filled stories, one column each; also the share of restored tokens. The default
   judge is the AR model itself, so its own fills are scored by the model that wrote them: a bias in the
   AR's favour, stated in the table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import SamplerConfig, SpecialIds, sample
from train_host.autoregressive import ar_generate
from train_host.data import CanvasDataset
from train_host.evaluate import evaluate
from train_host.judge import Judge


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffusion", required=True)
    p.add_argument("--ar", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", default="8,16,32,64,128")
    p.add_argument("--stories", type=int, default=24, help="held-out stories for infilling")
    p.add_argument("--span", type=int, default=12)
    p.add_argument("--infill-steps", type=int, default=12)
    p.add_argument("--judge", action="append", default=[], help="AR checkpoint scoring the fills (repeatable; default: --ar)")
    args = p.parse_args()
    torch.set_num_threads(2)

    diff = open_runner("torch", args.diffusion)
    ar = open_runner("torch", args.ar)
    tok = diff.tokenizer
    judges = {j: Judge(j) for j in args.judge or [args.ar]}
    ds = CanvasDataset(args.data, "val", diff.cfg.canvas_len, tok.pad_id)
    with torch.inference_mode():
        dm = evaluate(diff.model, ds, tok.mask_id, n_canvases=len(ds), n_t=8)
        am = evaluate(ar.model, ds, tok.mask_id, n_canvases=len(ds), bos_id=tok.eot_id)
    special = SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id)
    n_gen = min(128, diff.cfg.canvas_len)  # 128 tokens, or the whole canvas of a smaller model
    canvas = np.full((1, n_gen), tok.mask_id, dtype=np.int32)
    fixed = np.zeros_like(canvas, dtype=bool)

    def run(c):
        out = diff.run("canvas", {"tokens": c})
        return out["topk_logprobs"], out["topk_ids"]

    print(f"validation: {len(ds)} canvases of {args.data}, {dm['val_tokens']:,} tokens\n")
    print(f"| model | val NLL (nats/token) | val accuracy | {n_gen} tokens, batch 1 |")
    print("|---|---|---|---|")
    times = {s: timed(lambda s=s: sample(run, canvas, fixed, special, SamplerConfig(steps=s, allow_end=False))) for s in map(int, args.steps.split(","))}
    t_ar = timed(lambda: ar_generate(ar.model, [], n_gen, tok.eot_id, tok.eot_id, tok.pad_id, stop_at_end=False))
    print(f"| diffusion (bound) | {dm['val_nll']:.3f} | {dm['val_acc']:.3f} masked | " + ", ".join(f"{s} steps {1e3 * t:.0f} ms" for s, t in times.items()) + " |")
    print(f"| autoregressive (exact) | {am['val_nll']:.3f} | {am['val_acc']:.3f} next-token | {1e3 * t_ar:.0f} ms (KV cache) |")
    infilling(args, ds, tok, run, ar, judges, special)


def infilling(args, ds, tok, run, ar, judges: dict, special) -> None:
    """Remove a span from the middle of held-out stories; fill it by diffusion (both sides) and AR (prefix only)."""
    rng = np.random.default_rng(0)
    lengths = (ds.batch(np.arange(len(ds))) != tok.pad_id).sum(1)
    usable = [i for i in range(len(ds)) if lengths[i] > 3 * args.span][: args.stories]
    originals, diffusion_fills, ar_fills, examples = [], [], [], []
    restored_d = restored_a = total = 0
    for i in usable:
        story = ds.batch(np.array([i]))[0].astype(np.int32)
        n = int(lengths[i])
        start = int(rng.integers(args.span, n - 2 * args.span))
        gap = slice(start, start + args.span)
        c = story.copy()
        c[gap] = tok.mask_id
        f = np.ones_like(c, dtype=bool)
        f[gap] = False
        filled = sample(run, c[None], f[None], special, SamplerConfig(steps=args.infill_steps))
        d_tokens = filled.tokens[0]
        a = ar_generate(ar.model, story[:start].tolist(), args.span, tok.eot_id, tok.eot_id, tok.pad_id, stop_at_end=False)
        a_tokens = story.copy()
        a_tokens[gap] = a.tokens[0, start : start + args.span]
        window = slice(max(0, start - 6), start + args.span + 6)
        examples.append(tuple(tok.tok.decode(t[window].tolist()) for t in (story, d_tokens, a_tokens)))
        originals.append(tok.decode(story))
        diffusion_fills.append(tok.decode(d_tokens))
        ar_fills.append(tok.decode(a_tokens))
        restored_d += int((d_tokens[gap] == story[gap]).sum())
        restored_a += int((a_tokens[gap] == story[gap]).sum())
        total += args.span
    print(f"\ninfilling: {len(usable)} held-out stories, a {args.span}-token span removed from the middle; judges: {', '.join(judges)}\n")
    print("| filled by | " + " | ".join(f"perplexity of the story ({j})" for j in judges) + " | span tokens restored exactly |")
    print("|---|" + "---|" * len(judges) + "---|")
    ar_label = "autoregressive (prefix only" + ("; judged by itself)" if args.ar in judges else ")")
    for label, texts, restored in (("(the original stories)", originals, "-"),
                                   (f"diffusion ({args.infill_steps} steps, sees both sides)", diffusion_fills, f"{restored_d / total:.3f}"),
                                   (ar_label, ar_fills, f"{restored_a / total:.3f}")):
        print(f"| {label} | " + " | ".join(f"{judge.perplexity(texts):.1f}" for judge in judges.values()) + f" | {restored} |")
    print("\nexamples (the span and 6 tokens either side):")
    for orig, dfill, afill in examples[:3]:
        print(f"- original: ...{orig!r}...\n  diffusion: ...{dfill!r}...\n  AR: ...{afill!r}...")


if __name__ == "__main__":
    main()
