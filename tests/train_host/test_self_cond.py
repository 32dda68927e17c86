"""Self-conditioning: the soft-input mechanism in the network, its training (two passes), post-training from a
checkpoint, the sampler feeding each step the previous step's top-k, and the exported graph with soft inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families.mdlm import canvas_calls
from jetson_dllm.runners.calls import Call
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import SamplerConfig, SpecialIds
from tests.conftest import train_small, weights
from train_host.model import Denoiser
from train_host.self_cond import SelfConditioned, soft_from_logits

CFG = dict(d_model=32, n_head=2, n_layer=1, vocab_size=64, canvas_len=16, mask_id=2)


def _model(k=4, seed=0):
    torch.manual_seed(seed)
    return Denoiser(ModelConfig(soft_k=k, **CFG)).eval()


def test_soft_inputs_start_as_none_and_then_change_the_prediction():
    model = _model()
    tokens = torch.randint(3, 64, (2, 16))
    ids = torch.randint(3, 64, (2, 16, 4))
    probs = torch.softmax(torch.randn(2, 16, 5), -1)[..., :4]
    with torch.no_grad():
        plain = model(tokens)
        assert torch.equal(plain, model(tokens, soft=(ids, probs)))  # the projection starts at zero
        torch.nn.init.normal_(model.soft_proj.weight, std=0.5)
        assert not torch.allclose(plain, model(tokens, soft=(ids, probs)), atol=1e-3)
        assert torch.allclose(plain, model(tokens, soft=(ids, torch.zeros_like(probs))), atol=1e-6)  # probability 0: nothing


def test_soft_k_is_for_the_masked_family_only():
    with pytest.raises(DllmError, match="takes no soft inputs"):
        ModelConfig(soft_k=4, family="ar", **{k: v for k, v in CFG.items()})
    old = ModelConfig(**CFG).to_dict()
    del old["soft_k"]  # a config written before soft inputs
    assert ModelConfig.from_dict(old).soft_k == 0
    assert ModelConfig(soft_k=4, **CFG).num_params() == ModelConfig(**CFG).num_params() + 32 * 32


class Recording:
    """A model stand-in that records the soft inputs each call got."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, z, positions, soft=None):
        self.calls.append(soft)
        return self.model(z, positions, soft=soft)


def test_the_second_pass_sees_the_first_pass_top_k_at_masked_positions_only():
    model = _model()
    z = torch.randint(3, 64, (2, 16))
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::3] = True
    z[masked] = 2
    rec = Recording(model)
    SelfConditioned(rec, 4, rate=1.0)(z, masked)
    assert len(rec.calls) == 2 and rec.calls[0] is None
    ids, probs = rec.calls[1]
    with torch.no_grad():
        first = torch.softmax(model(z, masked), -1)
    top, top_ids = torch.topk(first, 4, -1)
    assert torch.equal(ids[masked], top_ids) and torch.allclose(probs[masked], top)  # true softmax values, not renormalised
    assert probs[masked].sum(-1).max() < 1.0
    assert float(probs[~masked].abs().sum()) == 0.0
    rec.calls.clear()
    SelfConditioned(rec, 4, rate=0.0)(z, masked)  # no first pass: the second gets zeros
    assert len(rec.calls) == 1 and float(rec.calls[0][1].abs().sum()) == 0.0


def test_the_rate_decides_how_often_a_first_pass_runs():
    rec = Recording(_model())
    z, masked = torch.full((1, 16), 2), torch.ones(1, 16, dtype=torch.bool)
    wrapped = SelfConditioned(rec, 4, rate=0.5, generator=torch.Generator().manual_seed(0))
    for _ in range(40):
        wrapped(z, masked)
    firsts = sum(c is None for c in rec.calls)
    assert 10 <= firsts <= 30 and len(rec.calls) == 40 + firsts


def test_soft_from_logits_places_each_selected_position():
    positions = torch.tensor([[True, False, True]])
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    ids, probs = soft_from_logits(logits, positions, 2)
    assert ids[0, 0].tolist() == [1, 2] and ids[0, 2, 0] == 0 and float(probs[0, 1].sum()) == 0.0


# --- the sampler's feeds ------------------------------------------------------------------------------------------


