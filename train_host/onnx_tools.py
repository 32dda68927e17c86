"""What every family's exporter shares: the exporter kept quiet, the graph check, FP16 conversion with the FP32
islands, the nodes INT8 keeps in FP32, the canvases parity and calibration run on, and the one bundle manifest."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings

import numpy as np

from jetson_dllm.bundle import BUNDLE_FORMAT, BUNDLE_VERSION
from jetson_dllm.errors import DllmError
from jetson_dllm.families import model_graphs
from jetson_dllm.runners.graphs import graph_signature, graph_spec
from jetson_dllm.tokenizer import TextTokenizer
from train_host.corpus import story
from train_host.data import CanvasDataset, load_manifest

OPSET = 18  # TensorRT 10.3 parses 9-20; the dynamo exporter's lowest
# FP16 graphs keep these in FP32: the softmax, and (by module, below) RMSNorm, the residual stream, the head's top-K.
FP32_OPS = ["Softmax", "TopK", "ReduceLogSumExp"]


@contextlib.contextmanager
def quiet_exporter():
    """The exporter prints its phases, logs that torchvision's ops are skipped (we use none) and raises
    FutureWarnings from its own internals: none of it is the user's business. Our own warnings still show."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|onnxscript|copyreg)")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|onnxscript)")
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")  # the exporter's notes on its own axes
            yield
    finally:
        registration.setLevel(level)


def export_graph(model, graph: str, k: int, path, opset: int = OPSET, width: int = 0) -> None:
    """Write one graph of a model (FP32) through its module (train_host.graph_modules.GraphModule): its input and
    output names, their order and its dynamic axes all from the graph's signature ("B" the batch up to 1,024, "T" the
    canvas graph's canvas and "W" the verify graph's width, each up to the model's context), traced on example
    inputs (`width`: the example's, for a graph of dynamic width)."""
    import torch

    from train_host.graph_modules import GraphModule, example_feeds

    cfg = model.cfg
    module = GraphModule(model.eval(), graph, k).eval()
    inputs, outputs = graph_signature(graph, cfg, k)
    dims = {"B": torch.export.Dim("batch", min=1, max=1024), "T": torch.export.Dim("canvas", min=2, max=cfg.canvas_len),
            "W": torch.export.Dim("width", min=1, max=cfg.canvas_len)}
    dynamic = tuple({axis: dims[d] for axis, d in enumerate(shape) if isinstance(d, str)} for _, shape in inputs.values())
    feeds = example_feeds(model, graph, k, width=width)
    model.set_attention("math")
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(module, tuple(feeds[n] for n in inputs), str(path), input_names=list(inputs), output_names=list(outputs),
                              dynamic_shapes={"args": dynamic}, opset_version=opset, dynamo=True, external_data=False)
    finally:
        model.set_attention("sdpa")


def check_graph(proto, name: str):
    """onnx.checker full check plus shape inference; a clear error if the graph is not valid."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise DllmError(f"{name} fails the ONNX checker: {str(e).splitlines()[0][:160]}") from None


def _innermost_module(node) -> tuple[str, str]:
    """(module class, op) of a node from the exporter's namespace metadata, e.g. ("train_host.model.RMSNorm", ...)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            segments = prop.value.split("/")
            module = segments[-2].split(": ")[-1] if len(segments) > 1 else ""
            return module, segments[-1]
    return "", ""


# The graphs' own module, whose nodes (the sampling head, the cache plumbing) an FP16 graph keeps in FP32: every
# graph is exported through train_host.graph_modules.GraphModule (the model's layers are submodules of their own).
HEAD_MODULES = ("graph_modules.GraphModule",)


def fp32_nodes(proto) -> list[str]:
    """Nodes an FP16 graph keeps in FP32: RMSNorm, residual additions, the sampling head."""
    keep = []
    for node in proto.graph.node:
        module, _ = _innermost_module(node)
        if module.endswith("model.RMSNorm"):
            keep.append(node.name)
        elif module.endswith("model.Layer") and node.op_type == "Add":  # x + attn(...), x + mlp(...)
            keep.append(node.name)
        elif module.endswith(HEAD_MODULES):  # the head; the cache plumbing
            keep.append(node.name)
    return keep


