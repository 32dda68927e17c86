"""Classifier-free guidance toward a prompt (issue 26): how well continuations follow a held-out first sentence, at
guidance 0 / 1 / 2 / 4 and three schedules, and what guidance costs per step.

    python benchmarks/guidance.py --data runs/adapt/data --runs runs/sdd --judge runs/smollm2 --out runs/guidance

Pairs: `dllm data --pairs` over the data folder's own sources with its tokenizer and validation share, so the pairs'
validation split is the documents the models never trained on; the first `--pairs` of them. Per setting, each pair's
first sentence is the prompt and `--length` tokens follow (temperature 0.8, one step per token: `--length` steps, seed =
the pair's index, batch 1, one thread); the judge (SmolLM2-135M imported: none of our models) scores the continuation
read after the first sentence (perplexity), and the same continuation read as a story's start: their difference per
token is how much the first sentence explains it (the condition gain, nats per token; what following the prompt
means). Rows: MDLM (`RUNS/mdlm`) unguided, guided (LLaDA's unsupervised CFG: the twin row masks the prompt), and from
no prompt at all (the unconditional baseline); the AR baseline (`RUNS/ar`) continuing the same sentence; the real
rest of each story cut to `--length` of the judge's tokens (the reference); and, when `--cond` holds one, a
conditional model, MDLM or BD3 (its `--init` parent with an encoder and cross-attention trained onto it, the
denoiser frozen or not) reading the first sentence as its condition, no prompt, at guidance 0 / 1 / 2 / 4 and 2 late
(its guided twin drops the condition), and under the empty condition; a BD3 model takes one step per token of each
block. `--conditional-only` measures only that model (OUT/guidance-NAME.json):

    python benchmarks/guidance.py --cond runs/guidance/bd3-frozen --conditional-only Cost: one canvas call of 128 positions, batch 1, against the guided call (2 rows,
the logits out, the mix on the host), on torch and on onnxruntime (FP32 bundle `RUNS/bundles/mdlm`), median of 30.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SETTINGS = {"w 0": (0.0, "constant"), "w 1": (1.0, "constant"), "w 2": (2.0, "constant"), "w 4": (4.0, "constant"),
            "w 2 late": (2.0, "late"), "w 4 late": (4.0, "late"), "w 2 ramp": (2.0, "ramp")}
COND_SETTINGS = {k: SETTINGS[k] for k in ("w 0", "w 1", "w 2", "w 4", "w 2 late")}


def pairs(data: Path, out: Path, n: int) -> list[tuple[str, str]]:
    """The held-out pairs, made once from the data folder's sources (same tokenizer and split)."""
    from train_host.data import load_manifest, prepare_data
    from train_host.pairs import read_pairs
    from train_host.sources import Source

    folder = out / "data"
    if not (folder / "pairs.val.jsonl").is_file():
        m = load_manifest(data)
        prepare_data([Source(s) for s in m["sources"]], folder, val_fraction=m["val_fraction"], tokenizer_path=data / "tokenizer.json",
                     pairs=True, overwrite=True)
    return read_pairs(folder / "pairs.val.jsonl", n)


def continuations(run: Path, conditions: list[str], length: int, guidance: float = 0.0, schedule: str = "constant",
                  how: str = "prompt") -> tuple[list[str], float]:
    """Each condition's continuation and the network calls per generated token; the condition given as the prompt
    (the text after it is the continuation), as a conditional model's condition, or not at all ("none")."""
    from jetson_dllm.families import family_of
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    texts, calls, made = [], 0, 0
    with open_runner("torch", run, threads=1) as runner:
        family = family_of(runner.cfg)
        module = family.runtime_module()
        for i, condition in enumerate(conditions):
            prompt = condition if how == "prompt" else ""
            sampler = SamplerConfig(steps=length, temperature=0.8, seed=i, guidance=guidance, guidance_schedule=schedule)
            if family.left_to_right and runner.cfg.block_size:  # block diffusion: one step per token of a block
                sampler = SamplerConfig(steps=runner.cfg.block_size, temperature=0.8, seed=i, guidance=guidance, guidance_schedule=schedule)
                extra = {"condition": condition} if how == "condition" else {}
                g = module.complete(runner, prompt, length=length, sampler=sampler, **extra)
            elif family.left_to_right:
                g = module.complete(runner, prompt, length=length, sampler=SamplerConfig(temperature=0.8, seed=i))
            else:
                extra = {"condition": condition} if how == "condition" else {}
                g = module.generate(runner, runner.tokenizer, prompt, length, 1, sampler, allow_empty=not prompt, **extra)
            text = g.texts[0]
            texts.append(text[len(prompt):] if text.startswith(prompt) else text)
            calls += g.result.evaluations if hasattr(g.result, "evaluations") else g.result.new_tokens  # AR: one call per token
            made += length
    return texts, calls / made


