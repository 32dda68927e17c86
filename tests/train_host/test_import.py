"""`dllm import`: a Hugging Face Llama folder and a GGUF file become `ar` checkpoints that compute what the reference
does (transformers' LlamaForCausalLM on the same ids), and run, export and generate like any other model here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bad_input"))
from refusal import assert_clean_failure, call, run, snapshot  # noqa: E402

TEXT = ["Once upon a time there was a little fox.", "Tom and Lily went to the park to play.", "The sun was warm and the sky was blue."] * 20


def make_tokenizer(folder: Path):
    """A small byte-level BPE with the special tokens a Llama tokenizer has (no padding or mask of ours)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (grouped-query attention, untied head) saved as Hugging Face saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    folder.mkdir()
    tok = make_tokenizer(folder)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory) -> Path:
    from train_host.importer import import_model

    out = tmp_path_factory.mktemp("imp") / "run"
    import_model(hf_folder, out, context=64)
    return out


def test_the_imported_model_computes_what_transformers_computes(hf_folder, imported):
    from train_host.checkpoint import load_model

    model, tok, config = load_model(imported)
    rows = [[1, *tok.encode(TEXT[0])], [1, *tok.encode(TEXT[1]), *tok.encode(TEXT[2])]]
    ids = torch.tensor([r[:12] for r in rows])
    want = reference_logits(hf_folder, ids)
    with torch.no_grad():
        got = model(ids)[..., : want.shape[-1]]  # our vocabulary adds <|pad|> and <|mask|> at the end
    assert (got - want).abs().max().item() < 1e-4
    assert model.cfg.family == "ar" and model.cfg.n_kv_head == 2 and model.cfg.canvas_len == 64 and not model.cfg.tie_embeddings
    assert tok.special_ids == {"pad": want.shape[-1], "eot": 2, "mask": want.shape[-1] + 1, "bos": 1}
    assert config["provenance"]["format"] == "huggingface" and "model.safetensors" in config["provenance"]["files"]


