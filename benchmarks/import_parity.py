"""Parity of `dllm import` with the reference implementation: a random Llama (grouped-query attention, untied head)
saved by transformers, imported from its Hugging Face folder and from a GGUF written as llama.cpp's converter writes
it (Q/K permuted; F32, Q8_0), scored on the same ids. Prints a markdown table.

    python benchmarks/import_parity.py [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "train_host"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "bad_input"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from test_import import TEXT, make_tokenizer, reference_logits, write_gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    from train_host.checkpoint import load_model
    from train_host.importer import import_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "hf"
        folder.mkdir()
        tok = make_tokenizer(folder)
        config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=100000.0,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(args.seed)
        LlamaForCausalLM(config).eval().save_pretrained(str(folder), safe_serialization=True)
        rows = []
        sources = {"Hugging Face folder": folder}
        for q in ("F32", "Q8_0"):
            write_gguf(folder, tmp / f"m-{q}.gguf", q)
            sources[f"GGUF {q}"] = tmp / f"m-{q}.gguf"
        for name, source in sources.items():
            import_model(source, tmp / name.replace(" ", "-"), context=64)
            model, t, _ = load_model(tmp / name.replace(" ", "-"))
            ids = torch.tensor([[1, *t.encode(" ".join(TEXT[:3]))][:48]])
            want = reference_logits(folder, ids)
            with torch.no_grad():
                got = model(ids)[..., : want.shape[-1]]
            top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
            rows.append((name, float((got - want).abs().max()), top1, ids.shape[1]))
    print("| source | max abs logit diff vs transformers | top-1 agreement | positions |\n|---|---|---|---|")
    for name, diff, top1, n in rows:
        print(f"| {name} | {diff:.2e} | {top1:.3f} | {n} |")


if __name__ == "__main__":
    main()
