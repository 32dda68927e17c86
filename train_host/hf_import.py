"""A Hugging Face folder of a Llama-architecture causal LM read into our layout (and what every importer shares:
the `Imported` record, our names for a layer's tensors, file hashes). train_host/importer.py turns it into a
checkpoint."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from jetson_dllm.errors import DllmError


def check_memory(n_params: int) -> None:
    """Refuse an import whose float32 copies (the source's, ours, the checkpoint's tensors) will not fit, before any
    is made."""
    from jetson_dllm.profiler import check_fits

    check_fits(3 * 4 * n_params, f"importing a {n_params / 1e6:.0f} M-parameter model (its float32 copies while converting)",
               "import it on a machine with more memory")


SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")  # the same tensors (Mistral without sliding windows)
DEFAULT_CONTEXT = 2048


@dataclass
class Imported:
    """A source model read into our layout: the config (before the added tokens), tensors by our names, its
    tokenizer (a tokenizers.Tokenizer) and special ids, and provenance."""

    cfg: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: object
    eot_id: int
    bos_id: int | None
    provenance: dict = field(default_factory=dict)
    chat_template: str | None = None  # an instruct model's own (Jinja): the server's chat requests use it


Positive = Field(gt=0)


class HfConfig(BaseModel):
    """What of a Hugging Face config.json the import reads, typed and ranged (other keys are the architecture's own)."""

    model_config = ConfigDict(extra="allow")
    hidden_size: StrictInt = Positive
    num_attention_heads: StrictInt = Positive
    num_key_value_heads: StrictInt | None = Field(None, gt=0)
    num_hidden_layers: StrictInt = Positive
    intermediate_size: StrictInt = Positive
    vocab_size: StrictInt = Positive
    rms_norm_eps: StrictFloat | StrictInt = Field(1e-5, gt=0)
    rope_theta: StrictFloat | StrictInt = Field(10000.0, gt=0)
    max_position_embeddings: StrictInt = Field(DEFAULT_CONTEXT, gt=0)
    eos_token_id: StrictInt | Annotated[list[StrictInt], Field(min_length=1)]
    bos_token_id: StrictInt | list[StrictInt] | None = None
    tie_word_embeddings: StrictBool = False
    head_dim: StrictInt | None = None
    architectures: list[str] = Field(default_factory=lambda: ["?"])


def check_shape(cfg: dict, where: str) -> dict:
    """What every reader's config must be before any arithmetic on it (the shapes a source's tensors are cut to): heads
    that divide the width into an even head size, key/value heads that divide the heads. The config, or one line."""
    d, h, kv = cfg["d_model"], cfg["n_head"], cfg["n_kv_head"]
    for name in ("d_model", "n_head", "n_kv_head", "n_layer", "d_ff", "vocab_size", "max_context"):
        if type(cfg[name]) is not int or cfg[name] <= 0:
            raise DllmError(f"{where}: {name} must be a positive integer, got {str(cfg[name])[:20]!r}")
    for name in ("rope_theta", "norm_eps"):
        if not (isinstance(cfg[name], float) and math.isfinite(cfg[name]) and cfg[name] > 0):
            raise DllmError(f"{where}: {name} must be a positive number, got {str(cfg[name])[:20]!r}")
    if d % h or (d // h) % 2:
        raise DllmError(f"{where}: {h} attention heads do not divide the width {d} into an even head size")
    if h % kv:
        raise DllmError(f"{where}: {kv} key/value heads do not divide the {h} attention heads")
    return cfg


def used_all(raw: dict, taken: set[str], where: str, skipped: tuple[str, ...] = ()) -> None:
    """Every tensor of the source is in the model, or the import is refused naming the first that is not (a bias
    the converter does not know, a layer past the config's count): never a model that is not the source."""
    left = sorted(n for n in raw if n not in taken and not n.endswith(skipped))
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        raise DllmError(f"{where} has a tensor dllm import does not use: {left[0]}{more}; the model would not be the source, so it is refused")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_tensors(i: int, q, k, v, o, gate, up, down, attn_norm, mlp_norm) -> dict[str, torch.Tensor]:
    """One transformer layer's tensors under our names (Linear weights are (out, in), as in Hugging Face)."""
    p = f"blocks.{i}."
    return {p + "attn.wqkv.weight": torch.cat([q, k, v]), p + "attn.wo.weight": o, p + "mlp.w1.weight": gate,
            p + "mlp.w3.weight": up, p + "mlp.w2.weight": down, p + "attn_norm.weight": attn_norm, p + "mlp_norm.weight": mlp_norm}


def hf_config(folder: Path) -> tuple[dict, str, float, int]:
    """A Hugging Face folder's config.json, checked to be a plain Llama before anything is read: (config,
    architecture, rotary base, end-of-text id)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DllmError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise DllmError(f"{config_path} is not JSON; a Hugging Face folder's config.json is a JSON object") from None
    if not isinstance(hf, dict):
        raise DllmError(f"{config_path} is not a JSON object")
    try:
        HfConfig.model_validate(hf)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, int) or len(first["loc"]) > 1) or "(top level)"
        raise DllmError(f"{config_path}: {where}: {first['msg'].lower()}") from None
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise DllmError(f"{folder} is a {arch} model; dllm import takes {', '.join(SUPPORTED)} (and GGUF files of the llama architecture)")
    for key, ok in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None)), ("rope_scaling", (None,))):
        if hf.get(key) not in ok:
            raise DllmError(f"{folder}: {key} = {hf.get(key)!r} is not supported (a plain Llama has {ok[0]!r})")
    rope = hf.get("rope_parameters") or {}  # transformers 5 writes the rotary settings here; 4 at the top level
    if not isinstance(rope, dict):
        raise DllmError(f"{config_path}: rope_parameters must be an object, got {str(rope)[:30]!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    check_shape({"d_model": hf["hidden_size"], "n_head": hf["num_attention_heads"], "n_kv_head": hf.get("num_key_value_heads") or hf["num_attention_heads"],
                 "n_layer": hf["num_hidden_layers"], "d_ff": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
                 "max_context": hf.get("max_position_embeddings", DEFAULT_CONTEXT), "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
                 "rope_theta": float(theta) if isinstance(theta, (int, float)) and not isinstance(theta, bool) else theta}, str(config_path))
    if rope.get("rope_type", "default") != "default":
        raise DllmError(f"{folder}: rope_type {rope['rope_type']!r} (scaled rotary positions) is not supported; plain Llama rotary only")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise DllmError(f"{folder}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads; not supported")
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if not isinstance(eos, int):
        raise DllmError(f"{folder}/config.json names no eos_token_id; the model's end-of-text must be known")
    return hf, arch, float(theta), eos


def read_hf_folder(folder: Path, say=lambda msg: None) -> Imported:
    """A Hugging Face folder of a Llama-architecture causal LM: config.json, *.safetensors, tokenizer.json."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    hf, arch, rope_theta, eos = hf_config(folder)
    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise DllmError(f"{folder} has no tokenizer.json; dllm import needs the model's own tokenizer")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DllmError(f"{folder} holds no *.safetensors weights")
    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as e:  # tokenizers raises its own Exception on a file that is not a tokenizer
        raise DllmError(f"{tok_path} is not a tokenizers file ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None
    if tokenizer.get_vocab_size() > hf["vocab_size"]:
        raise DllmError(f"{tok_path} has {tokenizer.get_vocab_size():,} tokens but the model's embedding only {hf['vocab_size']:,} rows; "
                        "the tokenizer does not belong to these weights")
    n_params = 0
    for f in files:  # the headers only: the sizes, before any tensor is read
        with _safetensors(safe_open, f) as st:
            n_params += sum(math.prod(st.get_slice(name).get_shape()) for name in st.keys())
    check_memory(n_params)
    say(f"reading {len(files)} safetensors file(s) of a {arch}")
    raw = {}
    for f in files:
        with _safetensors(safe_open, f) as st:
            try:
                raw.update({name: st.get_tensor(name).float() for name in st.keys()})
            except Exception as e:  # a file whose data ends before its header says
                raise DllmError(f"{f} is truncated or corrupt ({str(e).splitlines()[0][:80]})") from None
    n_layer = hf["num_hidden_layers"]
    taken: set[str] = set()

    def get(name: str) -> torch.Tensor:
        taken.add(name)
        return _take(raw, name, folder)

    tensors = {"tok_emb.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    tied = hf.get("tie_word_embeddings", False) or "lm_head.weight" not in raw
    if not tied:
        tensors["head.weight"] = get("lm_head.weight")
    elif "lm_head.weight" in raw and torch.equal(raw["lm_head.weight"], tensors["tok_emb.weight"]):
        taken.add("lm_head.weight")  # a tied head saved as well: the same matrix
    for i in range(n_layer):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        tensors.update(layer_tensors(i, get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight"),
                                     get(a + "o_proj.weight"), get(m + "gate_proj.weight"), get(m + "up_proj.weight"),
                                     get(m + "down_proj.weight"), get(f"model.layers.{i}.input_layernorm.weight"),
                                     get(f"model.layers.{i}.post_attention_layernorm.weight")))
    used_all(raw, taken, folder, skipped=("rotary_emb.inv_freq",))  # the rotary frequencies: computed from rope_theta
    cfg = {"d_model": hf["hidden_size"], "n_head": hf["num_attention_heads"], "n_kv_head": hf.get("num_key_value_heads") or hf["num_attention_heads"],
           "n_layer": n_layer, "d_ff": hf["intermediate_size"], "vocab_size": hf["vocab_size"], "rope_theta": rope_theta,
           "norm_eps": float(hf.get("rms_norm_eps", 1e-5)), "tie_embeddings": bool(tied), "max_context": hf.get("max_position_embeddings", DEFAULT_CONTEXT)}
    provenance = {"source": str(folder), "format": "huggingface", "architecture": arch,
                  "files": {f.name: sha256_of(f) for f in [folder / "config.json", tok_path, *files]},
                  "converted": "q/k/v stacked into wqkv; gate, up, down as w1, w3, w2; <|pad|> and <|mask|> added"}
    bos = hf.get("bos_token_id")
    return Imported(cfg, tensors, tokenizer, eos, bos if isinstance(bos, int) else None, provenance, hf_chat_template(folder))


def hf_chat_template(folder: Path) -> str | None:
    """A Hugging Face folder's chat template: chat_template.jinja, or tokenizer_config.json's `chat_template` (a
    string; a list of named templates gives its "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def _safetensors(safe_open, path: Path):
    """A safetensors file opened, or one line when it is not one (empty, cut in its header, another format)."""
    try:
        return safe_open(str(path), "pt")
    except Exception as e:
        raise DllmError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})") from None


def _take(raw: dict, name: str, source) -> torch.Tensor:
    if name not in raw:
        raise DllmError(f"{source} has no tensor {name}; is it a Llama-architecture checkpoint?")
    return raw[name]
