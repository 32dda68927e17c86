"""The imported model against llama.cpp on the same GGUF: parity (tokenization, top-1 agreement, logit difference,
held-out NLL) and CPU speed (prompt processing, 256 greedy tokens), in one run with the same threads.

    pip install llama-cpp-python        # builds llama.cpp from source (minutes); a peer here, never a dependency
    python benchmarks/llama_cpp_peer.py SmolLM2.gguf --run runs/smollm2 --bundle runs/smollm2-bundle --text held_out.txt

`--run` is the checkpoint `dllm import` made of that GGUF (its logits are torch FP32 over the dequantized weights;
llama.cpp computes with the quantized blocks themselves, so they differ by the quantization's arithmetic); `--bundle`
its `dllm export` (our decode and verify graphs on onnxruntime, the runtime a user runs on a CPU: the prompt read by
the verify graph, 64 tokens a call, where the bundle has it). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

PROMPTS = ["Once upon a time, there was a little girl named Lily.", "The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n", "Tom and his dog went to the park. They played with a red ball until"]


def llama(gguf: str, threads: int, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False, seed=0)


def their_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def parity(llm, run: str, texts: list[str]) -> dict:
    import torch

    from train_host.checkpoint import load_model

    model, tok, _ = load_model(run)
    bos = tok.bos_id
    same_ids, agree, total, worst, nll = 0, 0, 0, 0.0, {"ours": [0.0, 0], "llama.cpp": [0.0, 0]}
    for text in texts:
        ours_ids = tok.encode(text)
        theirs_ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        same_ids += ours_ids == list(theirs_ids)
        ids = [bos, *ours_ids]
        with torch.no_grad():
            mine = model(torch.tensor([ids])).float()[0, :, : llm.n_vocab()].numpy()
        theirs = their_logits(llm, ids)
        agree += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
        worst = max(worst, float(np.abs(mine - theirs).max()))
        for name, logits in (("ours", mine), ("llama.cpp", theirs)):
            lse = np.log(np.exp(logits[:-1] - logits[:-1].max(-1, keepdims=True)).sum(-1)) + logits[:-1].max(-1)
            nll[name][0] += float((lse - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            nll[name][1] += len(ids) - 1
    return {"texts": len(texts), "same_tokens": same_ids, "top1_agreement": agree / total, "positions": total,
            "max_abs_logit_diff": worst, "nll": {k: v[0] / v[1] for k, v in nll.items()}}


def their_speed(llm, prompt_ids: list[int], tokens: int) -> dict:
    """The prompt's evaluation (until the first token comes), then the tokens after it."""
    llm.reset()
    t0, first, n = time.perf_counter(), 0.0, 0
    for _ in llm.generate(prompt_ids, temp=0.0, reset=True):
        n += 1
        if n == 1:
            first = time.perf_counter()
        if n == tokens:
            break
    return {"prompt_tokens_per_s": len(prompt_ids) / (first - t0), "tokens_per_s": (n - 1) / (time.perf_counter() - first)}


def our_speed(bundle: str, precision: str, threads: int, prompt_ids: list[int], tokens: int) -> dict:
    from jetson_dllm.families.ar import decode_tokens
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    with open_runner("onnx", bundle, precision=precision, threads=threads) as runner:
        decode_tokens(runner, prompt_ids[:4], 4, 1, SamplerConfig(temperature=0.0))  # warm-up
        r = decode_tokens(runner, prompt_ids, tokens, 1, SamplerConfig(temperature=0.0), stop_at_end=False)
    calls = np.array(r.step_ms) / 1e3
    prompt_s = calls[: len(calls) - (r.new_tokens - 1)].sum()  # the start token and the prompt: verify calls (prefill), or one decode call each
    return {"prompt_tokens_per_s": (len(prompt_ids) + 1) / prompt_s, "tokens_per_s": r.new_tokens / (r.seconds - prompt_s),
            "prompt_calls": int(len(calls) - (r.new_tokens - 1))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--run", required=True, help="the checkpoint dllm import made of the GGUF")
    p.add_argument("--bundle", default="", help="its dllm export (our decode graph on onnxruntime), for the speed table")
    p.add_argument("--precisions", default="fp32", help="bundle precisions to time, e.g. fp32,int8-dynamic")
    p.add_argument("--text", default="", help="held-out text for the NLL: stories separated by <|endoftext|> lines, or paragraphs")
    p.add_argument("--texts", type=int, default=16, help="the last N stories of --text to score")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=256)
    args = p.parse_args()
    texts = PROMPTS
    if args.text:
        raw = open(args.text, encoding="utf-8").read()
        texts = [t.strip() for t in raw.split("<|endoftext|>" if "<|endoftext|>" in raw else "\n\n") if t.strip()][-args.texts :]
    llm = llama(args.gguf, args.threads, 2048)
    par = parity(llm, args.run, texts)
    print(f"llama.cpp (llama-cpp-python) and `dllm import` of {os.path.basename(args.gguf)}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}\n")
    print("| texts | same tokenization | positions | top-1 agreement | max abs logit difference | NLL ours | NLL llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {par['texts']} | {par['same_tokens']}/{par['texts']} | {par['positions']} | {par['top1_agreement']:.4f} "
          f"| {par['max_abs_logit_diff']:.3f} | {par['nll']['ours']:.4f} | {par['nll']['llama.cpp']:.4f} |")
    if args.bundle:
        from jetson_dllm.tokenizer import TextTokenizer

        prompt = TextTokenizer.from_file(os.path.join(args.bundle, "tokenizer.json")).encode(" ".join(PROMPTS))[:64]
        rows = [("llama.cpp (its GGUF blocks)", their_speed(llm, prompt, args.tokens))]
        for precision in args.precisions.split(","):
            rows.append((f"ours, onnxruntime {precision} (prompt: verify graph)", our_speed(args.bundle, precision, args.threads, prompt, args.tokens)))
        print(f"\n{len(prompt)}-token prompt, then {args.tokens} greedy tokens (end-of-text not stopping them):\n")
        print("| runtime | prompt tokens/s | generated tokens/s |\n|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['prompt_tokens_per_s']:,.0f} | {r['tokens_per_s']:,.1f} |")


if __name__ == "__main__":
    main()
