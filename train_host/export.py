"""ONNX export: a checkpoint becomes a bundle with FP32 / FP16 (/ INT8) graphs and a parity report.

The graph is the one TensorRT 10.3 must parse and fuse: input `tokens` int32 (batch, canvas), both
dimensions dynamic; opset 18 from the dynamo exporter; attention as MatMul -> Softmax -> MatMul with Q
pre-scaled; RMSNorm as primitive ops; no com.microsoft ops. Outputs: `logits` (full head) and
`topk_logprobs` / `topk_ids` (sampling head, computed in the graph), over the same weights. TensorRT
engines mark only the sampling outputs, so the logits never leave the GPU when running.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from calibration.quantize import Int8Options, quantize_bundle
from jetson_dllm.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, Bundle, write_bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.parity import compare_runners, summarize
from jetson_dllm.precisions import PRECISIONS
from jetson_dllm.runners.onnx_runner import onnx_runner_from_file
from jetson_dllm.runners.torch_runner import DEFAULT_TOPK, MAX_TOPK, TorchRunner
from jetson_dllm.tokenizer import TextTokenizer
from train_host.checkpoint import load_model
from train_host.corpus import story
from train_host.data import CanvasDataset, load_manifest
from train_host.model import Denoiser, topk_logprobs

OPSET = 18  # TensorRT 10.3 parses 9-20; the dynamo exporter's lowest
PARITY_RATIOS = (0.15, 0.5, 0.9)
# FP16 graphs keep these in FP32: the softmax, and (by module, below) RMSNorm, the residual stream, the head's top-K.
FP32_OPS = ["Softmax", "TopK", "ReduceLogSumExp"]
# FP32 parity must hold this well, or the export fails.
FP32_MAX_LOGIT_DIFF = 1e-2
FP32_MIN_TOP1 = 0.999


class ExportedDenoiser(torch.nn.Module):
    """The exported graph: tokens -> (logits, top-K log-probabilities, top-K ids)."""

    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens: torch.Tensor):
        logits = self.model(tokens)
        values, ids = topk_logprobs(logits, self.k)
        return logits, values, ids


def export_onnx(model: Denoiser, path: Path, k: int) -> None:
    """Write the FP32 graph of `model` with dynamic batch and canvas axes."""
    import onnx

    model = model.eval()
    model.set_attention("math")
    cfg = model.cfg
    example = torch.randint(3, cfg.vocab_size, (2, min(24, cfg.canvas_len)), dtype=torch.int32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    canvas = torch.export.Dim("canvas", min=2, max=cfg.canvas_len)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(
            ExportedDenoiser(model, k).eval(), (example,), str(path), input_names=["tokens"],
            output_names=["logits", "topk_logprobs", "topk_ids"], dynamic_shapes={"tokens": {0: batch, 1: canvas}},
            opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
        )
    model.set_attention("sdpa")
    proto = onnx.load(str(path))
    check_graph(proto, str(path))
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet_exporter():
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


def fp32_nodes(proto) -> list[str]:
    """Nodes an FP16 graph keeps in FP32: RMSNorm, residual additions, the sampling head."""
    keep = []
    for node in proto.graph.node:
        module, _ = _innermost_module(node)
        if module.endswith("model.RMSNorm"):
            keep.append(node.name)
        elif module.endswith("model.Block") and node.op_type == "Add":  # x + attn(...), x + mlp(...)
            keep.append(node.name)
        elif module.endswith(("export.ExportedDenoiser", "bd3_export.BlockStep", "bd3_export.Commit", "ar_export.Decode")):  # the head; the cache plumbing
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


def parity_report(model: Denoiser, runners: dict, canvases: np.ndarray, mask_id: int, pad_id: int) -> dict:
    """Per precision and mask ratio, each ONNX runner's logits against the PyTorch model's."""
    with TorchRunner(model) as reference:
        rows = compare_runners(reference, runners, canvases, PARITY_RATIOS, mask_id, pad_id, batch=len(canvases))
    return {precision: summarize(by_ratio) for precision, by_ratio in rows.items()}


def check_int8_budget(calibration: dict | None, options: Int8Options) -> None:
    """After an export: an INT8 model over its accuracy budget is an error unless it was accepted."""
    c = calibration
    if c and not c["within_budget"] and not options.allow_over_budget:
        raise DllmError(f"INT8 loses {c['accuracy_drop_points']:.2f} points of masked-token accuracy, over the {options.budget:g}-point budget, "
                        f"even with {len(c['excluded'])} layers kept in FP32; the best INT8 model is in the bundle: accept it with "
                        "--allow-over-budget, or raise --int8-budget")


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


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    topk: int = DEFAULT_TOPK,
    data_dir: str | None = None,
    parity_canvases: int = 16,
    overwrite: bool = False,
    int8: Int8Options | None = None,
    progress=None,
) -> Bundle:
    """Export a checkpoint to a bundle; fails (writing nothing) if FP32 parity with PyTorch is broken."""
    say = progress or (lambda msg: None)
    unknown = set(precisions) - {p.name for p in PRECISIONS.values() if p.exported}
    if unknown:
        raise DllmError(f"unknown precision {sorted(unknown)}; choose from fp32, fp16, int8")
    if parity_canvases < 1:
        raise DllmError(f"--parity-canvases must be positive, got {parity_canvases}")
    int8 = int8 or Int8Options()
    model, tokenizer, ckpt = load_model(checkpoint)
    cfg = model.cfg
    if "int8" in precisions:
        int8.validate(cfg.canvas_len)
    if cfg.causal:  # the autoregressive baseline: its decode graph with a KV cache
        if "int8" in precisions:
            raise DllmError("the autoregressive baseline exports FP32 and FP16 decode graphs; drop --int8")
        from train_host.ar_export import export_ar_bundle

        return export_ar_bundle(model, tokenizer, ckpt, out_dir, topk, overwrite, say, precisions)
    if cfg.block_size:  # block diffusion: the block-step and commit graphs
        from train_host.bd3_export import export_bd3_bundle

        calib = (lambda n: validation_canvases(tokenizer, cfg.canvas_len, n, data_dir)) if "int8" in precisions else None
        return export_bd3_bundle(model, tokenizer, ckpt, out_dir, topk, overwrite, say, precisions, calib, int8)
    if not 1 <= topk <= min(MAX_TOPK, cfg.vocab_size - 1):
        raise DllmError(f"--topk must be in 1..{min(MAX_TOPK, cfg.vocab_size - 1)} (TensorRT's TopK takes K < 3840), got {topk}")

    def build(tmp: Path) -> dict:
        manifest = write_graphs(tmp, model, tokenizer, ckpt, precisions, topk, say)
        if "int8" in precisions:
            canvases, source = validation_canvases(tokenizer, int8.canvas_len or cfg.canvas_len,
                                                   int8.n_canvases + int8.eval_canvases, data_dir)
            manifest["calibration"] = quantize_bundle(tmp, manifest, canvases, source, tokenizer.sha256, int8, progress=say)
            manifest["precisions"]["int8"] = {"file": PRECISIONS["int8"].file, "target": "tensorrt (explicit Q/DQ)"}
            manifest["precisions"]["int8-dynamic"] = {"file": PRECISIONS["int8-dynamic"].file, "target": "onnxruntime CPU"}
        say("checking parity against PyTorch")
        canvases, source = validation_canvases(tokenizer, cfg.canvas_len, parity_canvases, data_dir)
        runners = {p: onnx_runner_from_file(tmp / entry["file"], cfg, p, tokenizer=tokenizer) for p, entry in manifest["precisions"].items()}
        parity = parity_report(model, runners, canvases, cfg.mask_id, tokenizer.pad_id)
        for r in runners.values():
            r.close()
        parity["source"] = source
        fp32_row = parity["fp32"]
        if not (fp32_row["max_abs_logit_diff"] <= FP32_MAX_LOGIT_DIFF and fp32_row["top1_agreement"] >= FP32_MIN_TOP1):
            raise DllmError(f"FP32 parity with PyTorch is broken (max logit diff {fp32_row['max_abs_logit_diff']:.2e}, "
                            f"top-1 agreement {fp32_row['top1_agreement']:.4f}); nothing was written")
        manifest["parity"] = parity
        return manifest

    return write_bundle(out_dir, build, overwrite=overwrite)


def write_graphs(tmp: Path, model: Denoiser, tokenizer: TextTokenizer, ckpt: dict, precisions, topk: int, say) -> dict:
    """The FP32 graph (and the FP16 one), the tokenizer, and the bundle's manifest for them (hashes come later)."""
    import onnx

    cfg = model.cfg
    files = {p: PRECISIONS[p].file for p in ("fp32", "fp16")}
    say("exporting the FP32 graph")
    export_onnx(model, tmp / files["fp32"], topk)
    tokenizer.save(tmp / "tokenizer.json")
    fp32 = onnx.load(str(tmp / files["fp32"]))
    if "fp16" in precisions:
        say("converting to FP16 (RMSNorm, softmax, residuals and top-K stay FP32)")
        fp16 = convert_fp16(fp32)
        check_graph(fp16, files["fp16"])
        onnx.save(fp16, str(tmp / files["fp16"]))
    return {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": cfg.to_dict(),
        "special_ids": tokenizer.special_ids,
        "tokenizer_sha256": tokenizer.sha256,
        "inputs": {"tokens": {"dtype": "int32", "shape": ["batch", "canvas"]}},
        "heads": {
            "logits": {"outputs": ["logits"], "shape": ["batch", "canvas", cfg.vocab_size], "dtype": "float32"},
            "sampling": {"outputs": ["topk_logprobs", "topk_ids"], "k": topk, "dtypes": ["float32", "int32"]},
        },
        "canvas_lengths": cfg.canvas_buckets(),
        "opset": OPSET,
        "precisions": {p: {"file": files[p]} for p in ("fp32", "fp16") if p in precisions or p == "fp32"},
        # Nodes kept in FP32 in reduced-precision graphs; the INT8 engine build pins these layers.
        "fp32_nodes": fp32_nodes(fp32),
        "source": {"checkpoint": ckpt["path"], "step": ckpt["step"], "metrics": ckpt.get("metrics", {})},
    }