def test_each_step_is_fed_the_previous_steps_top_k_where_still_masked():
    T, k = 8, 3
    tokens = np.full((1, T), 2, dtype=np.int32)
    tokens[0, 0] = 10
    fixed = tokens != 2
    loop = canvas_calls(tokens, fixed, SpecialIds(mask=2, eot=1, pad=0), SamplerConfig(steps=4, temperature=0.0), soft_k=k)
    rng = np.random.default_rng(0)
    call, outs, feeds = next(loop), [], []
    try:
        while True:
            assert isinstance(call, Call) and call.graph == "canvas"
            feeds.append({n: np.array(v) for n, v in call.feeds.items()})
            logits = rng.normal(size=(1, T, 6))
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            order = np.argsort(-logp, -1)
            out = {"topk_logprobs": np.take_along_axis(logp, order, -1).astype(np.float32), "topk_ids": (order + 3).astype(np.int32)}
            outs.append(out)
            call = loop.send(out)
    except StopIteration:
        pass
    assert len(feeds) == 4
    assert float(feeds[0]["soft_probs"].sum()) == 0.0  # the first call has no previous prediction
    for out, now in zip(outs, feeds[1:]):
        masked = now["tokens"] == 2
        assert masked.any() and (~masked).any()
        assert np.array_equal(now["soft_ids"][masked], out["topk_ids"][..., :k][masked])
        assert np.allclose(now["soft_probs"][masked], np.exp(out["topk_logprobs"][..., :k])[masked])
        assert float(now["soft_probs"][~masked].sum()) == 0.0


# --- training, post-training, export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sc_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sc") / "run"
    train_small(data_dir, out, steps=6, eval_every=6, self_cond=4)
    return out


def test_a_self_conditioned_run_trains_its_projection(sc_run):
    w = weights(sc_run)
    assert "soft_proj.weight" in w and float(w["soft_proj.weight"].abs().sum()) > 0
    cfg = json.loads((sc_run / "train_config.json").read_text())
    assert cfg["model"]["soft_k"] == 4 and cfg["train"]["self_cond_rate"] == 0.5


def test_post_training_starts_from_the_parents_weights_with_a_zero_projection(trained_run, data_dir, tmp_path):
    out = tmp_path / "post"
    train_small(data_dir, out, steps=1, eval_every=1, init=str(trained_run), self_cond=4, self_cond_rate=1.0, lr=1e-12, warmup=0)
    parent, child = weights(trained_run), weights(out)
    assert set(child) - set(parent) == {"soft_proj.weight"}
    assert float(child["soft_proj.weight"].abs().max()) < 1e-6
    for name in parent:
        torch.testing.assert_close(child[name], parent[name], atol=1e-6, rtol=0)


def test_a_mismatched_parent_is_refused(sc_run, data_dir, tmp_path):
    with pytest.raises(DllmError, match="--self-cond 4"):
        train_small(data_dir, tmp_path / "x", steps=1, init=str(sc_run))


@pytest.fixture(scope="module")
def sc_bundle(sc_run, data_dir, tmp_path_factory):
    from calibration.quantize import Int8Options
    from train_host.export import export_bundle

    out = tmp_path_factory.mktemp("sc-bundle") / "bundle"
    export_bundle(sc_run, out, precisions=("fp32", "int8"), data_dir=str(data_dir), parity_canvases=8,
                  int8=Int8Options(n_canvases=16, eval_canvases=16, budget=100.0))
    return out


def test_the_exported_graph_takes_soft_inputs_and_matches_torch(sc_run, sc_bundle):
    import onnx

    graph = onnx.load(str(sc_bundle / "model.fp32.onnx")).graph
    assert [i.name for i in graph.input] == ["tokens", "soft_ids", "soft_probs"]
    manifest = json.loads((sc_bundle / "manifest.json").read_text())
    assert manifest["parity"]["fp32"]["max_abs_logit_diff"] < 1e-3
    torch_runner, onnx_runner = open_runner("torch", sc_run), open_runner("onnx", sc_bundle)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 512, (2, 32)).astype(np.int32)
    tokens[:, 10:] = torch_runner.cfg.mask_id
    feeds = {"tokens": tokens, "soft_ids": rng.integers(3, 512, (2, 32, 4)).astype(np.int32),
             "soft_probs": np.full((2, 32, 4), 0.2, np.float32)}
    a = torch_runner.run("canvas", feeds, outputs=("logits",))["logits"]
    b = onnx_runner.run("canvas", feeds, outputs=("logits",))["logits"]
    plain = onnx_runner.run("canvas", {"tokens": tokens}, outputs=("logits",))["logits"]
    assert np.abs(a - b).max() < 1e-3 and np.abs(a - plain).max() > 1e-3
    q = open_runner("onnx", sc_bundle, precision="int8")
    assert q.run("canvas", feeds)["topk_ids"].shape == (2, 32, q.topk)


@pytest.mark.parametrize("feeds, message", [
    (lambda t: {"soft_ids": np.zeros((*t.shape, 9), np.int32), "soft_probs": np.zeros((*t.shape, 9), np.float32)}, "at most 4"),
    (lambda t: {"soft_ids": np.zeros((*t.shape, 4), np.int32), "soft_probs": np.full((*t.shape, 4), 0.5, np.float32)}, "summing to at most 1"),
    (lambda t: {"soft_ids": np.zeros((*t.shape, 4), np.int32)}, "as a pair"),
    (lambda t: {"soft_ids": np.full((*t.shape, 4), 99999, np.int32), "soft_probs": np.zeros((*t.shape, 4), np.float32)}, "token ids"),
])
def test_bad_soft_inputs_are_refused_by_every_runner(sc_run, sc_bundle, feeds, message):
    tokens = np.full((1, 32), 2, np.int32)
    for runner in (open_runner("torch", sc_run), open_runner("onnx", sc_bundle)):
        with pytest.raises(DllmError, match=message):
            runner.run("canvas", {"tokens": tokens, **feeds(tokens)})


