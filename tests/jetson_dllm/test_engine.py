"""Engine cache keys, the rebuild decision, builder settings, buffers and memory checks: all off the device."""

import json
from dataclasses import replace

import pytest
from conftest import FIXTURES

from jetson_dllm import engine as eng
from jetson_dllm.bundle import load_bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import read_meminfo

ORIN = eng.Device(name="Orin", compute_capability="8.7", trt_version="10.3.0", l4t="36.4.3", total_memory=7_990_000_000, integrated=True)
SPEC = eng.EngineSpec(precision="fp16", batch=1, canvas=128, onnx_sha256="ab" * 32)


def test_trt_versions():
    eng.check_trt_version("10.3.0")
    with pytest.raises(DllmError, match="too old"):
        eng.check_trt_version("8.6.2")
    with pytest.raises(DllmError, match="not supported yet"):
        eng.check_trt_version("11.0.0")


def test_l4t_release(tmp_path):
    assert eng.read_l4t_release(FIXTURES / "jetson" / "nv_tegra_release") == "36.4.3"
    assert eng.read_l4t_release(tmp_path / "absent") == ""
    (tmp_path / "r").write_text("# R35 (release), REVISION: 5.0, GCID: 1\n")
    assert eng.read_l4t_release(tmp_path / "r") == "35.5.0"


def test_key_depends_on_everything_the_engine_depends_on():
    settings = eng.builder_settings("fp16", ORIN.total_memory)
    base = eng.engine_key(SPEC, ORIN, settings)
    assert base == eng.engine_key(SPEC, ORIN, dict(settings)) and len(base) == 16
    changed = [
        eng.engine_key(replace(SPEC, onnx_sha256="cd" * 32), ORIN, settings),
        eng.engine_key(replace(SPEC, precision="int8"), ORIN, settings),
        eng.engine_key(replace(SPEC, batch=2), ORIN, settings),
        eng.engine_key(replace(SPEC, canvas=256), ORIN, settings),
        eng.engine_key(SPEC, replace(ORIN, trt_version="10.3.1"), settings),
        eng.engine_key(SPEC, replace(ORIN, name="NVIDIA H100"), settings),
        eng.engine_key(SPEC, replace(ORIN, compute_capability="9.0"), settings),
        eng.engine_key(SPEC, replace(ORIN, l4t="36.3.0"), settings),
        eng.engine_key(SPEC, ORIN, {**settings, "optimization_level": 5}),
    ]
    assert len(set(changed)) == len(changed) and base not in changed
    assert eng.engine_key(SPEC, replace(ORIN, total_memory=1), settings) == base  # free memory is not identity


def test_builder_settings_per_precision_and_memory():
    gib = 1 << 30
    fp16 = eng.builder_settings("fp16", 8 * gib)
    assert fp16["strongly_typed"] and fp16["flags"] == [] and fp16["workspace"] == gib
    int8 = eng.builder_settings("int8", 8 * gib, fp32_layers=40)
    assert not int8["strongly_typed"] and int8["flags"] == ["INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"] and int8["fp32_layers"] == 40
    assert eng.builder_settings("fp32", 8 * gib)["flags"] == []
    assert eng.builder_settings("fp16", 1 * gib)["workspace"] == gib // 4  # floor
    assert eng.builder_settings("fp16", 80 * gib)["workspace"] == 2 * gib  # ceiling
    assert eng.builder_settings("fp16", 8 * gib)["tactic_dram"] == 4 * gib
    assert fp16["outputs"] == ["topk_logprobs", "topk_ids"] and fp16["max_aux_streams"] == 0
    with pytest.raises(DllmError):
        eng.builder_settings("int4", gib)
    with pytest.raises(DllmError, match="opt-level"):
        eng.builder_settings("fp16", gib, optimization_level=7)


