"""Conditional block diffusion (issue 26): the staged training on pairs (complementary masks see each condition twice),
the encoder run once with its encoding in every block graph's call, classifier-free guidance as twin rows in the same
calls (a shifted model's block-first token mixed from the commit's logits), the exported graphs generating what torch
does, the server taking the prompt as the condition, and the refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Server, train_small, weights

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families.bd3 import BlockModel, block_calls
from jetson_dllm.runners.calls import drive
from jetson_dllm.sampler import SamplerConfig, SpecialIds
from train_host.conditioning import condition_parameters, with_condition
from train_host.model import Denoiser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bad_input"))
from refusal import assert_clean_failure, run  # noqa: E402

BD3 = dict(objective="bd3", block_size=16)
COND = dict(cond_len=32, cond_layers=1)


@pytest.fixture(scope="module")
def stages(pairs_data, tmp_path_factory):
    """Stage 1: a block-diffusion denoiser; stage 2: a condition trained onto it (complementary masks), frozen."""
    root = tmp_path_factory.mktemp("bd3-stages")
    train_small(pairs_data, root / "s1", steps=10, **BD3)
    train_small(pairs_data, root / "s2", steps=10, init=str(root / "s1"), freeze_denoiser=True, lr=1e-2, complementary=True, **BD3, **COND)
    return root / "s1", root / "s2"


def _model(shift: bool = False, seed: int = 0) -> Denoiser:
    """A random conditional block-diffusion model whose cross-attention writes into the stream (as if trained)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layer=2, n_head=2, vocab_size=64, canvas_len=32, mask_id=2, family="bd3", block_size=8,
                      cond_len=8, cond_layers=1, shift=shift)
    model = Denoiser(cfg).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.cross.wo.weight, std=0.3)
    return model


def _calls(model, guidance: float, shift: bool, condition=(9, 10, 11), runner=None, n: int = 2, fold: bool = True):
    """Greedy generation block by block through a runner (the torch runner on `model` by default), every call seen."""
    from jetson_dllm.runners.torch_runner import TorchRunner

    runner = runner or TorchRunner(model, topk=16)
    seen = []
    original = runner.run

    def spy(graph, feeds, outputs=None):
        seen.append((graph, len(feeds["tokens"]), outputs, "memory" in feeds))
        return original(graph, feeds, outputs)

    runner.run = spy
    sampler = SamplerConfig(steps=4, guidance=guidance, temperature=0).validate()
    model = BlockModel(SpecialIds(2, 1, 0), 8, 32, fold=fold and "commit_step" in runner.graphs, shift_bos=3 if shift else None, cond_len=8, topk=16)
    loop = block_calls([5, 6, 7], 20, model, sampler, n, condition=list(condition))
    return drive(runner, loop), seen


def test_complementary_masks_see_each_condition_twice():
    got = []

    class Spy:
        cfg = "a config"

        def __call__(self, tokens, condition=None, **kw):
            got.append(condition)

    ids, lengths = torch.arange(6).view(2, 3), torch.tensor([3, 1])
    bound = with_condition(Spy(), (ids, lengths))
    bound(torch.zeros(2, 5))
    bound(torch.zeros(4, 5))  # [x; x]: the complementary copies, in the same order
    assert got[0][0] is ids and torch.equal(got[1][0], torch.cat([ids, ids])) and got[1][1].tolist() == [3, 1, 3, 1]
    with pytest.raises(ValueError, match="3 rows for a batch of 2"):
        bound(torch.zeros(3, 5))


def test_the_second_stage_trains_the_condition_only(stages):
    from train_host.checkpoint import load_model

    s1, s2 = (weights(s) for s in stages)
    assert set(s2) - set(s1) == set(condition_parameters(load_model(str(stages[1]))[0]))
    for name in s1:
        assert torch.equal(s1[name], s2[name]), name
    assert any(s2[name].abs().sum() > 0 for name in s2 if name.endswith("cross.wo.weight"))


@pytest.mark.parametrize("shift", [False, True])
def test_the_encoder_runs_once_and_every_call_carries_its_encoding(shift):
    model = _model(shift)
    plain, seen = _calls(model, 0.0, shift)
    assert seen[0][:2] == ("encoder", 1) and all(has for graph, _, _, has in seen[1:])  # once; then in every call
    assert {g for g, *_ in seen[1:]} == {"block_step", "commit_step"}  # commits folded into the next block's first step
    guided, seen = _calls(model, 2.0, shift)
    assert seen[0][:2] == ("encoder", 2)  # the condition and the empty one
    unfolded, seen_apart = _calls(model, 2.0, shift, fold=False)  # commits on their own: the same tokens, a call more per block
    assert (unfolded.tokens == guided.tokens).all() and unfolded.folded == 0
    assert {(g, o) for g, _, o, _ in seen_apart[1:]} == {("block_step", ("logits",)), ("commit", ("logits",) if shift else None)}
    rows = {(g, n, o) for g, n, o, _ in seen[1:]}
    assert rows == {("block_step", 4, ("logits",)), ("commit_step", 4, ("logits",))} and guided.folded == plain.folded > 0  # twin rows
    assert not (plain.tokens == guided.tokens).all()  # guidance changed what was written