def judged(judge, conditions: list[str], texts: list[str]) -> dict:
    import math

    from train_host.judge import sample_quality

    given = judge.continuation_nll(conditions, texts)
    alone = judge.continuation_nll([""] * len(texts), texts)
    tokens = sum(n for _, n in given)
    nll = sum(s for s, _ in given) / tokens
    gain = (sum(s for s, _ in alone) - sum(s for s, _ in given)) / tokens
    stats = sample_quality(texts)
    return {"judge_ppl": math.exp(nll), "condition_gain": gain, "repetition": stats["repetition"], "distinct2": stats["distinct2"]}


class _Rests:
    """A pairs split's canvases without their conditions (what an unconditional model is scored on)."""

    def __init__(self, pairs):
        self.pairs, self.pad_id = pairs, pairs.pad_id

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, rows):
        return self.pairs.batch(rows)


class _EmptyConditions(_Rests):
    def conditions(self, rows, device="cpu"):
        ids, lengths = self.pairs.conditions(rows, device)
        return ids, lengths * 0


def likelihoods(cond: Path, parent: Path, data: Path) -> dict:
    """The NLL bound of every held-out rest (its first canvas) given its first sentence, given the empty condition,
    and under the unconditional parent: what the condition is worth in nats per token."""
    import torch

    from train_host.checkpoint import load_model
    from train_host.evaluate import evaluate
    from train_host.pair_data import PairDataset

    model, tok, _ = load_model(cond)
    pairs = PairDataset(data, "val", model.cfg.canvas_len, model.cfg.cond_len, tok)
    torch.set_num_threads(1)
    with torch.inference_mode():
        score = lambda m, ds: evaluate(m, ds, m.cfg.mask_id, n_canvases=len(ds), n_t=16)["val_nll"]  # noqa: E731
        return {"given the first sentence": score(model, pairs), "given the empty condition": score(model, _EmptyConditions(pairs)),
                "the unconditional parent": score(load_model(parent)[0], _Rests(pairs)), "pairs": len(pairs)}


def model_config(run: Path):
    """A run's model config (jetson_dllm.config.ModelConfig), as its train_config.json records it."""
    from jetson_dllm.config import ModelConfig

    return ModelConfig.from_dict(json.loads((run / "train_config.json").read_text())["model"])


def parent_of(run: Path) -> Path:
    """The run a conditional model was trained from (`--init`): its unconditional parent."""
    return Path(json.loads((run / "train_config.json").read_text())["train"]["init"])