def write_gguf(hf_folder: Path, path: Path, qtype: str = "F32", arch: str = "llama", chat_template: str = "", heads=4, blocks: int = 2,
               extra: dict | None = None) -> None:
    """The tiny model as llama.cpp's converter writes it: Q and K rows permuted for its rotary layout. `heads`, `blocks`
    and `extra` tensors (name -> array) make files that lie about the model (a bad-input test's)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    w = {k: v.float().numpy() for k, v in load_file(str(hf_folder / "model.safetensors")).items()}
    tok = json.loads(Tokenizer.from_file(str(hf_folder / "tokenizer.json")).to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]

    def permute(a, n):
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(blocks)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    if isinstance(heads, int):
        writer.add_head_count(heads)
    else:
        writer.add_string("llama.attention.head_count", str(heads))  # metadata of the wrong type
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_token_types([3 if t in ("<unk>", "<s>", "</s>") else 1 for t, _ in vocab])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template:
        writer.add_chat_template(chat_template)
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name, a):
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim == 2 and qtype != "F32":
            writer.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            writer.add_tensor(name, a)

    add("token_embd.weight", w["model.embed_tokens.weight"])
    add("output.weight", w["lm_head.weight"])
    add("output_norm.weight", w["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_q.weight", permute(w[p + "self_attn.q_proj.weight"], 4))
        add(f"blk.{i}.attn_k.weight", permute(w[p + "self_attn.k_proj.weight"], 2))
        for ours, theirs in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
                             ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            add(f"blk.{i}.{ours}.weight", w[p + theirs + ".weight"])
        add(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
    for name, a in (extra or {}).items():
        add(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("qtype, tolerance", [("F32", 1e-4), ("Q8_0", 0.05)])
def test_a_gguf_file_is_unpermuted_and_dequantized_to_the_same_model(qtype, tolerance, hf_folder, imported, tmp_path):
    from train_host.checkpoint import load_model
    from train_host.importer import import_model

    write_gguf(hf_folder, tmp_path / "tiny.gguf", qtype)
    import_model(tmp_path / "tiny.gguf", tmp_path / "run", context=64)
    ours, tok, config = load_model(tmp_path / "run")
    ref, ref_tok, _ = load_model(imported)
    ids = torch.tensor([[1, *ref_tok.encode(TEXT[0])]])
    assert tok.encode(TEXT[1]) == ref_tok.encode(TEXT[1])  # the tokenizer rebuilt from the file's tokens and merges
    with torch.no_grad():
        diff = (ours(ids) - ref(ids)).abs().max().item()
    assert diff < tolerance and config["provenance"]["quantization"] == sorted({qtype, "F32"})


def test_every_verb_runs_the_imported_model(imported, tmp_path):
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    bundle = export_bundle(imported, tmp_path / "bundle")
    assert bundle.manifest["decode_parity"]["fp32"]["max_abs_logprob_diff"] < 1e-3
    greedy = SamplerConfig(temperature=0.0)
    with open_model(imported) as on_torch, open_model(bundle.path) as on_onnx:
        a = complete(on_torch, "Once upon a time", length=12, sampler=greedy)
        b = complete(on_onnx, "Once upon a time", length=12, sampler=greedy)
    assert np.array_equal(a.tokens, b.tokens) and a.texts[0].startswith("Once upon a time")
    code, out, err = run("run", imported, "-p", "Tom and", "--length", "8", "--temperature", "0", "--no-live")
    assert code == 0 and out.startswith("Tom and"), err


def test_bad_sources_are_refused_with_one_line_and_nothing_written(hf_folder, tmp_path):
    write_gguf(hf_folder, tmp_path / "gpt2.gguf", arch="gpt2")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    good = tmp_path / "good.gguf"
    write_gguf(hf_folder, good)
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for f in hf_folder.iterdir():
        if f.name != "tokenizer.json":
            (no_tok / f.name).write_bytes(f.read_bytes())
    big_tok = tmp_path / "big-tok"  # a tokenizer of another model: more tokens than the embedding has rows
    big_tok.mkdir()
    for f in hf_folder.iterdir():
        (big_tok / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((hf_folder / "config.json").read_text())
    (big_tok / "config.json").write_text(json.dumps({**cfg, "vocab_size": 200}))
    cases = [(tmp_path / "gpt2.gguf", "'gpt2' architecture"), (tmp_path / "junk.gguf", "not a readable GGUF"),
             (tmp_path / "cut.gguf", "not a readable GGUF"), (no_tok, "no tokenizer.json"), (big_tok, "does not belong to these weights"),
             (tmp_path / "nothere.gguf", "not found")]
    for source, match in cases:
        code, _, err = run("import", source, "-o", tmp_path / "out")
        assert_clean_failure(code, err, match)
        assert not (tmp_path / "out").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    before = snapshot(mine)
    code, _, err = run("import", good, "-o", mine, "--overwrite")
    assert_clean_failure(code, err, "not an import jetson-dllm made")
    assert snapshot(mine) == before


def test_an_imported_model_is_a_judge(imported, trained_run):
    """--judge takes an imported model: it re-tokenizes the texts with its own tokenizer, behind its own start token."""
    from train_host.judge import Judge, judge_generations

    judge = Judge(imported)
    real, noise = judge.perplexity(TEXT[:3]), judge.perplexity(["zq xv kk qq zz jj vv"] * 3)
    assert 1 < real < 1e6 and 1 < noise < 1e6 and judge.tokenizer.bos_id == 1
    scored = judge_generations(trained_run, judge, samples=2, steps=4)
    assert scored["gen_ppl"] > 1 and "repetition" in scored


def test_an_imported_model_is_adapted_into_block_diffusion(imported, tmp_path):
    """The path to a diffusion model from a pretrained one, as a user runs it: data tokenized with the imported
    model's tokenizer (its recorded special ids), `dllm train --family bd3 --shift --init` taking the parent's own
    shape (no named size), and the adapted model generating; a shape option beside --init is refused."""
    text = tmp_path / "stories.txt"
    text.write_text("<|endoftext|>".join(TEXT))
    code, _, err = run("data", text, "-o", tmp_path / "data", "--tokenizer", imported, "--val-fraction", "0.1")
    assert code == 0, err
    assert json.loads((tmp_path / "data" / "data.json").read_text())["special_ids"] == json.loads(
        next((imported / "checkpoints").iterdir()).joinpath("config.json").read_text())["special_ids"]
    common = ["--data", tmp_path / "data", "--family", "bd3", "--block-size", "4", "--shift", "--init", imported, "--canvas-len", "32",
              "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--eval-canvases", "4", "--threads", "1", "--warmup", "1"]
    code, _, err = run("train", "-o", tmp_path / "child", *common, timeout=300)
    assert code == 0, err[-2000:]
    from train_host import checkpoint as ck

    parent, child = ck.load_checkpoint(str(imported))[0], ck.load_checkpoint(str(tmp_path / "child"))[0]
    assert (child.family, child.block_size, child.shift, child.canvas_len) == ("bd3", 4, True, 32)
    assert (child.d_model, child.n_kv_head, child.d_ff, child.rope_theta, child.tie_embeddings) == (
        parent.d_model, parent.n_kv_head, parent.d_ff, parent.rope_theta, parent.tie_embeddings)
    code, out, err = run("run", tmp_path / "child", "-p", "Tom and", "--length", "8", "--steps", "4", "--no-live")
    assert code == 0 and out.startswith("Tom and"), err
    code, _, err = run("train", "-o", tmp_path / "other", *common, "--n-layer", "3")
    assert_clean_failure(code, err, "with --init the model's shape is its parent's")
    assert not (tmp_path / "other").exists()


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def test_an_instruct_models_chat_template_comes_in_and_shapes_its_chat_prompt(hf_folder, tmp_path):
    """The GGUF's tokenizer.chat_template (and a Hugging Face folder's tokenizer_config.json one) is kept beside the
    tokenizer through import and export, and the server's chat prompt is that template's rendering; a model
    without one keeps the story template."""
    import json
    import shutil

    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.serve.schemas import ChatMessage, chat_prompt
    from train_host.checkpoint import load_model
    from train_host.export import export_bundle
    from train_host.importer import import_model

    write_gguf(hf_folder, tmp_path / "chat.gguf", chat_template=TEMPLATE)
    import_model(tmp_path / "chat.gguf", tmp_path / "run", context=64)
    _, tok, _ = load_model(tmp_path / "run")
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle")
    assert tok.chat_template == TEMPLATE == load_bundle(bundle.path).tokenizer().chat_template
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="A fox?")]
    assert chat_prompt(messages, tok) == "<s>system: Be brief.</s>user: A fox?</s>assistant:"
    assert tok.encode(chat_prompt(messages, tok))[0] == 1  # <s> read as the special token, not as characters
    hf = tmp_path / "hf"
    shutil.copytree(hf_folder, hf)
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    import_model(hf, tmp_path / "hf-run", context=64)
    assert load_model(tmp_path / "hf-run")[1].chat_template == TEMPLATE
    import_model(hf_folder, tmp_path / "plain", context=64)
    assert chat_prompt(messages, load_model(tmp_path / "plain")[1]) == "Be brief.\nA fox?"  # no template: the story so far


def _variant(hf_folder: Path, where: Path, config: dict | None = None, files: dict | None = None, tensors=None) -> Path:
    """A copy of the tiny folder with config.json keys replaced (None deletes one), files replaced by bytes, or the
    weights rewritten by `tensors(dict) -> dict`."""
    from safetensors.torch import load_file, save_file

    where.mkdir()
    for f in hf_folder.iterdir():
        (where / f.name).write_bytes(f.read_bytes())
    if config is not None:
        cfg = json.loads((hf_folder / "config.json").read_text())
        cfg = {k: v for k, v in {**cfg, **config}.items() if v is not None}
        (where / "config.json").write_text(json.dumps(cfg))
    for name, data in (files or {}).items():
        (where / name).write_bytes(data)
    if tensors is not None:
        save_file(tensors(load_file(str(hf_folder / "model.safetensors"))), str(where / "model.safetensors"))
    return where


def refused(code: int, err: str, match: str) -> None:
    """A clean refusal after the import's progress lines: non-zero, no traceback, the last line the one error."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and "Traceback" not in err and lines and lines[-1].startswith("error: ") and match in lines[-1], (match, err)
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err


