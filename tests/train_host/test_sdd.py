"""Sparse Distribution Diffusion: the noise process, the mixture input, training and its honest evaluation, the
sampling loop, the exported graph (t and the candidates as inputs), and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families.sdd import sdd_calls
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import SamplerConfig, SpecialIds
from tests.conftest import all_precisions_bundle, no_nll_evaluation, train_small
from train_host.families.sdd import noised
from train_host.model import Denoiser

CFG = dict(d_model=32, n_head=2, n_layer=1, vocab_size=64, canvas_len=16, mask_id=2, family="sdd")


def test_the_noise_keeps_true_probabilities_and_hides_the_slot():
    x = torch.randint(3, 64, (4, 16))
    ids, probs = noised(x, torch.tensor([0.0, 0.5, 0.999, 1.0]), 8, 64, torch.Generator().manual_seed(0))
    assert (ids == x.unsqueeze(-1)).any(-1).all()  # the truth is among the candidates
    slot = (ids == x.unsqueeze(-1)).float().argmax(-1)
    assert len(set(slot.flatten().tolist())) > 4  # in a shuffled slot, not always the first
    assert torch.allclose(probs[3], torch.full((16, 8), 1 / 64))  # t = 1: 1/V each, not 1/k
    assert torch.allclose(probs[0].max(-1).values, torch.ones(16))  # t = 0: the truth holds all the mass
    assert float(probs.sum(-1).max()) <= 1.0 + 1e-6
    hidden, hp = noised(x, torch.full((4,), 0.3), 8, 64, torch.Generator().manual_seed(0), truth=False)
    assert float(hp.sum(-1).max()) < 0.2 and torch.allclose(hp, hp[..., :1].expand_as(hp))


def test_the_input_is_the_mixture_itself():
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(soft_k=4, **CFG)).eval()
    tokens = torch.full((1, 16), 2)
    ids = torch.randint(3, 64, (1, 16, 4))
    one = torch.zeros(1, 16, 4)
    one[..., 0] = 1.0  # all the mass on the first candidate
    t = torch.tensor([0.5])
    with torch.no_grad():
        mixed = model.embed(tokens, (ids, one), t)
        alone = model.embed(ids[..., 0], None, t)
        assert torch.allclose(mixed, alone, atol=1e-6)
        none = model.embed(tokens, (ids, torch.zeros_like(one)), t)
        assert torch.allclose(none, model.embed(tokens, None, t))  # no candidates: the token (the mask) itself
        assert not torch.allclose(model.embed(tokens, None, torch.tensor([0.9])), none)  # the level is an input
    assert not hasattr(model, "soft_proj")
    with pytest.raises(DllmError, match="needs its candidates"):
        ModelConfig(soft_k=0, **CFG)


def test_the_loop_starts_at_one_over_v_and_feeds_the_top_k_back():
    k, V = 3, 50
    tokens = np.full((1, 8), 2, np.int32)
    tokens[0, :2] = [10, 11]
    fixed = np.zeros_like(tokens, bool)
    fixed[0, :2] = True
    for renoise in (False, True):
        loop = sdd_calls(tokens, fixed, SpecialIds(mask=2, eot=1, pad=0), SamplerConfig(steps=4), k, V, renoise)
        call, feeds, outs = next(loop), [], []
        rng = np.random.default_rng(0)
        try:
            while True:
                feeds.append({n: np.array(v) for n, v in call.feeds.items()})
                lp = np.sort(np.log(rng.dirichlet(np.ones(6), (1, 8))), -1)[..., ::-1].astype(np.float32)
                out = {"topk_logprobs": lp, "topk_ids": np.tile(np.arange(20, 26, dtype=np.int32), (1, 8, 1))}
                outs.append(out)
                call = loop.send(out)
        except StopIteration as done:
            result = done.value
        assert [float(f["t"][0]) for f in feeds] == [1.0, 0.75, 0.5, 0.25]
        assert np.allclose(feeds[0]["soft_probs"][0, 2:], 1 / V) and float(feeds[0]["soft_probs"][0, :2].sum()) == 0.0
        assert (feeds[0]["tokens"][0, :2] == [10, 11]).all() and (feeds[0]["tokens"][0, 2:] == 2).all()
        fed, p = feeds[1]["soft_probs"][0, 2:], np.exp(outs[0]["topk_logprobs"][0, 2:, :k])
        if renoise:  # flattened toward 1/V to the next level
            a = np.cos(0.5 * np.pi * 0.75)
            assert np.allclose(fed, a * p + (1 - a) / V, atol=1e-6)
        else:
            assert np.allclose(fed, p, atol=1e-6)
        assert (feeds[1]["soft_ids"][0, 2:] == [20, 21, 22]).all()
        assert (result.tokens[0, :2] == [10, 11]).all() and (result.tokens[0, 2:] == 20).all()


@pytest.fixture(scope="module")
def sdd_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdd") / "run"
    train_small(data_dir, out, steps=6, eval_every=6, objective="sdd", candidates=4)
    return out


def test_training_reports_no_nll(sdd_run, data_dir):
    last, said = no_nll_evaluation(sdd_run, data_dir)
    assert {"val_acc", "val_acc_hidden", "val_acc_t1"} <= set(last) and "truth left out" in said


@pytest.fixture(scope="module")
def sdd_bundle(sdd_run, data_dir, tmp_path_factory):
    return all_precisions_bundle(sdd_run, data_dir, tmp_path_factory.mktemp("sdd-bundle"))


def test_the_bundle_takes_the_level_and_matches_torch(sdd_run, sdd_bundle):
    import onnx

    inputs = [i.name for i in onnx.load(str(sdd_bundle / "model.fp32.onnx")).graph.input]
    assert inputs == ["tokens", "soft_ids", "soft_probs", "t"]
    manifest = json.loads((sdd_bundle / "manifest.json").read_text())
    assert manifest["parity"]["fp32"]["max_abs_logit_diff"] < 1e-3 and manifest["model"]["family"] == "sdd"
    texts = []
    for kind, path in (("torch", sdd_run), ("onnx", sdd_bundle)):
        run = subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(path), "--backend", kind, "--prompt", "Once upon a time",
                              "--length", "20", "--steps", "6", "--json"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert out["evaluations"] == 6
        texts.append(out["tokens"])
    assert texts[0] == texts[1]
    q = open_runner("onnx", sdd_bundle, precision="int8")
    got = q.run("canvas", {"tokens": np.full((1, 32), 2, np.int32), "soft_ids": np.full((1, 32, 4), 5, np.int32),
                           "soft_probs": np.full((1, 32, 4), 0.1, np.float32), "t": np.array([0.5], np.float32)})
    assert got["topk_ids"].shape == (1, 32, q.topk)


@pytest.mark.parametrize("t", [None, np.array([1.5], np.float32), np.array([0.5, 0.5], np.float32)])
def test_the_level_is_checked(sdd_bundle, t):
    feeds = {"tokens": np.full((1, 32), 2, np.int32), **({"t": t} if t is not None else {})}
    with pytest.raises(DllmError, match="noise level in \\[0, 1\\]"):
        open_runner("onnx", sdd_bundle).run("canvas", feeds)


@pytest.mark.parametrize("args, message", [
    (["run", "{bundle}", "--prompt", "Once [MASK] a time"], "not trained to fill gaps"),
    (["run", "{bundle}", "--prompt", "Once", "--strategy", "threshold"], "--strategy does not apply"),
    (["export", "{run}", "-o", "{tmp}/b", "--int8", "--calib-file", "{tmp}/x.npz"], "calibrate it on --data"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", "--family", "mdlm", "--candidates", "4"], "--candidates is for --objective sdd"),
])
def test_refusals(sdd_run, sdd_bundle, data_dir, tmp_path, args, message):
    np.savez(tmp_path / "x.npz", tokens=np.zeros((2, 8), np.int32), tokenizer_sha256="0")
    argv = [a.format(bundle=sdd_bundle, run=sdd_run, tmp=tmp_path, data=data_dir) for a in args]
    run = subprocess.run([sys.executable, "-m", "jetson_dllm", *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()


def test_the_server_serves_it_and_refuses_a_suffix(sdd_bundle):
    import httpx

    from tests.conftest import Server

    s = Server(sdd_bundle)
    try:
        ok = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "steps": 5}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 0
        bad = httpx.post(f"{s.url}/v1/completions", json={"model": "tiny", "prompt": "Once", "suffix": "the end", "max_tokens": 8}, timeout=60)
        assert bad.status_code == 400 and "fill gaps" in bad.text
    finally:
        assert s.stop() == 0


def test_the_live_view_shades_each_position_by_its_top_candidates_weight(data_dir):
    from rich.console import Console

    from jetson_dllm.live import LiveCanvas
    from jetson_dllm.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    ids = tok.encode("Once upon a time")[:3]
    view = LiveCanvas(Console(file=None, record=True), tok, 4)
    row = view.render_row(np.array(ids), np.zeros(3, bool), np.array([0.1, 0.5, 0.9]))
    styles = [str(span.style) for span in row.spans]
    assert "dim" in styles[0] and "bold" in styles[-1] and "dim" not in styles[-1]
    plain = view.render_row(np.array(ids), np.zeros(3, bool))
    assert row.plain == plain.plain and not any(str(s.style).strip() for s in plain.spans)


def test_swapping_leaves_the_truth_out_only_at_high_noise():
    x = torch.randint(3, 4096, (3, 4000))
    t = torch.tensor([0.4, 0.75, 1.0])
    ids, probs = noised(x, t, 8, 4096, torch.Generator().manual_seed(0), swap=True)
    held = (ids == x.unsqueeze(-1)).any(-1).float().mean(1)  # (a random id is the truth 0.2% of the time)
    assert held[0] == 1.0 and abs(float(held[1]) - 0.5) < 0.03 and float(held[2]) < 0.01  # kept with probability 2 - 2t
    assert float(probs[2].max()) == pytest.approx(1 / 4096)  # no position carries the truth's mass


def test_padding_is_never_a_candidate_nor_the_text():
    """Where the model knows nothing its likeliest token is padding (much of a canvas is); the loop skips it (and the
    end-of-text when ends are not allowed), keeping the others' true probabilities."""
    tokens = np.full((1, 4), 2, np.int32)
    loop = sdd_calls(tokens, np.zeros_like(tokens, bool), SpecialIds(mask=2, eot=1, pad=0), SamplerConfig(steps=2, allow_end=False), 2, 50)
    ids = np.tile(np.array([0, 1, 20, 21, 22], np.int32), (1, 4, 1))
    lp = np.log(np.tile(np.array([0.5, 0.2, 0.1, 0.05, 0.01], np.float32), (1, 4, 1)))
    call = next(loop)
    call = loop.send({"topk_logprobs": lp, "topk_ids": ids})
    assert (call.feeds["soft_ids"] == [20, 21]).all()
    assert np.allclose(call.feeds["soft_probs"][0, 0], np.cos(0.25 * np.pi) * np.array([0.1, 0.05]) + (1 - np.cos(0.25 * np.pi)) / 50)
    with pytest.raises(StopIteration) as done:
        loop.send({"topk_logprobs": lp, "topk_ids": ids})
    assert (done.value.value.tokens == 20).all()
