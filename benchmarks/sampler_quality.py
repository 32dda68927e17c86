"""Sampler quality vs steps: for each strategy and step count, what it costs and what it produces.

    python benchmarks/sampler_quality.py runs/ts-tiny --data runs/ts-data --steps 8,16,32,64,128

For every strategy x steps: network evaluations actually run, wall time per generation, the sampler's
own share of the time, and quality figures that can fail:
  - NLL: the model's own NLL bound (ELBO, nats/token) of the generated text under the forward process
    (lower = text the model finds likely; degenerate repetition can also score low, hence the next two),
  - repetition: share of word 4-grams in a sample that already occurred earlier in the same sample,
  - doubled words: share of words equal to the word before them ("play play"),
  - distinct-1 / distinct-2: unique words / word bigrams over all samples (diversity),
  - with --judge (an autoregressive checkpoint): generative perplexity of the samples under it; give --judge twice
    for two judges' columns side by side on the same samples (the old same-data judge and SmolLM2: results.md).
The reference row scores real validation stories the same way. Prints a Markdown table; --json for raw.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from jetson_dllm.families.mdlm import generate
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import STRATEGIES, SamplerConfig
from jetson_dllm.textstats import distinct, doubled, repetition
from train_host.diffusion import nll_bound
from train_host.judge import Judge

PROMPTS = ["Once upon a time", "One day,", "Lily and Tom", "The little dog"]


def score(model, canvases: np.ndarray, tokenizer, n_t: int = 8) -> float:
    """NLL bound per text token of canvases under the model (forward-process ELBO)."""
    g = torch.Generator().manual_seed(0)
    out = nll_bound(model, torch.from_numpy(canvases.astype(np.int64)), tokenizer.pad_id, tokenizer.mask_id, n_t=n_t, generator=g)
    return out["nll"] / max(out["tokens"], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", help="the model's data folder: scores real validation stories as a reference row")
    p.add_argument("--steps", default="8,16,32,64,128")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (4 prompts)")
    p.add_argument("--length", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--span", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--judge", action="append", default=[], help="autoregressive checkpoint: adds generative perplexity (repeatable)")
    p.add_argument("--defer-twins", action="store_true", help="the sampler's --defer-twins (see dllm run --help); off unless given")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    judges = [Judge(j) for j in args.judge]
    backend = open_runner("torch", args.checkpoint)
    tok, model = backend.tokenizer, backend.model
    rows = []
    if args.data:
        from train_host.data import CanvasDataset

        ds = CanvasDataset(args.data, "val", model.cfg.canvas_len, tok.pad_id)
        real = ds.batch(np.arange(min(len(ds), 4 * args.samples)))
        texts = [tok.decode(r) for r in real]
        with torch.inference_mode():
            nll = score(model, real, tok)
        rows.append({"strategy": "real stories", "steps": None, "evaluations": None, "ms": None, "sampler_share": None,
                     "nll": nll, "gen_ppl": [j.perplexity(texts) for j in judges], "repetition": float(np.mean([repetition(t) for t in texts])),
                     "doubled": float(np.mean([doubled(t) for t in texts])), "distinct1": distinct(texts, 1), "distinct2": distinct(texts, 2), "example": texts[0][:160]})
    for strategy in args.strategies.split(","):
        for steps in [int(s) for s in args.steps.split(",")]:
            cfg = SamplerConfig(steps=steps, strategy=strategy, temperature=args.temperature, top_p=args.top_p,
                                span=args.span, threshold=args.threshold, seed=0, defer_twins=args.defer_twins)
            canvases, texts, evals, times, shares = [], [], [], [], []
            for i, prompt in enumerate(PROMPTS):
                cfg.seed = i
                t0 = time.perf_counter()
                gen = generate(backend, tok, prompt, length=args.length, num_samples=args.samples, sampler=cfg)
                times.append(time.perf_counter() - t0)
                canvases.append(gen.result.tokens)
                texts += gen.texts
                evals.append(gen.result.evaluations)
                shares.append(gen.result.sampler_s / gen.result.total_s)
            with torch.inference_mode():
                nll = score(model, np.concatenate(canvases), tok)
            rows.append({"strategy": strategy, "steps": steps, "evaluations": float(np.mean(evals)),
                         "ms": 1e3 * float(np.mean(times)), "sampler_share": float(np.mean(shares)), "nll": nll,
                         "gen_ppl": [j.perplexity(texts) for j in judges],
                         "repetition": float(np.mean([repetition(t) for t in texts])),
                         "doubled": float(np.mean([doubled(t) for t in texts])), "distinct1": distinct(texts, 1), "distinct2": distinct(texts, 2), "example": texts[0][:160]})
            if not args.json:
                print(f"{strategy:>10} {steps:>4} steps: {rows[-1]['evaluations']:.1f} evals, NLL {nll:.3f}, rep {rows[-1]['repetition']:.3f}, doubled {rows[-1]['doubled']:.3f}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    print(f"\n{len(PROMPTS)} prompts x {args.samples} samples per row, batch {args.samples}, temperature {args.temperature}, "
          f"span {args.span or 'none'}, defer twins {args.defer_twins}, torch on CPU\n")

    ppl = [f"gen. perplexity ({Path(j).name})" for j in args.judge] if len(args.judge) > 1 else ["gen. perplexity"]
    print("| strategy | steps | evaluations | ms / generation | sampler share | NLL bound (nats/token) | " + " | ".join(ppl)
          + " | repetition | doubled words | distinct-1 | distinct-2 |")
    print("|---" * (10 + len(ppl)) + "|")
    for r in rows:
        cells = [r["strategy"], r["steps"], r["evaluations"], r["ms"], r["sampler_share"], r["nll"], *(r["gen_ppl"] or [None]),
                 r["repetition"], r["doubled"], r["distinct1"], r["distinct2"]]
        print("| " + " | ".join("-" if c is None else (f"{c:.3f}" if isinstance(c, float) else str(c)) for c in cells) + " |")
    print_grid(rows, args)
    print("\nexamples:")
    for r in rows:
        print(f"- {r['strategy']} {r['steps'] or ''}: {r['example']!r}")


def print_grid(rows: list[dict], args) -> None:
    """The table again as the docs show it: a strategy per row, a step count per column, each cell every judge's
    perplexity then repetition (with no judge: the NLL bound, then repetition)."""
    steps = sorted({r["steps"] for r in rows if r["steps"]})
    strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["steps"]))
    if len(steps) < 2 and len(strategies) < 2:
        return
    what = " / ".join([f"{Path(j).name}" for j in args.judge] or ["NLL bound"]) + " / repetition"
    print(f"\nstrategy x steps, cells: {what}\n")
    print("| strategy | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---" * (len(steps) + 1) + "|")
    for strategy in strategies:
        cells = []
        for s in steps:
            r = next((r for r in rows if r["strategy"] == strategy and r["steps"] == s), None)
            figures = ([f"{v:.1f}" for v in r["gen_ppl"]] or [f"{r['nll']:.3f}"]) + [f"{r['repetition']:.3f}"] if r else ["-"]
            cells.append(" / ".join(figures))
        print(f"| {strategy} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
