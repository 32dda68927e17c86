"""TensorRT + pycuda on a real GPU: engines build, tokens match onnxruntime, steps are timed.

Marked `gpu`; they skip here (no TensorRT, no pycuda, no GPU) with the reason, and run on a Jetson or any
NVIDIA machine with TensorRT 10 and pycuda installed: `pytest -m gpu`.
"""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _needs_trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (JetPack or an NVIDIA GPU machine)")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    import pycuda.driver as cuda

    try:
        cuda.init()
        cuda.Device(0)
    except Exception as e:  # no driver or GPU
        pytest.skip(f"no CUDA GPU: {e}")
    return trt


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_trt_greedy_tokens_match_onnxruntime(bundle_dir, tmp_path, precision):
    import shutil

    _needs_trt()
    from jetson_dllm.families.mdlm import generate
    from jetson_dllm.runners.loaders import open_runner as open_backend
    from jetson_dllm.sampler import SamplerConfig

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    trt_be = open_backend("trt", str(copy), precision=precision)
    ref_be = open_backend("onnx", str(copy), precision=precision)
    cfg = SamplerConfig(steps=16, temperature=0.0)
    a = generate(trt_be, trt_be.tokenizer, "Once upon a time", length=40, sampler=cfg)
    b = generate(ref_be, ref_be.tokenizer, "Once upon a time", length=40, sampler=cfg)
    agree = (a.result.tokens == b.result.tokens).mean()
    assert agree > (0.99 if precision == "fp16" else 0.9)
    assert trt_be.last_gpu_ms > 0
    assert list((copy / "engines").glob(f"{precision}-b1-c*.plan"))


def test_trt_outputs_are_sorted_topk(bundle_dir, tmp_path):
    import shutil

    _needs_trt()
    from jetson_dllm.runners.loaders import open_runner as open_backend

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    be = open_backend("trt", str(copy), precision="fp16")
    x = np.full((1, be.canvas_lengths[0]), be.cfg.mask_id, dtype=np.int32)
    out = be.run("canvas", {"tokens": x})
    lp = out["topk_logprobs"]
    assert (np.diff(lp, axis=-1) <= 1e-6).all() and (lp <= 0).all()
    assert not (out["topk_ids"] == be.cfg.mask_id).any()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trt_block_diffusion_matches_onnxruntime(bd3_bundle, tmp_path, precision):
    """The block-step and commit engines, the cache on the GPU written in place: the same text as onnxruntime."""
    import shutil

    _needs_trt()
    from jetson_dllm.generate import complete
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    copy = tmp_path / "b"
    shutil.copytree(bd3_bundle, copy)
    greedy = SamplerConfig(steps=4, temperature=0.0)
    with open_runner("trt", str(copy), precision=precision) as on_trt, open_runner("onnx", str(copy), precision=precision) as on_ort:
        a = complete(on_trt, "Once upon a time", length=40, num_samples=2, sampler=greedy)
        b = complete(on_ort, "Once upon a time", length=40, num_samples=2, sampler=greedy)
        assert on_trt.memory()["cache"] > 0 and on_trt.last_gpu_ms > 0
    assert a.commits == b.commits and (a.tokens == b.tokens).mean() > (0.99 if precision != "int8" else 0.9)
    assert {p.name.split("-b1-")[0] for p in (copy / "engines").glob("*.plan")} == {f"{precision}-block_step", f"{precision}-commit"}
