"""INT8 post-training quantization: explicit Q/DQ for TensorRT, an accuracy budget, a CPU variant.

The quantizer is onnxruntime's `quantize_static` (QDQ format), not NVIDIA ModelOpt: ModelOpt's ONNX PTQ is
built on this same quantizer, but pins its own onnx/onnxruntime versions and its current defaults (FP16
high precision, DQ-only weight folding) target TensorRT releases newer than JetPack 6's 10.3. We set the
options TensorRT's explicit quantization needs ourselves:

    symmetric INT8 activations and weights (zero points 0), per-channel weights along the output-feature
    axis (axis 1 of a MatMul's [K, N] weight), per-tensor activations, only MatMuls whose second input is
    a weight (the attention BMMs, norms, softmax, residual adds and the embedding Gather stay FP), default
    domain Q/DQ only.

Calibration runs once; its ranges are cached (onnxruntime's calibration_cache_path), so finding which
layers must stay in higher precision re-quantizes without recalibrating. For the CPU backend a second
variant is written: dynamic INT8 MatMuls (activations quantized per call), which onnxruntime runs faster
on CPUs than static Q/DQ. It is stored in onnxruntime's own format (.ort), since it is not for TensorRT.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration.data import CalibrationReader, load_recorded, stratified_masking
from calibration.dynamic import quiet, write_dynamic_cpu_variant
from calibration.report import BUCKETS, mean_accuracy_drop
from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.parity import compare_runners, extra_feeds
from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs

METHODS = ("minmax", "entropy", "percentile")
EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "MatMulConstBOnly": True,
    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
    "CalibPercentile": 99.999,
    "UseQDQContribOps": False,
}
MAX_EXCLUDED_SHARE = 0.5  # past this, the "INT8" model is mostly not INT8: report over budget instead


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in METHODS:
        raise DllmError(f"unknown --calib-method {method!r}; choose one of: {', '.join(METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[method]


@dataclass(frozen=True)
class Int8Options:
    """How `dllm export --int8` calibrates and quantizes; `validate` refuses a bad setting before any work.

    Args:
        n_canvases: calibration canvases, masked at ratios stratified over (0, 1].
        eval_canvases: held-out canvases the accuracy drop is measured on.
        canvas_len: calibration canvas length; 0 = the model's canvas.
        method: minmax | entropy | percentile.
        budget: allowed loss of masked-token accuracy, in points, averaged over noise levels.
        allow_over_budget: keep the best model found when no exclusion set meets the budget.
        extra_file: canvases recorded by `dllm run --save-canvases` (.npz), added to the calibration set.
        seed: masking seed.
    """

    n_canvases: int = 64
    eval_canvases: int = 32
    canvas_len: int = 0
    method: str = "minmax"
    budget: float = 1.0
    allow_over_budget: bool = False
    extra_file: str | None = None
    seed: int = 0

    def validate(self, model_canvas_len: int | None = None) -> None:
        _ort_method(self.method)
        if not self.budget >= 0:  # NaN fails too
            raise DllmError(f"--int8-budget must not be negative (nor NaN), got {self.budget}")
        if self.n_canvases < 1:
            raise DllmError(f"--calib-canvases must be positive, got {self.n_canvases}")
        if self.eval_canvases < 1:
            raise DllmError(f"INT8 evaluation canvases must be positive, got {self.eval_canvases}")
        if self.canvas_len < 0 or (model_canvas_len is not None and self.canvas_len > model_canvas_len):
            limit = f"1..{model_canvas_len}" if model_canvas_len else "positive"
            raise DllmError(f"--calib-canvas-len {self.canvas_len} must be {limit} (the model's canvas), or 0")


def quantizable_nodes(model) -> list[str]:
    """MatMul nodes whose second input is a weight (initializer): what gets INT8. Gemm nodes stay FP32: the exporter
    writes them only for 2-D inputs, the time embedding of SDD and continuous models (a row per sequence, not per
    token: nothing to gain), whose quantized bias would be INT32 and whose transposed weight quantizes on the wrong
    axis, both refused by TensorRT's Q/DQ rules. Nor a MatMul whose weight another kind of node also reads (continuous
    diffusion's latent table: gathered for the prompt and multiplied for the expected latent; one per-channel weight
    may feed only weight MatMuls)."""
    weights = {i.name for i in model.graph.initializer}
    shared = {i for n in model.graph.node if n.op_type != "MatMul" for i in n.input if i in weights}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and n.input[1] not in shared]


def quantize(pre_path: Path, out_path: Path, reader: CalibrationReader | None, method: str, exclude: list[str], cache: Path) -> None:
    """Static symmetric Q/DQ of the weight MatMuls, all but `exclude`; ranges from `cache` once computed.

    Only the inputs of the weight MatMuls are quantized; no op's output is (TensorRT fuses a following Q
    itself where it pays, and an INT8 tensor in front of a softmax or a residual add costs accuracy)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if reader is not None:
        reader.rewind()
    model = onnx.load(str(pre_path))
    extra = dict(EXTRA_OPTIONS)
    extra["OpTypesToExcludeOutputQuantization"] = sorted({n.op_type for n in model.graph.node})
    # The node list, not MatMulConstBOnly alone: onnxruntime's QDQ path quantizes the attention BMMs without it.
    nodes = [n for n in quantizable_nodes(model) if n not in exclude]
    with quiet():
        quantize_static(
            str(pre_path), str(out_path), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
            nodes_to_exclude=exclude, calibrate_method=_ort_method(method), extra_options=extra, calibration_cache_path=str(cache),
        )


