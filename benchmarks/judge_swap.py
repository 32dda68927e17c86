"""The judge swap (issue 22): the same generated texts scored by the old judge (a same-data AR model of our own, what
docs/results.md and docs/block-diffusion.md were judged by) and by an outside one (SmolLM2-135M, `dllm import`),
side by side, so the older tables' numbers can be read on the new judge's scale.

    python benchmarks/judge_swap.py --diffusion runs/judge/ts-mdlm --ar runs/judge/ts-ar --data runs/adapt/data \\
        --judges runs/judge/ts-ar runs/smollm2

Rows: real held-out stories (the reference), the AR model's stories, the diffusion model's at the README's default
decoding (confidence order, temperature 0.8, deferring twins) at 16 and 64 steps, and greedy at 128 steps (the loop
that the old judge rewarded). Each row: 4 prompts x `--samples` stories of `--tokens` tokens, generated once, on
torch, batch `--samples`; every judge scores the same texts. Columns: each judge's perplexity, and what needs no
judge (repetition: repeated word 4-grams; distinct-2). Seeded: a re-run writes the same texts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from adapt import reference_texts  # benchmarks/, the script's own folder
from sampler_quality import PROMPTS


def ar_stories(run: str, samples: int, tokens: int) -> list[str]:
    from jetson_dllm.families import ar
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    with open_runner("torch", run, threads=1) as r:
        return [t for i, p in enumerate(PROMPTS)
                for t in ar.complete(r, p, length=tokens, num_samples=samples, sampler=SamplerConfig(temperature=0.8, seed=i)).texts]


def diffusion_stories(run: str, samples: int, tokens: int, steps: int, temperature: float) -> list[str]:
    from jetson_dllm.families.mdlm import generate
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    with open_runner("torch", run, threads=1) as r:
        return [t for i, p in enumerate(PROMPTS)
                for t in generate(r, r.tokenizer, p, length=tokens, num_samples=samples,
                                  sampler=SamplerConfig(steps=steps, strategy="confidence", temperature=temperature, seed=i)).texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diffusion", required=True, help="an MDLM run (the README's 20-minute diffusion model, or its twin)")
    ap.add_argument("--ar", required=True, help="the AR run whose stories are a row")
    ap.add_argument("--data", required=True)
    ap.add_argument("--judges", nargs="+", required=True, help="AR checkpoints; the first is the old judge")
    ap.add_argument("--samples", type=int, default=4, help="stories per prompt (4 prompts)")
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import torch

    from jetson_dllm.textstats import distinct, repetition
    from train_host.judge import Judge

    torch.set_num_threads(1)
    rows = {"real held-out stories": reference_texts(args.data, 4 * args.samples, args.tokens),
            "AR, temperature 0.8": ar_stories(args.ar, args.samples, args.tokens)}
    for steps, temperature in ((16, 0.8), (64, 0.8), (128, 0.0)):
        rows[f"MDLM, {steps} steps, temperature {temperature:g}"] = diffusion_stories(args.diffusion, args.samples, args.tokens, steps, temperature)
    scores = {}
    for path in args.judges:
        judge = Judge(path)
        scores[path] = {name: judge.perplexity(texts) for name, texts in rows.items()}
        del judge
    names = [Path(j).name for j in args.judges]
    print(f"{len(PROMPTS)} prompts x {args.samples} stories of {args.tokens} tokens per row; judges: "
          + ", ".join(f"{n} ({j})" for n, j in zip(names, args.judges)) + "\n")
    print("| texts | " + " | ".join(f"{n} ppl" for n in names) + f" | {names[-1]} / {names[0]} | repetition | distinct-2 |")
    print("|---|" + "---:|" * (len(names) + 3))
    for name, texts in rows.items():
        ppl = [scores[j][name] for j in args.judges]
        print(f"| {name} | " + " | ".join(f"{p:.1f}" for p in ppl) + f" | {ppl[-1] / ppl[0]:.2f} | "
              f"{np.mean([repetition(t) for t in texts]):.3f} | {distinct(texts, 2):.3f} |")
    print("\nfirst story of each row:")
    for name, texts in rows.items():
        print(f"- {name}: {texts[0][:200]!r}")


if __name__ == "__main__":
    main()
