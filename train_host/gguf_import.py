"""A GGUF file of the llama architecture (llama.cpp's format) read into our layout, with the `gguf` package.

Tensors are dequantized to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; others are
refused by name). llama.cpp's converter permutes the rows of Q and K for its interleaved rotary layout; they are
permuted back here to the halves-rotated layout our model (and Hugging Face's) uses, or the model would be quietly
wrong. The tokenizer is rebuilt from the file's tokens and merges as an HF `tokenizers` byte-level BPE, with the
pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jetson_dllm.errors import DllmError
from train_host.hf_import import Imported, check_memory, check_shape, layer_tensors, sha256_of, used_all

DEQUANTIZED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
CONTROL = 3  # tokenizer.ggml.token_type of special (control) tokens


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q or K rows (per head: interleaved pairs back to two halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, name: str, default=None):
    f = reader.fields.get(name)
    if f is None:
        if default is None:
            raise DllmError(f"the GGUF file has no {name}; is it a complete llama-architecture model?")
        return default
    return f.contents()


def _number(reader, name: str, kind: type, default=None):
    """A metadata number of the file, of its type (an integer field that is a string or an array is refused)."""
    value = _field(reader, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise DllmError(f"the GGUF file's {name} is {str(value)[:30]!r}, not {'an integer' if kind is int else 'a number'}")
    return kind(value)


def gguf_tokenizer(reader):
    """The file's byte-level BPE as a `tokenizers.Tokenizer` (control tokens as special added tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise DllmError(f"the GGUF tokenizer is {_field(reader, 'tokenizer.ggml.model')!r}; dllm import rebuilds byte-level BPE (gpt2) tokenizers only")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    # llama.cpp's "smollm" (like starcoder's) splits every digit before the GPT-2 pattern
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if pre in ("smollm", "starcoder", "refact") else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, kind in zip(tokens, types) if kind == CONTROL])
    return tok, pre


def read_gguf(path: Path, say=lambda msg: None) -> Imported:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on a truncated or foreign file
        raise DllmError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise DllmError(f"{path} is a GGUF of the {arch!r} architecture; dllm import takes llama-architecture models")
    n_head, n_layer = _number(reader, "llama.attention.head_count", int), _number(reader, "llama.block_count", int)
    n_kv = _number(reader, "llama.attention.head_count_kv", int, n_head)
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    d_model = _number(reader, "llama.embedding_length", int)
    cfg = check_shape({"d_model": d_model, "n_head": n_head, "n_kv_head": n_kv, "n_layer": n_layer,
                       "d_ff": _number(reader, "llama.feed_forward_length", int),
                       "vocab_size": int(emb.shape[-1]) if emb is not None and len(emb.shape) == 2 else 0,
                       "rope_theta": _number(reader, "llama.rope.freq_base", float, 10000.0),
                       "norm_eps": _number(reader, "llama.attention.layer_norm_rms_epsilon", float, 1e-5),
                       "max_context": _number(reader, "llama.context_length", int, 2048)}, str(path))  # before the un-permutation cuts heads
    check_memory(sum(int(t.n_elements) for t in reader.tensors))
    say(f"dequantizing {len(reader.tensors)} tensors of a llama-architecture GGUF")
    raw, qtypes = {}, set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in DEQUANTIZED:
            raise DllmError(f"{path}: tensor {t.name} is {kind}, a quantization dllm import does not read ({', '.join(DEQUANTIZED)})")
        qtypes.add(kind)
        raw[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])

    taken: set[str] = set()

    def get(name: str) -> torch.Tensor:
        taken.add(name)
        if name not in raw:
            raise DllmError(f"{path} has no tensor {name}; is it a complete llama-architecture model?")
        return torch.from_numpy(raw[name].copy())

    tensors = {"tok_emb.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    tied = "output.weight" not in raw
    if not tied:
        tensors["head.weight"] = get("output.weight")
    for i in range(n_layer):
        b = f"blk.{i}."
        q = torch.from_numpy(unpermute(get(b + "attn_q.weight").numpy(), n_head).copy())
        k = torch.from_numpy(unpermute(get(b + "attn_k.weight").numpy(), n_kv).copy())
        tensors.update(layer_tensors(i, q, k, get(b + "attn_v.weight"), get(b + "attn_output.weight"), get(b + "ffn_gate.weight"),
                                     get(b + "ffn_up.weight"), get(b + "ffn_down.weight"), get(b + "attn_norm.weight"), get(b + "ffn_norm.weight")))
    used_all(raw, taken, path)
    tokenizer, pre = gguf_tokenizer(reader)
    cfg = {**cfg, "vocab_size": int(tensors["tok_emb.weight"].shape[0]), "tie_embeddings": tied}
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    provenance = {"source": str(path), "format": "gguf", "architecture": arch, "files": {path.name: sha256_of(path)},
                  "quantization": sorted(qtypes), "tokenizer_pre": pre,
                  "converted": "dequantized to float32; Q and K rows un-permuted from llama.cpp's rotary layout; q/k/v stacked "
                               "into wqkv; <|pad|> and <|mask|> added"}
    template = _field(reader, "tokenizer.chat_template", "")  # "" when the file has none
    return Imported(cfg, tensors, tokenizer, _number(reader, "tokenizer.ggml.eos_token_id", int),
                    _number(reader, "tokenizer.ggml.bos_token_id", int) if bos is not None else None, provenance, template if isinstance(template, str) and template.strip() else None)