def quantize_bundle(bundle_dir: Path, manifest: dict, canvases: np.ndarray, source: str, tokenizer_sha256: str,
                    options: Int8Options, progress=None) -> dict:
    """Write model.int8.onnx (and model.int8-dynamic.ort) into a bundle being built; returns the report.

    `canvases` are clean validation canvases (`options.n_canvases + options.eval_canvases` of them if the
    data holds that many): the first calibrate, the rest measure the accuracy drop. If no exclusion set (up
    to half the quantizable layers) meets the budget (points of masked-token accuracy averaged over noise
    levels), the best model found is kept and the report says so; the caller decides whether that is an
    error (`within_budget`).
    """
    say = progress or (lambda msg: None)
    cfg = ModelConfig.from_dict(manifest["model"])
    options.validate(cfg.canvas_len)
    mask_id, pad_id = manifest["special_ids"]["mask"], manifest["special_ids"]["pad"]
    calib, held_out, overlap = _split(canvases, options)
    calib_set = list(stratified_masking(calib, mask_id, pad_id, options.seed))
    recorded = 0
    if options.extra_file:
        extra = load_recorded(options.extra_file, tokenizer_sha256, cfg.vocab_size, cfg.canvas_len)
        calib_set += list(extra)
        recorded = len(extra)
    fp32_path = bundle_dir / manifest["precisions"]["fp32"]["file"]
    reader = CalibrationReader(calib_set, _extra_feeds(fp32_path, cfg, calib, calib_set, pad_id, options.seed)
                               if cfg.soft_k or family_of(cfg).canvas_inputs or cfg.cond_len else None)
    fp16_path = bundle_dir / manifest["precisions"]["fp16"]["file"] if "fp16" in manifest["precisions"] else None
    t0 = time.time()
    work = bundle_dir / ".int8-work"
    work.mkdir(exist_ok=True)
    try:
        search, nodes, report = _quantize_and_measure(fp32_path, fp16_path, bundle_dir, work, reader, held_out, cfg,
                                                      pad_id, options, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    final_drop = mean_accuracy_drop(report["int8"])
    return {
        "method": options.method,
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ, symmetric, per-channel weights)",
        "source": source,
        "calibration_canvases": len(reader),
        "recorded_canvases": recorded,
        "eval_canvases": int(len(held_out)),
        "calibration_overlaps_eval": overlap,
        "quantizable": len(nodes),
        "quantized": len(nodes) - len(search["excluded"]),
        "excluded": search["excluded"],
        "sensitivity_points": search["sensitivity"],
        "trajectory": search["trajectory"],
        "accuracy_drop_points": final_drop,
        "search_drop_points": search["drop"],
        "budget_points": options.budget,
        "within_budget": bool(final_drop <= options.budget),
        "allow_over_budget": options.allow_over_budget,
        "seconds": round(time.time() - t0, 1),
        "report": report,
    }