def test_io_buffers_are_sized_and_aligned():
    from jetson_dllm.config import ModelConfig

    cfg = ModelConfig(d_model=64, n_head=4, n_kv_head=2, n_layer=3, vocab_size=500, canvas_len=128)
    buffers = eng.io_buffers(cfg, ("canvas",), batch=2, k=64, canvas=100)
    assert set(buffers) == {"tokens", "topk_logprobs", "topk_ids"}  # the logits stay inside the engine
    assert buffers["tokens"] == ((2, 100), "int32", 1024)  # 800 bytes rounded up to 256
    assert buffers["topk_logprobs"][0] == (2, 100, 64) and buffers["topk_logprobs"][2] == 51200
    assert all(nbytes % eng.ALIGNMENT == 0 for _, _, nbytes in buffers.values())
    shape, dtype, nbytes = eng.io_buffers(cfg, ("canvas",), 1, 1, canvas=1)["topk_ids"]
    assert nbytes == 256
    bd3 = ModelConfig(d_model=64, n_head=4, n_kv_head=2, n_layer=3, vocab_size=500, canvas_len=128, family="bd3", block_size=16)
    cached = eng.io_buffers(bd3, ("block_step", "commit"), batch=2, k=8)
    assert cached["k_cache"][0] == (3, 2, 2, 128, 16) and cached["k_new"][0] == (3, 2, 2, 16, 16)  # n_kv_head heads
    assert cached["tokens"][0] == (2, 16) and cached["valid_len"][:2] == ((2,), "int32") and "prev_tokens" not in cached


def test_meminfo_and_the_build_memory_check():
    info = read_meminfo(str(FIXTURES / "jetson" / "meminfo_orin_nano"))
    assert info["MemAvailable"] == 4712300 * 1024 and info["NvMapMemUsed"] == 1524312 * 1024
    eng.check_build_memory(2 << 30, info)
    with pytest.raises(DllmError, match="swap"):
        eng.check_build_memory(8 << 30, info)
    eng.check_build_memory(100 << 30, {})  # nothing known: do not block the build
    settings = eng.builder_settings("fp16", 8 << 30)
    assert eng.build_memory_needed(100 << 20, settings) > settings["workspace"] + (300 << 20)


def test_engine_spec_validates_against_the_bundle(bundle_dir):
    bundle = load_bundle(bundle_dir)
    spec = eng.engine_spec(bundle, "fp16", 1, bundle.canvas_lengths[-1])
    assert spec.onnx_sha256 == bundle.manifest["files"]["model.fp16.onnx"]
    with pytest.raises(DllmError, match="not one of the bundle's shapes"):
        eng.engine_spec(bundle, "fp16", 1, 100)
    with pytest.raises(DllmError, match="batch"):
        eng.engine_spec(bundle, "fp16", 0, bundle.canvas_lengths[-1])
    with pytest.raises(DllmError, match="has no bf16 model"):
        eng.engine_spec(bundle, "bf16", 1, bundle.canvas_lengths[-1])


def test_rebuild_decision_from_engine_metadata(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    bundle = load_bundle(copy)
    spec = eng.engine_spec(bundle, "fp16", 1, bundle.canvas_lengths[-1])
    settings = eng.builder_settings("fp16", ORIN.total_memory)
    path = eng.engine_path(bundle, spec, ORIN, settings)
    eng.write_engine(path, b"plan bytes", {"format": 1, "spec": spec.__dict__, "device": ORIN.__dict__, "settings": settings})
    assert [r["verdict"] for r in eng.engine_status(bundle, ORIN)] == ["yes"]
    assert "TensorRT 10.3.0 on Orin, rebuild" in eng.engine_status(bundle, replace(ORIN, trt_version="10.4.0"))[0]["verdict"]
    assert eng.engine_status(bundle, None)[0]["verdict"].startswith("unknown")
    stale = eng.EngineSpec("fp16", 1, bundle.canvas_lengths[-1], "00" * 32)  # built from an older export
    eng.write_engine(eng.engine_path(bundle, stale, ORIN, settings), b"old", {"format": 1, "spec": stale.__dict__, "device": ORIN.__dict__, "settings": settings})
    (copy / "engines" / "orphan.plan").write_bytes(b"x")
    verdicts = {r["file"]: r["verdict"] for r in eng.engine_status(bundle, ORIN)}
    assert sorted(verdicts.values()) == ["no: built from another ONNX, rebuild", "no: metadata missing or unreadable, rebuild", "yes"]
    assert not list((copy / "engines").glob(".*tmp*"))  # writes were atomic
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["spec"]["onnx_sha256"] == bundle.onnx_sha256("fp16")


def test_no_tensorrt_here_is_a_clear_error():
    pytest.importorskip("numpy")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(DllmError, match="TensorRT is not installed"):
        eng.detect_device()
    assert eng.detect_device(required=False) is None