def convert_fp16(proto):
    """FP16 weights and matmuls with RMSNorm, softmax, residual additions and the head's top-K in FP32,
    by onnxconverter-common's float16 converter (it inserts the casts at the boundaries)."""
    import warnings

    from onnxconverter_common import float16

    block = fp32_nodes(proto)
    if not block:
        raise DllmError("the exported graph carries no module metadata; cannot tell which nodes stay in FP32")
    with warnings.catch_warnings():  # one warning per tiny weight flushed to FP16's smallest normal
        warnings.simplefilter("ignore", UserWarning)
        fp16 = float16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=FP32_OPS, node_block_list=block)
    return restore_output_types(fp16, proto)


def restore_output_types(model, reference):
    """Graph outputs keep the reference's dtypes: the converter ends a blocked (FP32) node that feeds a graph
    output with a Cast to FP16, and declares the output FP16; drop such casts and the declaration."""
    from onnx import TensorProto

    want = {o.name: o.type.tensor_type.elem_type for o in reference.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        wanted = want[out.name]
        if out.type.tensor_type.elem_type == wanted:
            continue
        cast = producer.get(out.name)
        if cast is None or cast.op_type != "Cast" or wanted != TensorProto.FLOAT:
            raise DllmError(f"FP16 conversion changed the type of output {out.name}; cannot repair it")
        source = cast.input[0]
        model.graph.node.remove(cast)
        for node in model.graph.node:  # the FP32 value now is the output
            for i, name in enumerate(node.output):
                if name == source:
                    node.output[i] = out.name
            for i, name in enumerate(node.input):
                if name == source:
                    node.input[i] = out.name
        out.type.tensor_type.elem_type = wanted
    return model


def validation_canvases(tokenizer: TextTokenizer, canvas_len: int, n: int, data_dir: str | None) -> tuple[np.ndarray, str]:
    """Canvases for parity and calibration: the data's validation split, or built-in stories."""
    if data_dir:
        manifest = load_manifest(data_dir)
        if manifest["tokenizer_sha256"] != tokenizer.sha256:
            raise DllmError(f"{data_dir} was tokenized with another tokenizer than the checkpoint; pass the model's own data")
        ds = CanvasDataset(data_dir, "val", canvas_len, tokenizer.pad_id)
        idx = np.arange(min(n, len(ds)))
        return ds.batch(idx).astype(np.int32), f"{data_dir} (val)"
    out = np.full((n, canvas_len), tokenizer.pad_id, dtype=np.int32)
    for i in range(n):
        ids = tokenizer.encode(story(10_000_000 + i))[: canvas_len - 1] + [tokenizer.eot_id]
        out[i, : len(ids)] = ids
    return out, "built-in stories"


def bundle_manifest(cfg, tokenizer: TextTokenizer, ckpt: dict, topk: int, precisions: dict, fp32_nodes, canvas_lengths: list[int],
                    reports: dict) -> dict:
    """The bundle manifest of any family (without `files`, which write_bundle adds): the model config with its
    family, the tokenizer's ids, each graph's signature (from GRAPHS: what `dllm build`, the runners and `inspect`
    read), the sampling head, the canvas lengths, the precisions with their files per graph, the nodes kept in FP32,
    where it came from, and the family's reports (parity, calibration)."""
    return {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": cfg.to_dict(), "special_ids": tokenizer.special_ids, "tokenizer_sha256": tokenizer.sha256,
        "graphs": {g: {"inputs": list(spec.inputs), "outputs": list(spec.outputs), "cache": spec.cache}
                   for g, spec in ((g, graph_spec(g, cfg)) for g in model_graphs(cfg))},
        "heads": {"sampling": {"outputs": ["topk_logprobs", "topk_ids"], "k": topk, "dtypes": ["float32", "int32"]}},
        "canvas_lengths": canvas_lengths, "opset": OPSET, "precisions": precisions,
        "fp32_nodes": fp32_nodes,  # kept in FP32 in reduced-precision graphs; the INT8 engine build pins these layers
        "source": {"checkpoint": ckpt["path"], "step": ckpt["step"], "metrics": ckpt.get("metrics", {})},
        **reports,
    }