def _runner(path: Path, cfg: ModelConfig, precision: str = "fp32", encoder_dir: Path | None = None):
    """A canvas graph on onnxruntime; a conditional model's with its FP32 encoder (in `encoder_dir`, else beside it)."""
    graphs = {"canvas": Path(path)}
    if cfg.cond_len:
        graphs["encoder"] = Path(encoder_dir or Path(path).parent) / "encoder.onnx"
    return onnx_runner_from_graphs(graphs, cfg, precision)


def _extra_feeds(fp32_path: Path, cfg: ModelConfig, clean: np.ndarray, masked: list[np.ndarray], pad_id: int, seed: int):
    """The calibration canvases' other inputs, computed once per canvas (`parity.extra_feeds`): a sparse-distribution
    model's candidates at the canvas's noise level, a self-conditioned model's own previous prediction (the FP32
    graph's top-k on the canvas, what the sampler feeds the next step). Recorded canvases (--calib-file) have no
    clean text behind them: they get the FP32 graph's prediction, or for SDD are refused before any work."""
    ref = _runner(fp32_path, cfg)
    truth = {m.tobytes(): c for m, c in zip(masked, clean)}
    memo: dict[bytes, dict] = {}

    def feeds(tokens: np.ndarray) -> dict[str, np.ndarray]:
        key = tokens.tobytes()
        if key not in memo:
            c = truth.get(key, tokens.reshape(-1))[None]
            memo[key] = {n: np.array(v, copy=True) for n, v in extra_feeds(ref, c, tokens, cfg.mask_id, pad_id, seed).items()}
        return memo[key]

    return feeds


