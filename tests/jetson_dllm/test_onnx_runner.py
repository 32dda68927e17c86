import numpy as np
import onnxruntime as ort
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.graphs import SAMPLING_OUTPUTS
from jetson_dllm.runners.loaders import open_runner as open_backend
from jetson_dllm.runners.onnx_runner import resolve_providers
from jetson_dllm.runners.protocol import sampling_fn


def canvases(bundle, B, T, seed):
    rng = np.random.default_rng(seed)
    tok = rng.integers(3, bundle.config.vocab_size, size=(B, T)).astype(np.int32)
    tok[rng.random((B, T)) < 0.5] = bundle.config.mask_id
    return tok


def test_bound_buffers_are_reused_and_results_stay_right(bundle_dir):
    be = open_backend("onnx", str(bundle_dir), precision="fp32")
    T = be.canvas_lengths[-1]
    plain = ort.InferenceSession(str(bundle_dir / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    first = None
    for seed in range(3):
        x = canvases(be.bundle, 2, T, seed)
        out = be.run("canvas", {"tokens": x})
        ref = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, {"tokens": x})))  # by name: the signature's order
        np.testing.assert_allclose(out["topk_logprobs"], ref["topk_logprobs"], atol=1e-4)
        assert np.array_equal(out["topk_ids"], ref["topk_ids"])
        if first is None:
            first = out["topk_ids"]
        assert out["topk_ids"] is first  # the same preallocated buffer, refilled: no per-step allocation
    assert be.run("canvas", {"tokens": canvases(be.bundle, 1, 32, 9)})["topk_ids"].shape == (1, 32, be.topk)
    logits = be.run("canvas", {"tokens": x}, outputs=("logits",))["logits"]
    assert logits.shape == (2, T, be.cfg.vocab_size)


def test_a_sampling_step_binds_no_logits(bundle_dir):
    be = open_backend("onnx", str(bundle_dir))
    x = canvases(be.bundle, 1, 32, 0)
    assert set(be.run("canvas", {"tokens": x})) == {*SAMPLING_OUTPUTS, "entropy"}
    binding = be._bound[x.shape][0]
    # only the top-K outputs and the entropy leave the session; the vocabulary-sized logits stay an internal tensor
    assert [v.shape() for v in binding.get_outputs()] == [[1, 32, be.topk], [1, 32, be.topk], [1, 32]]


def test_the_graph_returns_the_whole_distributions_entropy(bundle_dir):
    """The entropy output is the full softmax's (checked against the logits), and larger than the renormalised
    top-K's, which is what the sampler would use without it."""
    be = open_backend("onnx", str(bundle_dir))
    x = canvases(be.bundle, 2, 32, 1)
    out = {k: v.copy() for k, v in be.run("canvas", {"tokens": x}).items()}
    logits = be.run("canvas", {"tokens": x}, outputs=("logits",))["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    full = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
    np.testing.assert_allclose(out["entropy"], full, atol=2e-3)
    q = np.exp(out["topk_logprobs"])
    q /= q.sum(-1, keepdims=True)
    assert (out["entropy"] >= -(q * np.log(q)).sum(-1) - 1e-4).all()


def test_a_graph_without_the_entropy_output_still_runs(bundle_dir, tmp_path):
    """Bundles exported before the entropy output: the runner returns the top-K alone (the sampler then estimates
    the entropy from it)."""
    import onnx

    from jetson_dllm.runners.onnx_runner import OnnxRunner, session_from_onnx

    proto = onnx.load(str(bundle_dir / "model.fp32.onnx"))
    kept = [o for o in proto.graph.output if o.name != "entropy"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(tmp_path / "old.onnx"))
    be = open_backend("onnx", str(bundle_dir))
    old = OnnxRunner({"canvas": session_from_onnx(tmp_path / "old.onnx", threads=1)}, be.cfg)
    x = canvases(be.bundle, 1, 32, 2)
    got = old.run("canvas", {"tokens": x})
    assert set(got) == set(SAMPLING_OUTPUTS)
    assert np.array_equal(got["topk_ids"], be.run("canvas", {"tokens": x})["topk_ids"])


def test_cpu_int8_variant_runs_and_mostly_agrees(bundle_dir, data_dir):
    from calibration.data import stratified_masking
    from train_host.data import CanvasDataset

    fp32 = open_backend("onnx", str(bundle_dir), precision="fp32")
    dyn = open_backend("onnx", str(bundle_dir), precision="int8-dynamic")
    static = open_backend("onnx", str(bundle_dir), precision="int8")
    T = fp32.canvas_lengths[-1]
    real = CanvasDataset(data_dir, "val", T, fp32.tokenizer.pad_id).batch(np.arange(8))
    x = stratified_masking(real, fp32.cfg.mask_id, fp32.tokenizer.pad_id, seed=3)
    masked = x == fp32.cfg.mask_id
    ref = fp32.run("canvas", {"tokens": x})["topk_ids"][..., 0].copy()
    for be in (dyn, static):
        top1 = be.run("canvas", {"tokens": x})["topk_ids"][..., 0]
        assert (top1 == ref)[masked].mean() > 0.9  # on real canvases at every noise level


def test_providers():
    assert resolve_providers("cpu", ["CPUExecutionProvider"], "/tmp/c", False) == ["CPUExecutionProvider"]
    trt = resolve_providers("trt,cuda", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "/tmp/c", True)
    assert trt[0][0] == "TensorrtExecutionProvider" and trt[0][1]["trt_engine_cache_path"] == "/tmp/c" and trt[0][1]["trt_fp16_enable"]
    assert trt[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(DllmError, match="onnxruntime-gpu"):
        resolve_providers("cuda", ["CPUExecutionProvider"], "/tmp/c", False)


def test_sampler_over_onnx_finishes(bundle_dir):
    from jetson_dllm.sampler import SamplerConfig, SpecialIds, sample

    be = open_backend("onnx", str(bundle_dir), precision="fp16")
    tok = be.tokenizer
    x = np.full((2, 32), tok.mask_id, dtype=np.int32)
    fixed = np.zeros_like(x, dtype=bool)
    result = sample(sampling_fn(be), x, fixed, SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id), SamplerConfig(steps=8))
    assert not (result.tokens == tok.mask_id).any() and result.evaluations <= 8


def test_wrong_inputs(bundle_dir):
    be = open_backend("onnx", str(bundle_dir))
    with pytest.raises(DllmError, match="longer than"):
        be.run("canvas", {"tokens": np.zeros((1, be.canvas_lengths[-1] + 1), dtype=np.int32)})
    with pytest.raises(DllmError, match="one input"):
        be.run("canvas", {"ids": np.zeros((1, 8), dtype=np.int32)})
