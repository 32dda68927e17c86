"""`dllm import`: a pretrained Llama-family model (a Hugging Face folder, or a GGUF file: train_host/gguf_import.py)
becomes a checkpoint of the `ar` family that every other verb takes.

What changes on the way in: the weights get our names (q, k and v stacked as `wqkv` rows; gate/up/down as w1/w3/w2),
two tokens are added to the tokenizer (`<|pad|>` and `<|mask|>`, the mask for diffusion adaptation; both new
embedding rows start at the mean embedding, and the mask's logit is biased away as in every model here), and the
checkpoint records where it came from (the source files' sha256, their format and what was converted). The rotary
layout is Hugging Face's (halves rotated), which is ours; GGUF's is un-permuted on import.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.files import atomic_write, check_makeable, output_lock
from jetson_dllm.tokenizer import MASK, PAD, TextTokenizer
from train_host.hf_import import DEFAULT_CONTEXT, Imported, read_hf_folder

MARKER, MARKER_FORMAT = "imported.json", "jetson-dllm-import"  # marks a folder `dllm import` made (and may replace)


def build_checkpoint(imp: Imported, context: int) -> tuple[ModelConfig, dict[str, torch.Tensor], TextTokenizer]:
    """Our config, weights and tokenizer: the padding and mask tokens added to the tokenizer and as embedding rows
    (the mean embedding), the vocabulary the larger of the model's and the tokenizer's."""
    from tokenizers import AddedToken

    tok = imp.tokenizer
    tok.add_special_tokens([AddedToken(PAD, special=True), AddedToken(MASK, special=True)])
    pad_id, mask_id = tok.token_to_id(PAD), tok.token_to_id(MASK)
    c = dict(imp.cfg)
    vocab = max(c["vocab_size"], tok.get_vocab_size())
    emb = imp.tensors["tok_emb.weight"]
    if emb.shape[0] != c["vocab_size"]:
        raise DllmError(f"the embedding has {emb.shape[0]} rows but the config says a vocabulary of {c['vocab_size']}")
    if tok.get_vocab_size() - 2 > c["vocab_size"]:
        raise DllmError(f"the tokenizer has {tok.get_vocab_size() - 2} tokens but the embedding only {c['vocab_size']} rows; "
                        "the tokenizer does not belong to these weights")
    tensors = dict(imp.tensors)
    for name in ("tok_emb.weight", "head.weight"):
        if name in tensors:
            t = tensors[name]
            grown = torch.cat([t, t.mean(0, keepdim=True).expand(vocab - t.shape[0], -1)]) if vocab > t.shape[0] else t.clone()
            grown[[pad_id, mask_id]] = t.mean(0)  # the added tokens start at the mean row
            tensors[name] = grown.contiguous()
    canvas = min(context, c.pop("max_context"))
    c.pop("vocab_size")
    cfg = ModelConfig(name="imported", family="ar", vocab_size=vocab, canvas_len=canvas, mask_id=mask_id, **c)
    ids = {"pad": pad_id, "eot": imp.eot_id, "mask": mask_id, **({"bos": imp.bos_id} if imp.bos_id is not None else {})}
    return cfg, tensors, TextTokenizer(tok, "the imported tokenizer", ids, imp.chat_template)


def import_model(source: str | Path, out_dir: str | Path, context: int = DEFAULT_CONTEXT, overwrite: bool = False, progress=None) -> Path:
    """Read `source` (a .gguf file or a Hugging Face folder), write a sealed checkpoint of the `ar` family into
    `out_dir` (a run folder, as training makes), and return the checkpoint's folder. Nothing is written on failure."""
    from train_host.checkpoint import load_weights, save_checkpoint
    from train_host.model import Denoiser

    say = progress or (lambda msg: None)
    source, out_dir = Path(source), Path(out_dir)
    if not source.exists():
        raise DllmError(f"{source} not found")
    if not 8 <= context <= 16384:
        raise DllmError(f"--context must be in 8..16384, got {context}")
    check_makeable(out_dir)  # not under a file: refused before the source is read
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite or not (out_dir / MARKER).is_file():
            made = (out_dir / MARKER).is_file()
            raise DllmError(f"{out_dir} is not empty" + ("; --overwrite replaces an earlier import" if made else
                            " and holds files that are not an import jetson-dllm made; choose another output folder"))
    if source.is_dir():
        imp = read_hf_folder(source, say)
    else:
        from train_host.gguf_import import read_gguf

        imp = read_gguf(source, say)
    cfg, tensors, tokenizer = build_checkpoint(imp, context)
    say(f"{cfg.num_params() / 1e6:.1f} M parameters, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} key/value), vocabulary {cfg.vocab_size:,}")
    model = Denoiser(cfg)
    load_weights(model, tensors, str(source))
    with output_lock(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(out_dir, 0, model, cfg, tokenizer, {}, provenance=imp.provenance)
        atomic_write(out_dir / MARKER, json.dumps({"format": MARKER_FORMAT, **imp.provenance}, indent=1).encode())
    return path