def _split(canvases: np.ndarray, options: Int8Options) -> tuple[np.ndarray, np.ndarray, bool]:
    """(calibration canvases, held-out canvases, whether they overlap): half and half when the data is short."""
    overlap = len(canvases) < options.n_canvases + options.eval_canvases
    calib = canvases[: options.n_canvases] if not overlap else canvases[: max(len(canvases) // 2, 1)]
    held_out = canvases[len(calib):] if len(canvases) > len(calib) else canvases
    return calib, held_out, bool(overlap and len(canvases) <= len(calib))


def _quantize_and_measure(fp32_path: Path, fp16_path: Path | None, bundle_dir: Path, work: Path, reader, held_out: np.ndarray,
                          cfg: ModelConfig, pad_id: int, options: Int8Options, say) -> tuple[dict, list[str], dict]:
    """Search the exclusion set, write the final INT8 graph and the CPU variant, and report them against FP32."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    say("INT8: preparing the graph for quantization")
    with quiet():
        # onnx shape inference and ORT's basic (portable, default-domain) graph optimizations, which fold
        # the tied head's Transpose into a constant so the head counts as a weight MatMul. ORT's symbolic
        # shape inference is skipped: it fails on the exporter's dynamic Reshape/Concat shapes.
        quant_pre_process(str(fp32_path), str(pre), skip_optimization=False, skip_symbolic_shape=True)
    nodes = quantizable_nodes(onnx.load(str(pre)))
    if not nodes:
        raise DllmError("no weight MatMuls to quantize in the exported graph")
    cache = work / f"ranges-{options.method}.json"
    ref = _runner(fp32_path, cfg)

    def drop_of(exclude: list[str], tag: str) -> float:
        path = work / f"{tag}.onnx"
        quantize(pre, path, reader, options.method, exclude, cache)
        with _runner(path, cfg, "int8", fp32_path.parent) as q:
            rows = compare_runners(ref, {"q": q}, held_out, BUCKETS, cfg.mask_id, pad_id, options.seed + 1)["q"]
        return mean_accuracy_drop(rows)

    say(f"INT8: calibrating ({options.method}, {len(reader)} canvases) and quantizing {len(nodes)} matmuls")
    search = search_exclusions(nodes, drop_of, options.budget, progress=say)
    final = bundle_dir / "model.int8.onnx"
    quantize(pre, final, reader, options.method, search["excluded"], cache)
    onnx.checker.check_model(str(final), full_check=True)
    problems = qdq_problems(onnx.load(str(final)))
    if problems:
        raise DllmError(f"the INT8 graph breaks TensorRT's Q/DQ rules: {problems[0]}")
    say("INT8: the CPU variant (dynamic INT8 matmuls, onnxruntime format)")
    write_dynamic_cpu_variant(fp32_path, bundle_dir / "model.int8-dynamic.ort", work)
    runners = {"int8": _runner(final, cfg, "int8", fp32_path.parent)}
    if fp16_path is not None:
        runners["fp16"] = _runner(fp16_path, cfg, "fp16", fp32_path.parent)
    with ref:
        report = compare_runners(ref, runners, held_out, BUCKETS, cfg.mask_id, pad_id, options.seed + 2)
    for r in runners.values():
        r.close()
    return search, nodes, report


def search_exclusions(nodes: list[str], drop_of, budget: float, max_share: float = MAX_EXCLUDED_SHARE, progress=None) -> dict:
    """Which layers to keep out of INT8 so the accuracy drop (points) meets `budget`.

    `drop_of(exclude, tag)` quantizes all but `exclude` and measures the drop. If quantizing everything
    is over budget, each layer's own effect is measured (quantizing that layer alone), and layers are
    kept in higher precision, most sensitive first, until the budget holds or `max_share` of them are
    out. Returns the best set found, its drop, the per-layer sensitivities and the path taken.
    """
    say = progress or (lambda msg: None)
    drop = drop_of([], "all")
    trajectory = [{"excluded": 0, "accuracy_drop_points": drop}]
    sensitivity: dict[str, float] = {}
    best = (drop, [])
    if drop > budget:
        say(f"INT8: {drop:.2f} points below FP32 > budget {budget:g}: measuring each layer's effect")
        for i, node in enumerate(nodes):
            sensitivity[node] = drop_of([n for n in nodes if n != node], f"only-{i}")
        excluded: list[str] = []
        for node in sorted(nodes, key=lambda n: -sensitivity[n])[: int(len(nodes) * max_share)]:
            excluded.append(node)
            drop = drop_of(list(excluded), f"excl-{len(excluded)}")
            trajectory.append({"excluded": len(excluded), "node": node, "accuracy_drop_points": drop})
            if drop < best[0]:
                best = (drop, list(excluded))
            if drop <= budget:
                break
    return {"drop": best[0], "excluded": best[1], "sensitivity": sensitivity, "trajectory": trajectory}


def qdq_problems(model) -> list[str]:
    """TensorRT's explicit-quantization rules: int8 zero points of 0, positive constant scales, per-channel
    scales only on weights along the output-feature axis, default-domain Q/DQ."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{n.name}: {n.op_type} in domain {n.domain}")
        scale = consts.get(n.input[1])
        if scale is None:
            problems.append(f"{n.name}: scale is not a constant")
            continue
        if np.any(scale <= 0):
            problems.append(f"{n.name}: non-positive scale")
        zp = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and (zp.dtype != np.int8 or np.any(zp != 0)):
            problems.append(f"{n.name}: zero point must be int8 0, is {zp.dtype} {np.unique(zp)[:3]}")
        if zp is None and n.op_type == "QuantizeLinear":
            problems.append(f"{n.name}: no zero point (would quantize to uint8)")
        if scale.ndim == 1 and scale.size > 1:
            weight = n.input[0] if n.op_type == "QuantizeLinear" else None
            if n.op_type == "DequantizeLinear":  # per-channel DQ: its input must come from a weight's Q (or be one)
                weight = next((q.input[0] for q in model.graph.node if q.op_type == "QuantizeLinear" and q.output[0] == n.input[0]), n.input[0])
            if weight not in consts:
                problems.append(f"{n.name}: per-channel scale on an activation")
                continue
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            w = consts[weight]
            if w.ndim != 2 or axis not in (1, -1) or w.shape[1] != scale.size:
                problems.append(f"{n.name}: per-channel axis {axis} is not the output features of a {w.shape} weight")
            users = [c.op_type for c in consumers.get(n.output[0], [])]
            if n.op_type == "DequantizeLinear" and users and set(users) - {"MatMul", "Gemm"}:
                problems.append(f"{n.name}: per-channel weight feeds {users}")
    return problems
