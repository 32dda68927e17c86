"""Conditional MDLM (issue 26): the encoder and cross-attention, the staged training (a denoiser, then a frozen
denoiser with a condition trained onto it), the condition through the runner's encoder graph, `dllm run --condition`
with guidance, the server taking the prompt as the condition, and the refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import Server, train_small, weights

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from train_host.conditioning import condition_parameters
from train_host.model import Denoiser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bad_input"))
from refusal import assert_clean_failure, call, run  # noqa: E402

COND = dict(cond_len=32, cond_layers=1)


@pytest.fixture(scope="module")
def stages(pairs_data, tmp_path_factory):
    """Stage 1: an unconditional denoiser; stage 2: a condition trained onto it, the denoiser frozen."""
    root = tmp_path_factory.mktemp("stages")
    train_small(pairs_data, root / "s1", steps=10)
    train_small(pairs_data, root / "s2", steps=10, init=str(root / "s1"), freeze_denoiser=True, lr=1e-2, **COND)
    return root / "s1", root / "s2"


def _cfg(**more) -> ModelConfig:
    return ModelConfig(d_model=32, n_layer=2, n_head=2, vocab_size=64, canvas_len=48, mask_id=2, **more)


def test_a_condition_added_to_a_denoiser_starts_as_that_denoiser():
    torch.manual_seed(0)
    plain, conditional = Denoiser(_cfg()), Denoiser(_cfg(**COND))
    state = plain.state_dict()
    missing = conditional.load_state_dict(state, strict=False).missing_keys
    assert set(missing) == set(condition_parameters(conditional)) and missing
    tokens = torch.randint(3, 64, (2, 20))
    condition = (torch.randint(3, 64, (2, 32)), torch.tensor([5, 32]))
    torch.testing.assert_close(conditional(tokens, condition=condition), plain(tokens))


@pytest.mark.parametrize("more", [COND, dict(cond_len=8, cond_layers=2, n_kv_head=1)])
def test_the_configs_parameter_count_is_the_networks(more):
    cfg = _cfg(**more)
    assert cfg.num_params() == sum(p.numel() for p in Denoiser(cfg).parameters()) > _cfg().num_params()
    with pytest.raises(DllmError, match="both its length and its encoder's layers"):
        _cfg(cond_len=8)
    with pytest.raises(DllmError, match="shorter than the canvas"):
        _cfg(cond_len=48, cond_layers=1)
    with pytest.raises(DllmError, match="takes no condition"):
        ModelConfig(d_model=32, n_layer=2, n_head=2, vocab_size=64, canvas_len=48, family="sdd", soft_k=4, **COND)


def test_what_lies_past_a_conditions_length_is_never_read():
    torch.manual_seed(1)
    model = Denoiser(_cfg(**COND)).eval()
    for block in model.blocks:  # as if trained: the cross-attention writes into the stream
        torch.nn.init.normal_(block.cross.wo.weight, std=0.2)
    tokens = torch.randint(3, 64, (1, 20))
    ids = torch.randint(3, 64, (1, 32))
    other = ids.clone()
    other[:, 6:] = torch.randint(3, 64, (1, 26))
    length = torch.tensor([6])
    same = [model(tokens, condition=(x, length)) for x in (ids, other)]
    torch.testing.assert_close(same[0], same[1])
    empty = model(tokens, condition=(ids, torch.tensor([0])))
    assert not torch.allclose(same[0], empty)  # the condition is read
    torch.testing.assert_close(model(tokens), empty)  # none given (eval --text): the empty condition
    memory, bias = model.encode(ids, torch.tensor([0]))
    assert bias[0, 0] == 0 and (bias[0, 1:] < -1e3).all()  # the empty condition: only the empty slot is visible
    assert torch.isfinite(memory).all()


def test_the_second_stage_trains_the_condition_only(stages):
    s1, s2 = (weights(s) for s in stages)
    learned = set(condition_parameters(Denoiser(_cfg(**COND))))
    assert set(s2) - set(s1) == learned
    for name in s1:  # the denoiser as stage 1 left it
        assert torch.equal(s1[name], s2[name]), name
    assert any(s2[name].abs().sum() > 0 for name in learned if name.endswith("cross.wo.weight"))  # started at zero, learned


def test_the_condition_goes_through_the_encoder_graph_once(stages):
    from jetson_dllm.families.mdlm import generate
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    with open_runner("torch", stages[1], threads=1) as runner:
        graphs = []
        original = runner.run

        def spy(graph, feeds, outputs=None):
            graphs.append((graph, len(feeds["tokens"])))
            return original(graph, feeds, outputs)

        runner.run = spy
        g = generate(runner, runner.tokenizer, "", 16, 2, SamplerConfig(steps=4, guidance=1.5), condition="Tom had a red ball.")
        assert graphs[0] == ("encoder", 2)  # the condition and the empty one, once
        assert [n for name, n in graphs[1:]] == [4] * 4 and all(name == "canvas" for name, _ in graphs[1:])
        assert len(g.texts) == 2
        with pytest.raises(DllmError, match="encoder reads at most 32"):
            generate(runner, runner.tokenizer, "", 16, 1, SamplerConfig(steps=4), condition="Tom had a red ball " * 10)


def test_run_with_a_condition_and_the_refusals(stages, pairs_data, tmp_path):
    s1, s2 = stages
    code, out, err = run("run", s2, "-p", "", "--condition", "Lily saw a cat.", "--guidance", "2", "--steps", "4", "--length", "16", "--no-live")
    assert code == 0 and out.strip(), err
    for args, match in [((s1, "-p", "Once", "--condition", "Lily saw a cat."), "trained without a condition"),
                        ((s2, "-p", "", "--guidance", "2"), "needs a condition to guide toward"),
                        ((s2, "-p", "", "--condition", "Lily saw a cat and a dog and a bird and a cow and a pig " * 3), "encoder reads at most 32"),
                        ((s2, "-p", "", "--condition", "Lily saw a [MASK]."), "a [MASK] or ____ gap means nothing there"),
                        ((s2, "-p", "", "--condition", "Lily saw ____ cat."), "a [MASK] or ____ gap means nothing there")]:
        code, _, err = run("run", *args, "--steps", "2", "--no-live")
        assert_clean_failure(code, err, match)
    for args, match in [(("--data", pairs_data, "--cond-drop", "0.2"), "--cond-drop applies to a conditional model"),
                        (("--data", pairs_data, "--cond-len", "32", "--freeze-denoiser"), "--freeze-denoiser trains a condition onto"),
                        (("--data", pairs_data, "--cond-len", "32", "--cond-drop", "nan"), "--cond-drop must be a number"),
                        (("--data", _no_pairs(tmp_path), "--cond-len", "32"), "holds no (first sentence -> rest) pairs"),
                        (("--data", pairs_data, "--family", "sdd", "--cond-len", "32"), "--cond-len is for --objective mdlm / bd3")]:
        code, _, err = call("train", *args, "--out", tmp_path / "never", "--steps", "2", "--canvas-len", "64")  # in-process: quicker
        assert_clean_failure(code, err, match)
        assert not (tmp_path / "never").exists()


def test_the_bundle_carries_the_encoder_and_onnxruntime_generates_what_torch_does(stages, tmp_path):
    import json

    from jetson_dllm.families.mdlm import generate
    from jetson_dllm.runners.loaders import open_runner, trt_runner_from_bundle
    from jetson_dllm.sampler import SamplerConfig

    bundle = tmp_path / "bundle"
    code, out, err = run("export", stages[1], "-o", bundle, "--parity-canvases", "4")
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precisions"]["fp32"]["encoder"] == "encoder.onnx" and manifest["encoder_parity"]["fp32"] < 1e-3
    assert set(manifest["graphs"]) == {"canvas", "encoder"} and "memory" in manifest["graphs"]["canvas"]["inputs"]
    sampler = SamplerConfig(steps=6, temperature=0, guidance=1.5)
    texts = {}
    for backend, path in (("torch", stages[1]), ("onnx", bundle)):
        with open_runner(backend, path, threads=1) as runner:
            texts[backend] = generate(runner, runner.tokenizer, "", 24, 2, sampler, condition="Mia had a blue kite.").tokens
    assert (texts["torch"] == texts["onnx"]).all()
    with pytest.raises(DllmError, match="conditional model .* not built yet"):
        trt_runner_from_bundle(str(bundle))


def _no_pairs(tmp_path):
    from train_host.data import prepare_data
    from train_host.sources import Source

    out = tmp_path / "plain"
    prepare_data([Source("builtin", builtin_stories=200)], out, vocab_size=300, val_fraction=0.05)
    return out


def test_the_server_reads_the_prompt_as_the_condition(stages):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    server = Server(stages[1], "--max-batch", "4")
    try:
        body = {"prompt": "Ben ran to the park.", "max_tokens": 16, "steps": 4, "guidance": 2.0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": "Ben ran " * 30}, timeout=60)
        assert r.status_code == 400 and "encoder reads at most" in r.json()["error"]["message"]
    finally:
        server.stop()