def test_every_source_value_is_checked_before_it_is_used_and_every_tensor_used(hf_folder, tmp_path):
    """A source whose config, tokenizer or weights are not what the import needs, or that holds a tensor the model
    would not contain (a layer past the count, a bias): one line naming it, nothing written."""
    weights = (hf_folder / "model.safetensors").read_bytes()
    cases = [
        ({"files": {"config.json": b"{not json"}}, "config.json is not JSON"),
        ({"files": {"config.json": b"[1, 2]"}}, "is not a JSON object"),
        ({"config": {"hidden_size": None}}, "hidden_size: field required"),
        ({"config": {"hidden_size": "64"}}, "hidden_size: input should be a valid integer"),
        ({"config": {"eos_token_id": []}}, "eos_token_id"),
        ({"config": {"rms_norm_eps": "x"}}, "rms_norm_eps"),
        ({"config": {"num_attention_heads": 0}}, "num_attention_heads: input should be greater than 0"),
        ({"config": {"num_attention_heads": 3, "num_key_value_heads": 3}}, "3 attention heads do not divide the width 64"),
        ({"config": {"num_key_value_heads": 3}}, "3 key/value heads do not divide the 4 attention heads"),
        ({"files": {"tokenizer.json": b'{"version": "1.0"}'}}, "is not a tokenizers file"),
        ({"files": {"model.safetensors": b""}}, "is not a readable safetensors file"),
        ({"files": {"model.safetensors": weights[: len(weights) // 2]}}, "model.safetensors"),
        ({"config": {"num_hidden_layers": 1}}, "does not use: model.layers.1."),
        ({"tensors": lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}}, "does not use: model.layers.0.self_attn.q_proj.bias"),
    ]
    for i, (change, match) in enumerate(cases):
        source = _variant(hf_folder, tmp_path / f"v{i}", **change)
        code, _, err = call("import", source, "-o", tmp_path / "out")
        refused(code, err, match)
        assert not (tmp_path / "out").exists(), match
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = call("import", hf_folder, "-o", tmp_path / "notes.txt" / "out")
    assert_clean_failure(code, err, "is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_gguf_that_lies_about_its_model_is_refused_before_its_tensors_are_cut(hf_folder, tmp_path):
    """GGUF head counts of 0, that do not divide the width, or of the wrong type; a block count below the tensors
    present; a tensor the converter does not know: one line each, nothing written."""
    cases = [({"heads": 0}, "n_head must be a positive integer"), ({"heads": 3}, "3 attention heads do not divide the width 64"),
             ({"heads": "4"}, "head_count is '4', not an integer"), ({"blocks": 1}, "does not use: blk.1."),
             ({"extra": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}}, "does not use: blk.0.attn_q.bias")]
    for i, (kwargs, match) in enumerate(cases):
        write_gguf(hf_folder, tmp_path / f"bad{i}.gguf", **kwargs)
        code, _, err = call("import", tmp_path / f"bad{i}.gguf", "-o", tmp_path / "out")
        refused(code, err, match)
        assert not (tmp_path / "out").exists(), match