def cost(runs: Path, repeats: int = 30) -> dict:
    """ms per step: a canvas call of 128 positions, batch 1, plain and guided, on torch and onnxruntime."""
    import numpy as np
    from bd3_speed import median_ms

    from jetson_dllm.guidance import guided_head
    from jetson_dllm.runners.loaders import open_runner

    out = {}
    for backend, path in (("torch", runs / "mdlm"), ("onnx", runs / "bundles" / "mdlm")):
        if not path.exists():
            continue
        with open_runner(backend, path, threads=1) as runner:
            rng = np.random.default_rng(0)
            width = min(128, runner.cfg.canvas_len)
            canvas = rng.integers(3, runner.cfg.vocab_size, (1, width)).astype(np.int32)
            canvas[:, width // 2 :] = runner.tokenizer.mask_id
            twin = np.concatenate([canvas, canvas])

            def plain(runner=runner, canvas=canvas):
                runner.run("canvas", {"tokens": canvas})

            def guided(runner=runner, twin=twin):
                logits = runner.run("canvas", {"tokens": twin}, ("logits",))["logits"]
                guided_head(logits[:1], logits[1:], 2.0, runner.topk)

            for name, fn in (("plain", plain), ("guided", guided)):
                out[f"{backend} {name}"] = median_ms(fn, repeats)  # a warm-up call, then the median
    return out


def block_cost(run: Path, bundle: Path, repeats: int = 30) -> dict:
    """ms per step of a conditional BD3 model: a block step at position 64 over the cache, batch 1, plain (one row,
    the top-K head in the graph) and guided (the twin row too, both rows' logits out, the mix), on torch and
    onnxruntime (FP32 `bundle`, when it exists); the commit of a block, plain and with its twin."""
    import numpy as np
    from bd3_speed import median_ms

    from jetson_dllm.condition import encoder_call
    from jetson_dllm.guidance import guided_head
    from jetson_dllm.runners.loaders import open_runner

    out = {}
    for backend, path in (("torch", run), ("onnx", bundle)):
        if not path.exists():
            continue
        with open_runner(backend, path, threads=1) as runner:
            cfg, rng = runner.cfg, np.random.default_rng(0)
            enc = runner.run("encoder", encoder_call([[5, 6, 7], []], cfg.cond_len).feeds)
            memory = {k: np.array(v, copy=True) for k, v in enc.items()}
            block = rng.integers(3, cfg.vocab_size, (1, cfg.block_size)).astype(np.int32)
            block[:, cfg.block_size // 2 :] = runner.tokenizer.mask_id
            one = {"tokens": block, "valid_len": np.int32(64), **{k: v[:1] for k, v in memory.items()}}
            two = {"tokens": np.concatenate([block, block]), "valid_len": np.int32(64), **memory}
            def guided(two=two):
                guided_head(*np.split(runner.run("block_step", two, ("logits",))["logits"], 2), 2.0, runner.topk)

            calls = {"block step, plain": lambda one=one: runner.run("block_step", one),  # one row, then two: each batch
                     "commit, plain": lambda one=one: runner.run("commit", one),  # size's cache is allocated once
                     "block step, guided (2 rows, logits out, the mix)": guided,
                     "commit, with its twin (2 rows)": lambda two=two: runner.run("commit", two)}
            for name, fn in calls.items():
                out[f"{backend} {name}"] = median_ms(fn, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("runs/adapt/data"))
    ap.add_argument("--runs", type=Path, default=Path("runs/sdd"), help="the SDD study's folder: its mdlm, ar and bundles/mdlm")
    ap.add_argument("--judge", default="runs/smollm2")
    ap.add_argument("--cond", type=Path, default=Path("runs/guidance/cond"), help="a conditional MDLM (its rows when it exists)")
    ap.add_argument("--out", type=Path, default=Path("runs/guidance"))
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--conditional-only", action="store_true", help="only --cond's rows (OUT/guidance-NAME.json): another conditional model")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from train_host.judge import Judge

    args.out.mkdir(parents=True, exist_ok=True)
    held = pairs(args.data, args.out, args.pairs)
    conditions = [c for c, _ in held]
    judge = Judge(args.judge)
    rows = {} if args.conditional_only else prompt_rows(args, judge, held)
    nll = None
    if (args.cond / "checkpoints").is_dir():  # the conditional model: the first sentence through its encoder, no prompt
        rows |= conditional_rows(args, judge, conditions)
        nll = likelihoods(args.cond, parent_of(args.cond), args.out / "data")
        print("NLL bound of the held-out rests:", json.dumps(nll), flush=True)
    costs = {} if args.conditional_only else cost(args.runs)
    if (args.cond / "checkpoints").is_dir() and model_config(args.cond).block_size:  # a conditional BD3 model
        costs |= block_cost(args.cond, args.out / "bundles" / args.cond.name)
    result = {"nll_bound": nll, "pairs": len(held), "length": args.length, "rows": rows, "cond": str(args.cond),
              "cost_ms": costs, "first_condition": conditions[0], "load": os.getloadavg()}
    name = f"guidance-{args.cond.name}.json" if args.conditional_only else "guidance.json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    print(table(result))


def prompt_rows(args, judge, held: list[tuple[str, str]]) -> dict:
    """The reference, the AR baseline, and MDLM from no prompt and from the first sentence at every guidance setting."""
    conditions = [c for c, _ in held]
    tok = judge.tokenizer  # the real rest cut to about the generated length (the judge's tokens; ours are about as long)
    rests = [tok.decode(tok.encode(r)[: args.length]) for _, r in held]
    rows = {f"real rest of the story (first {args.length} tokens)": {**judged(judge, conditions, rests), "calls_per_token": None}}
    texts, per = continuations(args.runs / "ar", conditions, args.length)
    rows["AR baseline"] = {**judged(judge, conditions, texts), "calls_per_token": per, "sample": texts[0]}
    texts, per = continuations(args.runs / "mdlm", conditions, args.length, how="none")
    rows["MDLM, no prompt"] = {**judged(judge, conditions, texts), "calls_per_token": per, "sample": texts[0]}
    for label, (w, schedule) in SETTINGS.items():
        texts, per = continuations(args.runs / "mdlm", conditions, args.length, w, schedule)
        rows[f"MDLM {label}"] = {**judged(judge, conditions, texts), "calls_per_token": per, "sample": texts[0]}
        print(label, json.dumps({k: v for k, v in rows[f"MDLM {label}"].items() if k != "sample"}), flush=True)
    return rows


def conditional_rows(args, judge, conditions: list[str]) -> dict:
    """The conditional model under the empty condition and under each first sentence at every guidance setting."""
    cfg = model_config(args.cond)
    name = f"conditional {'BD3' if cfg.family == 'bd3' else 'MDLM'} ({args.cond.name})"
    texts, per = continuations(args.cond, conditions, args.length, how="none")
    rows = {f"{name}, empty condition": {**judged(judge, conditions, texts), "calls_per_token": per, "sample": texts[0]}}
    if cfg.family == "bd3":  # its unconditional parent, from the sentence as a prompt and from nothing (MDLM's are prompt_rows')
        parent = parent_of(args.cond)
        for how, label in (("prompt", "the sentence as prompt"), ("none", "no prompt")):
            texts, per = continuations(parent, conditions, args.length, how=how)
            rows[f"BD3 parent ({parent.name}), {label}"] = {**judged(judge, conditions, texts), "calls_per_token": per, "sample": texts[0]}
    for label, (w, schedule) in COND_SETTINGS.items():
        texts, per = continuations(args.cond, conditions, args.length, w, schedule, how="condition")
        rows[f"{name} {label}"] = {**judged(judge, conditions, texts), "calls_per_token": per, "sample": texts[0]}
        print("conditional", label, json.dumps({k: v for k, v in rows[f"{name} {label}"].items() if k != "sample"}), flush=True)
    return rows


def table(result: dict) -> str:
    lines = ["| generator | judge ppl given the first sentence | condition gain (nats/token) | repetition | distinct-2 | calls per token |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        per = "" if r["calls_per_token"] is None else f"{r['calls_per_token']:.2f}"
        lines.append(f"| {name} | {r['judge_ppl']:.1f} | {r['condition_gain']:+.3f} | {r['repetition']:.2f} | {r['distinct2']:.2f} | {per} |")
    if result["cost_ms"]:
        lines += ["", "| step (batch 1, one thread) | ms |", "|---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in result["cost_ms"].items()]
    if result.get("nll_bound"):
        nll = result["nll_bound"]
        lines += ["", f"| NLL bound of {nll['pairs']} held-out rests (first canvas) | nats/token |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in nll.items() if k != "pairs"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
