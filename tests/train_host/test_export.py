"""The exported graphs TensorRT 10.3 must parse, the bundle, parity, and torch == onnx generation."""

import json
import shutil

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import numpy_helper

from jetson_dllm.bundle import load_bundle
from jetson_dllm.errors import DllmError

TRT_OPS = set((FIXTURES / "api" / "tensorrt-10-onnx-ops.txt").read_text().split())


def graph_problems(model) -> list[str]:
    """What TensorRT 10.3's ONNX parser would refuse: unknown ops, other domains, opset > 20, int64 inputs, TopK K >= 3840."""
    problems = []
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opset.get("ai.onnx", 0) > 20:
        problems.append(f"opset {opset['ai.onnx']} > 20")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(next(a.t for a in n.attribute if a.name == "value"))
    for i in model.graph.input:
        if i.name not in inits and i.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            problems.append(f"int64 input {i.name}")
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{n.op_type} in domain {n.domain}")
        elif n.op_type not in TRT_OPS:
            problems.append(f"{n.op_type} not in TensorRT 10's parser")
        if n.op_type == "TopK":
            k = inits.get(n.input[1])
            if k is None or int(np.max(k)) >= 3840:
                problems.append(f"TopK K {k}")
            if any(a.name == "sorted" and a.i == 0 for a in n.attribute):
                problems.append("TopK unsorted")
    return problems


def onnx_files(bundle_dir):
    return sorted(bundle_dir.glob("*.onnx"))


def test_every_graph_is_one_tensorrt_10_parses(bundle_dir):
    files = onnx_files(bundle_dir)
    assert [f.name for f in files] == ["model.fp16.onnx", "model.fp32.onnx", "model.int8.onnx"]
    for f in files:
        model = onnx.load(str(f))
        onnx.checker.check_model(model, full_check=True)
        assert graph_problems(model) == [], f.name


def test_the_checker_can_fail(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.fp32.onnx"))
    model.graph.node[5].domain = "com.microsoft"
    model.opset_import[0].version = 23
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    problems = " | ".join(graph_problems(model))
    assert "com.microsoft" in problems and "opset 23" in problems and "int64 input" in problems


def test_input_and_heads(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.fp32.onnx"))
    (tokens,) = model.graph.input
    assert tokens.name == "tokens" and tokens.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert all(d.dim_param for d in tokens.type.tensor_type.shape.dim)  # batch and canvas are dynamic
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"logits": onnx.TensorProto.FLOAT, "topk_logprobs": onnx.TensorProto.FLOAT, "topk_ids": onnx.TensorProto.INT32,
                       "entropy": onnx.TensorProto.FLOAT}
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} <= set(range(17, 21))


