"""Continuous embedding diffusion: the noise and its two copies (torch, numpy), the network's inputs, DDIM / DDPM
steps, training and its evaluation (no NLL), the exported graph (x and t in, x0 out), every verb, and refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import continuous as runtime
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import SamplerConfig, SpecialIds
from tests.conftest import all_precisions_bundle, no_nll_evaluation, train_small
from train_host.continuous_model import ContinuousDenoiser
from train_host.families import continuous as host

CFG = dict(d_model=32, n_head=2, n_layer=2, vocab_size=64, canvas_len=16, mask_id=2, family="continuous", latent_dim=8,
           tie_embeddings=False)


def test_the_schedule_is_the_same_in_training_and_sampling():
    for t in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert float(host.abar(torch.tensor(t))) == pytest.approx(runtime.abar(t), abs=1e-6)
    assert runtime.abar(0.0) == 1.0 and runtime.abar(1.0) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_a_shifted_schedule_divides_the_signal_to_noise_ratio_by_its_square(shift):
    for t in (0.1, 0.37, 0.5, 0.9):
        plain, shifted = runtime.abar(t), runtime.abar(t, shift)
        assert math.log(shifted / (1 - shifted)) == pytest.approx(math.log(plain / (1 - plain)) - 2 * math.log(shift), abs=1e-9)
        assert float(host.abar(torch.tensor(t, dtype=torch.float64), shift)) == pytest.approx(shifted, abs=1e-9)
    assert runtime.abar(0.0, shift) == 1.0 and runtime.abar(1.0, shift) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)  # DDIM steps on the model's own schedule: the same noise, one level down
    x0, eps = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    a, b = float(runtime.abar(0.7, shift)), float(runtime.abar(0.4, shift))
    x = (math.sqrt(a) * x0 + math.sqrt(1 - a) * eps).astype(np.float32)
    assert np.allclose(runtime.ddim_step(x, x0, 0.7, 0.4, 0.0, rng, shift), math.sqrt(b) * x0 + math.sqrt(1 - b) * eps, atol=1e-5)


def test_the_shift_is_continuous_diffusions_and_older_configs_read_as_unshifted():
    assert ModelConfig(**CFG, noise_shift=4.0).noise_shift == 4.0
    with pytest.raises(DllmError, match="noise_shift is continuous diffusion's"):
        ModelConfig(d_model=32, n_head=2, n_layer=2, vocab_size=64, canvas_len=16, noise_shift=2.0)
    with pytest.raises(DllmError, match="noise_shift .* outside"):
        ModelConfig(**CFG, noise_shift=float("nan"))
    old = {k: v for k, v in dataclasses.asdict(ModelConfig(**CFG)).items() if k != "noise_shift"}
    assert ModelConfig.from_dict(old).noise_shift == 1.0


def test_the_config_needs_a_latent_and_an_untied_head():
    with pytest.raises(DllmError, match="needs its latent width"):
        ModelConfig(**{**CFG, "latent_dim": 0})
    with pytest.raises(DllmError, match="tie_embeddings false"):
        ModelConfig(**{**CFG, "tie_embeddings": True})
    with pytest.raises(DllmError, match="takes no latent width"):
        ModelConfig(**{**CFG, "family": "mdlm"})
    cfg = ModelConfig(**CFG)
    assert cfg.num_params() == sum(p.numel() for p in ContinuousDenoiser(cfg).parameters())


def test_latents_are_normalised_and_the_prompt_is_clean():
    torch.manual_seed(0)
    model = ContinuousDenoiser(ModelConfig(**CFG)).eval()
    assert torch.allclose(model.latents().norm(dim=-1), torch.full((64,), math.sqrt(8)), atol=1e-4)
    tokens = torch.tensor([[5, 6, 7] + [2] * 13])
    x = torch.randn(1, 16, 8)
    t = torch.tensor([0.5])
    with torch.no_grad():
        base = model(tokens, x=x, t=t)
        moved = x.clone()
        moved[:, :3] += 10.0  # under the prompt: its clean latents are used, not x
        assert torch.allclose(model(tokens, x=moved, t=t), base, atol=1e-5)
        moved[:, 5] += 1.0  # where text is generated, x is the input
        assert not torch.allclose(model(tokens, x=moved, t=t), base)
        assert not torch.allclose(model(tokens, x=x, t=torch.tensor([0.9])), base)  # the level is an input
        probs = torch.softmax(base, -1)
        assert torch.allclose(model.expected_latent(base), probs @ model.latents(), atol=1e-5)


def test_ddim_recovers_a_consistent_trajectory_and_ddpm_adds_noise():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    a, b = runtime.abar(0.7), runtime.abar(0.4)
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    stepped = runtime.ddim_step(x.astype(np.float32), x0, 0.7, 0.4, 0.0, rng)
    assert np.allclose(stepped, math.sqrt(b) * x0 + math.sqrt(1 - b) * eps, atol=1e-5)  # the same noise, one level down
    assert np.allclose(runtime.ddim_step(x.astype(np.float32), x0, 0.7, 0.0, 1.0, rng), x0, atol=1e-5)  # t = 0: x0 itself
    one = runtime.ddim_step(x.astype(np.float32), x0, 0.7, 0.4, 1.0, np.random.default_rng(1))
    two = runtime.ddim_step(x.astype(np.float32), x0, 0.7, 0.4, 1.0, np.random.default_rng(2))
    assert not np.allclose(one, two) and not np.allclose(one, stepped)


def test_the_loop_steps_with_the_expected_or_the_clamped_latent():
    """A fake graph: the loop's x follows DDIM from the graph's x0 (or x0_top1 with clamp); the prompt stays."""
    B, T, L = 1, 6, 4
    tokens = np.array([[10, 11, 2, 2, 2, 2]], np.int32)
    fixed = tokens != 2
    for clamp in (False, True):
        sampler = SamplerConfig(steps=3, temperature=0.0, clamp=clamp)
        loop = runtime.continuous_calls(tokens, fixed, SpecialIds(mask=2, eot=1, pad=0), sampler, L)
        call, seen = next(loop), []
        try:
            while True:
                seen.append(call.feeds)
                assert (call.feeds["tokens"][0, :2] == [10, 11]).all() and (call.feeds["tokens"][0, 2:] == 2).all()
                ids = np.tile(np.arange(20, 28, dtype=np.int32), (B, T, 1))
                lp = np.log(np.full((B, T, 8), 1 / 8, np.float32))
                call = loop.send({"topk_logprobs": lp, "topk_ids": ids, "x0": np.full((B, T, L), 0.5, np.float32),
                                  "x0_top1": np.full((B, T, L), -1.0, np.float32)})
        except StopIteration as stop:
            result = stop.value
        assert [float(f["t"][0]) for f in seen] == pytest.approx([1.0, 2 / 3, 1 / 3])
        target = -1.0 if clamp else 0.5
        expected = runtime.ddim_step(seen[0]["x"], np.full((B, T, L), target, np.float32), 1.0, 2 / 3, 0.0, None)
        assert np.allclose(seen[1]["x"], expected, atol=1e-6)
        assert (result.tokens[0, :2] == [10, 11]).all() and (result.tokens[0, 2:] == 20).all()


@pytest.fixture(scope="module")
def continuous_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("continuous") / "run"
    train_small(data_dir, out, steps=6, eval_every=6, objective="continuous", latent_dim=16, noise_shift=2.0)  # a shifted schedule
    return out


def test_training_reports_no_nll(continuous_run, data_dir):
    last, said = no_nll_evaluation(continuous_run, data_dir)
    assert json.loads((continuous_run / "train_config.json").read_text())["model"]["noise_shift"] == 2.0  # kept with the weights
    assert {"val_acc", "val_acc_t1"} <= set(last) and "val_acc_hidden" not in last
    assert "t = 1" in said


@pytest.fixture(scope="module")
def continuous_bundle(continuous_run, data_dir, tmp_path_factory):
    return all_precisions_bundle(continuous_run, data_dir, tmp_path_factory.mktemp("continuous-bundle"))


def test_the_bundle_takes_latents_and_matches_torch(continuous_run, continuous_bundle):
    import onnx

    graph = onnx.load(str(continuous_bundle / "model.fp32.onnx")).graph
    assert [i.name for i in graph.input] == ["tokens", "x", "t"]
    assert {"x0", "x0_top1", "topk_ids"} <= {o.name for o in graph.output}
    manifest = json.loads((continuous_bundle / "manifest.json").read_text())
    assert manifest["parity"]["fp32"]["max_abs_logit_diff"] < 1e-3 and manifest["model"]["family"] == "continuous"
    outs = []
    for kind, path in (("torch", continuous_run), ("onnx", continuous_bundle)):
        run = subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(path), "--backend", kind, "--prompt", "Once upon a time",
                              "--length", "20", "--steps", "6", "--json", "--temperature", "0"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        outs.append(json.loads(run.stdout))
        assert outs[-1]["evaluations"] == 6
    assert outs[0]["tokens"] == outs[1]["tokens"]
    feeds = {"tokens": np.full((2, 32), 2, np.int32), "x": np.random.default_rng(0).standard_normal((2, 32, 16)).astype(np.float32),
             "t": np.array([0.3, 1.0], np.float32)}
    ref, q = open_runner("torch", continuous_run), open_runner("onnx", continuous_bundle, precision="int8")
    want, got = ref.run("canvas", feeds), q.run("canvas", feeds)
    assert got["x0"].shape == (2, 32, 16) and np.abs(got["x0"] - want["x0"]).max() < 0.5
    assert np.allclose(np.linalg.norm(want["x0_top1"], axis=-1), 4.0, atol=1e-4)  # a real token's latent


@pytest.mark.parametrize("feeds, message", [
    ({}, "takes x, the noised latents"),
    ({"x": np.full((1, 32, 16), np.nan, np.float32)}, "takes x, the noised latents"),
    ({"x": np.zeros((1, 32, 8), np.float32)}, "takes x, the noised latents"),
])
def test_the_latents_are_checked(continuous_bundle, feeds, message):
    with pytest.raises(DllmError, match=message):
        open_runner("onnx", continuous_bundle).run("canvas", {"tokens": np.full((1, 32), 2, np.int32), "t": np.ones(1, np.float32), **feeds})


def test_latents_to_another_family_are_refused(trained_run):
    with pytest.raises(DllmError, match="x is an input of the continuous embedding diffusion"):
        open_runner("torch", trained_run).run("canvas", {"tokens": np.full((1, 16), 2, np.int32), "x": np.zeros((1, 16, 4), np.float32)})


@pytest.mark.parametrize("args, message", [
    (["run", "{bundle}", "--prompt", "Once [MASK] a time"], "not trained to fill gaps"),
    (["run", "{bundle}", "--prompt", "Once", "--strategy", "margin"], "--strategy does not apply"),
    (["run", "{bundle}", "--prompt", "Once", "--eta", "1.5"], "--eta"),
    (["run", "{bundle}", "--prompt", "Once", "--eta", "nan"], "--eta"),
    (["run", "{mdlm}", "--prompt", "Once", "--eta", "1"], "--eta does not apply"),
    (["run", "{mdlm}", "--prompt", "Once", "--clamp"], "--clamp does not apply"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--family", "mdlm", "--latent-dim", "16"], "--latent-dim is for --objective continuous"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--family", "mdlm", "--noise-shift", "2"], "--noise-shift is for --objective continuous"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--family", "continuous", "--noise-shift", "0"], "--noise-shift"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--family", "continuous", "--init", "{mdlm}", "--steps", "2"], "does not share"),
])
def test_refusals(continuous_bundle, trained_run, data_dir, tmp_path, args, message):
    argv = [a.format(bundle=continuous_bundle, mdlm=trained_run, tmp=tmp_path, data=data_dir) for a in args]
    run = subprocess.run([sys.executable, "-m", "jetson_dllm", *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "r").exists()


def test_ddpm_and_clamping_run_and_differ(continuous_bundle):
    texts = {}
    for name, extra in (("ddim", []), ("ddpm", ["--eta", "1"]), ("clamp", ["--clamp"])):
        run = subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(continuous_bundle), "--prompt", "Once", "--length", "24",
                              "--steps", "5", "--temperature", "0", "--json", *extra], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        texts[name] = json.loads(run.stdout)["tokens"]
    assert texts["ddim"] != texts["ddpm"] or texts["ddim"] != texts["clamp"]


def test_bench_profile_and_the_server(continuous_bundle):
    import httpx

    from tests.conftest import Server

    bench = subprocess.run([sys.executable, "-m", "jetson_dllm", "bench", str(continuous_bundle), "--steps", "2,4", "--canvas", "32",
                            "--repeats", "1", "--out", str(continuous_bundle.parent / "bench")], capture_output=True, text=True, timeout=180)
    assert bench.returncode == 0, bench.stderr
    rows = json.loads((continuous_bundle.parent / "bench" / "bench.json").read_text())["results"]
    assert sorted(r["steps"] for r in rows) == [2, 4] and all(r["evaluations"] == r["steps"] for r in rows)  # a call per step
    profile = subprocess.run([sys.executable, "-m", "jetson_dllm", "profile", str(continuous_bundle), "--canvas", "32", "--measure", "--json"],
                             capture_output=True, text=True, timeout=180)  # one real call with every input the graph takes
    assert profile.returncode == 0, profile.stderr
    assert all(row["host_rss_measured"] > 0 for row in json.loads(profile.stdout)), profile.stdout
    s = Server(continuous_bundle)
    try:
        ok = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "steps": 4}, timeout=60)
        assert ok.status_code == 200, ok.text
        bad = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "Once", "suffix": "the end", "max_tokens": 8}, timeout=60)
        assert bad.status_code == 400 and "fill gaps" in bad.text
    finally:
        assert s.stop() == 0


def test_its_engines_mark_and_bind_the_latents():
    """TensorRT (checked without a GPU): the canvas engine keeps x0 and x0_top1 as outputs, and its buffers and
    optimization profile cover x and t."""
    from jetson_dllm import engine as eng

    cfg = ModelConfig(**CFG)
    assert eng.builder_settings("fp16", 8 << 30, cfg=cfg)["outputs"] == ["topk_logprobs", "topk_ids", "x0", "x0_top1"]
    assert eng.input_shapes(cfg, 2, 16) == {"tokens": (2, 16), "x": (2, 16, 8), "t": (2,)}
    buffers = eng.io_buffers(cfg, ("canvas",), 2, 8, 16)
    assert buffers["x0"][0] == (2, 16, 8) and buffers["x"][1] == "float32" and "logits" not in buffers


def test_self_conditioning_feeds_the_previous_top_k_where_text_is_generated():
    tokens = np.array([[10, 11, 2, 2]], np.int32)
    loop = runtime.continuous_calls(tokens, tokens != 2, SpecialIds(mask=2, eot=1, pad=0), SamplerConfig(steps=2, temperature=0.0), 4,
                                    soft_k=2)
    first = next(loop)
    assert (first.feeds["soft_probs"] == 0).all() and first.feeds["soft_ids"].shape == (1, 4, 2)  # nothing before the first step
    ids = np.tile(np.array([30, 31, 32], np.int32), (1, 4, 1))
    lp = np.log(np.tile(np.array([0.5, 0.3, 0.2], np.float32), (1, 4, 1)))
    second = loop.send({"topk_logprobs": lp, "topk_ids": ids, "x0": np.zeros((1, 4, 4), np.float32), "x0_top1": np.zeros((1, 4, 4), np.float32)})
    assert (second.feeds["soft_ids"][0, 2:] == [30, 31]).all() and np.allclose(second.feeds["soft_probs"][0, 2:], [0.5, 0.3])
    assert (second.feeds["soft_probs"][0, :2] == 0).all()  # the prompt's positions take none


def test_a_self_conditioned_model_trains_exports_and_runs_alike(data_dir, tmp_path):
    from train_host.export import export_bundle

    run = tmp_path / "sc"
    train_small(data_dir, run, steps=4, eval_every=4, objective="continuous", latent_dim=16, self_cond=4)
    cfg = json.loads(next((run / "checkpoints").glob("step_*/config.json")).read_text())["model"]
    assert cfg["soft_k"] == 4 and cfg["latent_dim"] == 16
    export_bundle(run, tmp_path / "b", precisions=("fp32",), parity_canvases=4)
    import onnx

    assert [i.name for i in onnx.load(str(tmp_path / "b" / "model.fp32.onnx")).graph.input] == ["tokens", "soft_ids", "soft_probs", "x", "t"]
    outs = [subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(path), "--prompt", "Once", "--length", "16", "--steps", "4",
                            "--temperature", "0", "--json"], capture_output=True, text=True, timeout=120) for path in (run, tmp_path / "b")]
    assert all(o.returncode == 0 for o in outs), outs[0].stderr + outs[1].stderr
    assert json.loads(outs[0].stdout)["tokens"] == json.loads(outs[1].stdout)["tokens"]
