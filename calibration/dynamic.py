"""The CPU's INT8 variant (`int8-dynamic`): onnxruntime's dynamic quantization of the weight MatMuls, saved in its
own format. No calibration: activations are quantized per call."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np


def quiet():
    """onnxruntime's quantizer logs and prints per call; keep the export's output readable."""
    logging.getLogger().setLevel(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


def write_dynamic_cpu_variant(fp32_path: Path, out_path: Path, work: Path) -> None:
    """Dynamic INT8 weight MatMuls (per-channel, 7-bit range), saved in onnxruntime's format after basic optimizations.

    `reduce_range`: on x86 cores without VNNI (AVX2, as this project's VM has) onnxruntime multiplies uint8
    activations by int8 weights with an instruction whose 16-bit sums saturate at full 8-bit range; measured on
    SmolLM2-135M's decode graph: top-1 agreement with FP32 2.5% over the export's parity calls at full range,
    25/28 on real text at 7 bits. ARM and VNNI cores lose one bit of weight precision to it."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dynamic = work / "dynamic.onnx"
    model = onnx.load(str(fp32_path))
    fold_weight_transposes(model)  # the tied head, quantized like every other weight
    with quiet():
        quantize_dynamic(model, str(dynamic), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable across CPUs
    options.optimized_model_filepath = str(out_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    ort.InferenceSession(str(dynamic), options, providers=["CPUExecutionProvider"])


def fold_weight_transposes(model) -> int:
    """Give each MatMul whose weight arrives as Transpose(initializer) the transposed matrix as its own initializer.

    A tied head multiplies by the embedding's matrix through a Transpose, so the dynamic quantizer (constant weights
    only) left it in FP32: on SmolLM2-135M the 49,154 x 576 head, a third of what a decode step reads. The copy costs
    the head's size once more in the graph the quantizer reads; the embedding's Gather keeps the original. Returns
    how many MatMuls now read a constant weight; Transposes left unread are removed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    folded = 0
    for node in model.graph.node:
        t = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
        weight = numpy_helper.to_array(inits[t.input[0]])
        if weight.ndim != 2 or (perm and perm[0] != [1, 0]):
            continue
        name = f"{t.input[0]}.transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            model.graph.initializer.append(inits[name])
        node.input[1] = name
        folded += 1
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Transpose" and not any(o in read for o in n.output)]
    for n in dead:
        model.graph.node.remove(n)
    return folded