def test_the_condition_changes_the_text():
    model = _model()
    a, _ = _calls(model, 0.0, False, condition=(9, 10, 11))
    b, _ = _calls(model, 0.0, False, condition=(40, 41))
    assert not (a.tokens == b.tokens).all()


@pytest.mark.parametrize("shift", [False, True])
def test_the_exported_graphs_generate_what_torch_does_guided_or_not(shift, tmp_path):
    from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs
    from train_host.bd3_export import block_parity, export_block_graphs
    from train_host.canvas_export import export_encoder

    model = _model(shift, seed=3)
    paths = export_block_graphs(model, tmp_path, 16)
    export_encoder(model, tmp_path / "encoder.onnx")
    assert block_parity(model, paths, 16)["max_abs_logprob_diff"] < 1e-4
    for guidance in (0.0, 2.0):
        want, _ = _calls(model, guidance, shift)
        with onnx_runner_from_graphs({**paths, "encoder": tmp_path / "encoder.onnx"}, model.cfg, threads=1) as runner:
            got, _ = _calls(model, guidance, shift, runner=runner)
        assert (want.tokens == got.tokens).all(), guidance


def test_run_export_and_the_bundle(stages, tmp_path):
    s1, s2 = stages
    bundle = tmp_path / "bundle"
    code, _, err = run("export", s2, "-o", bundle, "--fp16")
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precisions"]["fp16"]["encoder"] == "encoder.fp16.onnx" and manifest["encoder_parity"]["fp32"] < 1e-3
    assert "memory" in manifest["graphs"]["block_step"]["inputs"]
    outs = {}
    for path in (s2, bundle):
        code, out, err = run("run", path, "-p", "", "--condition", "Lily saw a cat.", "--guidance", "2", "--steps", "4",
                             "--length", "20", "--temperature", "0", "--json", "--no-live")
        assert code == 0, err
        outs[path] = json.loads(out)["tokens"]
    assert outs[s2] == outs[bundle]
    for args, match in [(("run", s2, "-p", "", "--guidance", "2"), "needs a condition to guide toward"),
                        (("run", s1, "-p", "Once", "--guidance", "2"), "pulls toward a condition, and this one was trained without one"),
                        (("run", bundle, "-p", "", "--backend", "trt"), "TensorRT engines for its graphs are not built yet")]:
        code, _, err = run(*args, "--no-live")
        assert_clean_failure(code, err, match)


@pytest.mark.slow
def test_int8_calibrates_with_each_canvas_own_condition(stages, pairs_data, tmp_path):
    from calibration.blocks import BlockFeeds, block_runner

    bundle = tmp_path / "int8"
    code, _, err = run("export", stages[1], "-o", bundle, "--int8", "--data", pairs_data, "--calib-canvases", "16")
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["precisions"]["int8"]["encoder"] == "encoder.onnx"  # the FP32 encoder, once a request
    assert manifest["block_parity"]["int8"]["top1_agreement"] > 0.9 and manifest["calibration"]["calibration_canvases"] == 16
    with block_runner(bundle / "block_step.fp32.onnx", bundle / "commit.fp32.onnx", _model_cfg(manifest), bundle / "encoder.onnx") as ref:
        canvases = np.random.default_rng(0).integers(3, 500, (16, 64)).astype(np.int32)
        feeds = list(BlockFeeds(canvases, ref, 2, 0, "step"))
    assert all(f["memory"].shape == (1, 33, 64) for f in feeds)
    assert {int((f["memory_bias"] == 0).sum()) for f in feeds} == {1, 17}  # its own condition (16 tokens + the slot) or empty
    code, out, err = run("run", bundle, "--precision", "int8", "-p", "", "--condition", "Lily saw a cat.", "--guidance", "2",
                         "--steps", "4", "--length", "16", "--json", "--no-live")
    assert code == 0 and json.loads(out)["new_tokens"] == 16, err


def _model_cfg(manifest: dict) -> ModelConfig:
    return ModelConfig.from_dict(manifest["model"])


def test_the_server_reads_the_prompt_as_the_condition_with_guidance(stages):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    server = Server(stages[1], "--max-batch", "4")
    try:
        body = {"prompt": "Ben ran to the park.", "max_tokens": 24, "steps": 4, "guidance": 2.0, "n": 2, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 3}, timeout=60)
        assert r.status_code == 400 and "guidance doubles the rows" in r.json()["error"]["message"]
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": ""}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "guidance"
    finally:
        server.stop()


def test_no_condition_for_a_model_without_an_encoder():
    from jetson_dllm.runners.feeds import condition_inputs

    cfg = ModelConfig(d_model=32, n_layer=2, n_head=2, vocab_size=64, canvas_len=32, mask_id=2, family="bd3", block_size=8)
    with pytest.raises(DllmError, match="takes no condition"):
        condition_inputs({"memory": np.zeros((1, 2, 32), np.float32)}, 1, cfg)