def test_soft_inputs_to_a_model_without_them_are_refused(bundle_dir):
    tokens = np.full((1, 32), 2, np.int32)
    with pytest.raises(DllmError, match="no soft inputs"):
        open_runner("onnx", bundle_dir).run("canvas", {"tokens": tokens, "soft_ids": np.zeros((1, 32, 4), np.int32),
                                                       "soft_probs": np.zeros((1, 32, 4), np.float32)})
    with pytest.raises(DllmError, match="takes none"):
        open_runner("onnx", bundle_dir).run("canvas", {"tokens": tokens, "t": np.array([0.5], np.float32)})


def test_cli_runs_a_self_conditioned_bundle_and_refuses_a_small_top_k(sc_run, sc_bundle, tmp_path):
    run = subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(sc_bundle), "--prompt", "Once upon a time", "--length", "16",
                          "--steps", "8", "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["evaluations"] <= 8
    bad = subprocess.run([sys.executable, "-m", "jetson_dllm", "export", str(sc_run), "-o", str(tmp_path / "b"), "--topk", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "--topk 4" in bad.stderr
    assert not (tmp_path / "b").exists()


# --- block diffusion ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bd3_sc(data_dir, tmp_path_factory):
    from calibration.quantize import Int8Options
    from train_host.export import export_bundle

    run = tmp_path_factory.mktemp("bd3-sc") / "run"
    train_small(data_dir, run, steps=4, eval_every=4, objective="bd3", block_size=16, t_min=0.3, t_max=0.8, self_cond=4)
    bundle = run.parent / "bundle"
    export_bundle(run, bundle, precisions=("fp32", "int8"), data_dir=str(data_dir), int8=Int8Options(n_canvases=16, eval_canvases=16, budget=100.0))
    return run, bundle


def test_block_diffusion_self_conditions_its_block_step(bd3_sc):
    import onnx

    run, bundle = bd3_sc
    inputs = [i.name for i in onnx.load(str(bundle / "block_step.fp32.onnx")).graph.input]
    assert inputs[-2:] == ["soft_ids", "soft_probs"]
    assert "soft_ids" not in [i.name for i in onnx.load(str(bundle / "commit_step.fp32.onnx")).graph.input]
    parity = json.loads((bundle / "manifest.json").read_text())["block_parity"]["fp32"]["by_graph"]["block_step"]
    assert parity["max_abs_logprob_diff"] < 1e-3  # the parity calls carry soft inputs on every block step


def test_block_diffusion_feeds_the_previous_step_within_a_block(bd3_sc):
    """torch and onnxruntime write the same greedy tokens, and every block step after a block's first gets the
    previous step's top-k at its still-masked positions."""
    from jetson_dllm.families.bd3 import complete

    run, bundle = bd3_sc
    texts = []
    for kind in ("torch", "onnx"):
        runner = open_runner(kind, run if kind == "torch" else bundle)
        calls = []
        inner = runner.run

        def record(graph, feeds, outputs=None, inner=inner, calls=calls):
            calls.append((graph, {n: np.array(v) for n, v in feeds.items()}))
            return inner(graph, feeds, outputs)

        runner.run = record
        g = complete(runner, "Once upon a time", length=30, sampler=SamplerConfig(steps=4, temperature=0.0))
        texts.append(g.tokens.tolist())
        steps = [f for graph, f in calls if graph == "block_step"]
        assert steps and all(f["soft_ids"].shape[-1] == 4 for f in steps)
        fed = [f for f in steps if f["soft_probs"].sum() > 0]
        assert fed and all(float(f["soft_probs"][f["tokens"] != 2].sum()) == 0.0 for f in fed)
        assert all("soft_ids" not in f for graph, f in calls if graph != "block_step")
    assert texts[0] == texts[1]


def test_a_server_batches_self_conditioned_requests(sc_bundle):
    import httpx

    from tests.conftest import Server, concurrently

    s = Server(sc_bundle, "--max-batch", "4")
    try:
        def ask(i):
            return httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": f"Once upon a time {i}", "max_tokens": 12,
                                                               "steps": 6, "seed": i}, timeout=120)

        replies = concurrently(ask, 3)
        assert all(r is not None and r.status_code == 200 and r.json()["choices"][0]["text"] for r in replies)
    finally:
        assert s.stop() == 0