def test_attention_is_matmul_softmax_matmul_with_q_prescaled(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.fp32.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    head_dim = manifest["model"]["d_model"] // manifest["model"]["n_head"]
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == manifest["model"]["n_layer"]
    for sm in softmaxes:
        qk = producer[sm.input[0]]
        assert qk.op_type == "MatMul"
        assert [c.op_type for c in consumers[sm.output[0]]] == ["MatMul"]
        scale = producer[qk.input[0]]  # Q * 1/sqrt(head_dim) before the first MatMul
        assert scale.op_type == "Mul"
        factor = [consts[i] for i in scale.input if i in consts]
        assert factor and np.isclose(float(np.asarray(factor[0]).reshape(-1)[0]), head_dim ** -0.5)


def test_fp16_keeps_norms_softmax_residuals_and_topk_in_fp32(bundle_dir):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle_dir / "model.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    fp32_nodes = set(manifest["fp32_nodes"])
    residual_adds = [n for n in model.graph.node if n.name in fp32_nodes and n.op_type == "Add"]
    assert len(residual_adds) >= 2 * manifest["model"]["n_layer"]  # x + attn(...) and x + mlp(...) in every layer
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for n in model.graph.node:
        if n.op_type in ("Softmax", "TopK", "ReduceLogSumExp", "Pow", "ReduceMean", "Sqrt") or n.name in fp32_nodes:
            for o in n.output:
                if types.get(o) in (F32, F16):  # (the ids of the top-K are int32)
                    assert types[o] == F32, (n.name, n.op_type)
    weights = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert weights and all(i.data_type == F16 for i in weights)  # matmul weights and the embedding in FP16


@pytest.mark.parametrize("graph", ["block_step", "commit", "commit_step"])
def test_the_cached_graphs_fp16_heads_and_cache_plumbing_stay_fp32(bd3_bundle, graph):
    """The nodes of the graph's own module (the sampling head's log-softmax and entropy, the new keys' and values'
    stacking) are FP32 in the FP16 graph: they were once matched by a module name the graphs no longer had."""
    from train_host.onnx_tools import HEAD_MODULES, _innermost_module

    model = onnx.shape_inference.infer_shapes(onnx.load(str(bd3_bundle / f"{graph}.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    head = [n for n in model.graph.node if _innermost_module(n)[0].endswith(HEAD_MODULES)]
    floats = [(n.name, types[o]) for n in head for o in n.output if types.get(o) in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t == onnx.TensorProto.FLOAT for _, t in floats), [name for name, t in floats if t != onnx.TensorProto.FLOAT][:5]


def test_manifest_hashes_and_parity(bundle_dir):
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert set(m["files"]) == {"tokenizer.json", "model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8-dynamic.ort"}
    assert set(bundle.verify().values()) == {"ok"}
    assert bundle.engines_dir.is_dir() and m["heads"]["sampling"]["k"] == 64
    assert m["special_ids"] == bundle.tokenizer().special_ids
    fp32, fp16 = m["parity"]["fp32"], m["parity"]["fp16"]
    assert fp32["max_abs_logit_diff"] < 1e-3 and fp32["top1_agreement"] == 1.0 and abs(fp32["nll_diff"]) < 1e-4
    assert fp16["max_abs_logit_diff"] < 0.1 and fp16["top1_agreement"] > 0.97
    assert set(fp32["by_mask_ratio"]) == {"0.15", "0.5", "0.9"}


def test_greedy_generation_is_identical_on_torch_and_onnx(bundle_dir, trained_run):
    from jetson_dllm.families.mdlm import generate
    from jetson_dllm.runners.loaders import open_runner as open_backend
    from jetson_dllm.sampler import SamplerConfig

    torch_be = open_backend("torch", str(trained_run))
    onnx_be = open_backend("onnx", str(bundle_dir), precision="fp32")
    for prompt, seed, strategy in [("Once upon a time", 0, "confidence"), ("Lily went to the", 1, "margin"),
                                   ("Tom had a ____ and a dog.", 2, "entropy"), ("The sun", 3, "threshold")]:
        cfg = SamplerConfig(steps=12, strategy=strategy, seed=seed, temperature=0.0)
        a = generate(torch_be, torch_be.tokenizer, prompt, length=30, num_samples=2, sampler=cfg)
        b = generate(onnx_be, onnx_be.tokenizer, prompt, length=30, num_samples=2, sampler=cfg)
        assert np.array_equal(a.result.tokens, b.result.tokens), prompt
        assert a.texts == b.texts


def test_bad_bundles_are_refused(bundle_dir, tmp_path):
    from jetson_dllm.runners.onnx_runner import onnx_runner_from_bundle as OnnxBackend

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    with open(copy / "model.fp32.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    for precision in ("fp32", "fp16"):  # a bundle is used whole or refused: the altered file is named
        with pytest.raises(DllmError, match="model.fp32.onnx is altered"):
            OnnxBackend(str(copy), precision=precision)
    shutil.copy(bundle_dir / "model.fp32.onnx", copy / "model.fp32.onnx")
    OnnxBackend(str(copy), precision="fp16")
    with pytest.raises(DllmError, match="has no bf16 model"):
        OnnxBackend(str(copy), precision="bf16")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DllmError, match="newer jetson-dllm"):
        load_bundle(copy)
    (copy / "manifest.json").write_text("{")
    with pytest.raises(DllmError, match="truncated or corrupt"):
        load_bundle(copy)
    with pytest.raises(DllmError, match="not a bundle"):
        load_bundle(tmp_path)


def test_export_refuses_what_is_not_ours_and_leaves_nothing_half_written(tmp_path, trained_run, monkeypatch):
    from train_host import export as ex

    (tmp_path / "notours").mkdir()
    (tmp_path / "notours" / "config.json").write_text('{"architectures": ["GPT2"]}')
    with pytest.raises(DllmError, match="not a jetson-dllm checkpoint"):
        ex.export_bundle(tmp_path / "notours", tmp_path / "b1")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "thesis.txt").write_text("precious")
    with pytest.raises(DllmError, match="not a bundle jetson-dllm made"):
        ex.export_bundle(trained_run, tmp_path / "occupied", overwrite=False)
    with pytest.raises(DllmError, match="not a bundle jetson-dllm made; refusing"):
        ex.export_bundle(trained_run, tmp_path / "occupied", overwrite=True)
    assert (tmp_path / "occupied" / "thesis.txt").read_text() == "precious"
    from train_host import canvas_export

    monkeypatch.setattr(canvas_export, "FP32_MAX_LOGIT_DIFF", -1.0)  # make FP32 parity "fail"
    with pytest.raises(DllmError, match="parity with PyTorch is broken"):
        ex.export_bundle(trained_run, tmp_path / "b2", precisions=("fp32",))
    assert not (tmp_path / "b2").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(DllmError, match="--topk"):
        ex.export_bundle(trained_run, tmp_path / "b3", topk=5000)


def test_checker_errors_are_clear():
    from train_host.onnx_tools import check_graph

    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [], []))
    with pytest.raises(DllmError, match="fails the ONNX checker"):
        check_graph(model, "broken.onnx")


def test_inspect_reports_and_fails_on_altered_files(bundle_dir, tmp_path, capsys):
    from jetson_dllm.cli import main

    assert main(["inspect", str(bundle_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.int8.onnx" in out and "no engines yet" in out and "parity" in out
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "model.fp16.onnx").unlink()
    assert main(["inspect", str(copy)]) == 1
    captured = capsys.readouterr()
    assert "missing" in captured.out and captured.err.startswith("error: 1 file(s)")
