"""The canvas graph's export (masked diffusion): a checkpoint becomes a bundle with FP32 / FP16 (/ INT8) graphs and a
parity report.

The graph is the one TensorRT 10.3 must parse and fuse: input `tokens` int32 (batch, canvas), both
dimensions dynamic; opset 18 from the dynamo exporter; attention as MatMul -> Softmax -> MatMul with Q
pre-scaled; RMSNorm as primitive ops; no com.microsoft ops. Outputs: `logits` (full head) and
`topk_logprobs` / `topk_ids` (sampling head, computed in the graph), over the same weights. TensorRT
engines mark only the sampling outputs, so the logits never leave the GPU when running.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration.quantize import quantize_bundle
from jetson_dllm.bundle import Bundle, entry_files, entry_of, write_bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.parity import compare_runners, probe_conditions, summarize
from jetson_dllm.precisions import PRECISIONS
from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs
from jetson_dllm.runners.torch_runner import TorchRunner
from jetson_dllm.tokenizer import TextTokenizer
from train_host.families import ExportOptions
from train_host.model import Denoiser
from train_host.onnx_tools import bundle_manifest, check_graph, convert_fp16, export_graph, fp32_nodes, validation_canvases

PARITY_RATIOS = (0.15, 0.5, 0.9)
ENCODER_FILES = {"fp32": "encoder.onnx", "fp16": "encoder.fp16.onnx"}  # INT8 entries run the FP32 encoder (once a request)
# FP32 parity must hold this well, or the export fails.
FP32_MAX_LOGIT_DIFF = 1e-2
FP32_MIN_TOP1 = 0.999


def export_onnx(model: Denoiser, path: Path, k: int) -> None:
    """Write the FP32 canvas graph of `model` with dynamic batch and canvas axes (its inputs, outputs and axes from
    the graph's signature: onnx_tools.export_graph)."""
    _export_checked(model, "canvas", k, path)


def export_encoder(model: Denoiser, path: Path) -> None:
    """Write a conditional model's FP32 encoder graph, batch dynamic."""
    _export_checked(model, "encoder", 1, path)


def _export_checked(model: Denoiser, graph: str, k: int, path: Path) -> None:
    import onnx

    export_graph(model, graph, k, path)
    proto = onnx.load(str(path))
    check_graph(proto, str(path))
    onnx.save(proto, str(path))


def write_encoders(model: Denoiser, tmp: Path, entries: dict, say) -> None:
    """A conditional model's encoder (run once per request) beside its denoising graphs: FP32, and FP16 for an FP16
    entry; each entry of `entries` (precision -> files) gets its `encoder`. Nothing for a model without a condition."""
    import onnx

    if not model.cfg.cond_len:
        return
    say("exporting the condition encoder")
    export_encoder(model, tmp / ENCODER_FILES["fp32"])
    entries["fp32"]["encoder"] = ENCODER_FILES["fp32"]
    if "fp16" in entries:
        onnx.save(convert_fp16(onnx.load(str(tmp / ENCODER_FILES["fp32"]))), str(tmp / ENCODER_FILES["fp16"]))
        entries["fp16"]["encoder"] = ENCODER_FILES["fp16"]


def entry_graphs(folder: Path, entry: dict, cfg) -> dict[str, Path]:
    """A precision entry's graph files (the canvas graph, and a conditional model's encoder)."""
    return {graph: folder / name for graph, name in entry_files(cfg, entry).items()}


def encoder_parity(model: Denoiser, graphs: dict[str, dict[str, Path]], canvases: np.ndarray, pad_id: int) -> dict[str, float]:
    """Each precision's encoder graph (`graphs`: precision -> its graph files, the encoder's among them) against
    PyTorch on conditions cut from the parity canvases (`probe_conditions`, about half empty): the largest |difference|
    of the encoding (memory). FP32 must agree within the canvas graph's own tolerance."""
    feeds = probe_conditions(canvases, pad_id, model.cfg.cond_len)
    with TorchRunner(model) as reference:
        ref = reference.run("encoder", feeds)["memory"]
    out = {}
    for precision, files in graphs.items():
        with onnx_runner_from_graphs(files, model.cfg, precision) as runner:
            out[precision] = float(np.abs(runner.run("encoder", feeds)["memory"] - ref).max())
    if not out["fp32"] <= FP32_MAX_LOGIT_DIFF:
        raise DllmError(f"the FP32 encoder graph disagrees with PyTorch (max difference {out['fp32']:.2e}); nothing was written")
    return out


def parity_report(model: Denoiser, runners: dict, canvases: np.ndarray, mask_id: int, pad_id: int) -> dict:
    """Per precision and mask ratio, each ONNX runner's logits against the PyTorch model's."""
    with TorchRunner(model) as reference:
        rows = compare_runners(reference, runners, canvases, PARITY_RATIOS, mask_id, pad_id, batch=len(canvases))
    return {precision: summarize(by_ratio) for precision, by_ratio in rows.items()}


def export_canvas_bundle(model: Denoiser, tokenizer: TextTokenizer, ckpt: dict, out_dir, options: ExportOptions) -> Bundle:
    """A bundle of the canvas graph (masked diffusion): FP32, FP16, INT8 Q/DQ with its calibration, and parity of
    every precision against PyTorch (refused, writing nothing, if FP32 disagrees)."""
    cfg, topk, precisions, int8, say, data_dir = model.cfg, options.topk, options.precisions, options.int8, options.say, options.data_dir
    parity_canvases = options.parity_canvases
    if cfg.soft_k > topk:
        raise DllmError(f"--topk {topk} is fewer than the {cfg.soft_k} candidates this model self-conditions on; export with --topk {cfg.soft_k} or more")

    def build(tmp: Path) -> dict:
        manifest = write_graphs(tmp, model, tokenizer, ckpt, precisions, topk, say)
        if "int8" in precisions:
            canvases, source = validation_canvases(tokenizer, int8.canvas_len or cfg.canvas_len,
                                                   int8.n_canvases + int8.eval_canvases, data_dir)
            manifest["calibration"] = quantize_bundle(tmp, manifest, canvases, source, tokenizer.sha256, int8, progress=say)
            encoder = {"encoder": ENCODER_FILES["fp32"]} if cfg.cond_len else {}
            manifest["precisions"]["int8"] = entry_of(cfg, {"canvas": PRECISIONS["int8"].file, **encoder}, target="tensorrt (explicit Q/DQ)")
            manifest["precisions"]["int8-dynamic"] = entry_of(cfg, {"canvas": PRECISIONS["int8-dynamic"].file, **encoder}, target="onnxruntime CPU")
        say("checking parity against PyTorch")
        canvases, source = validation_canvases(tokenizer, cfg.canvas_len, parity_canvases, data_dir)
        runners = {p: onnx_runner_from_graphs(entry_graphs(tmp, entry, cfg), cfg, p, tokenizer=tokenizer) for p, entry in manifest["precisions"].items()}
        parity = parity_report(model, runners, canvases, cfg.mask_id, tokenizer.pad_id)
        for r in runners.values():
            r.close()
        parity["source"] = source
        fp32_row = parity["fp32"]
        if not (fp32_row["max_abs_logit_diff"] <= FP32_MAX_LOGIT_DIFF and fp32_row["top1_agreement"] >= FP32_MIN_TOP1):
            raise DllmError(f"FP32 parity with PyTorch is broken (max logit diff {fp32_row['max_abs_logit_diff']:.2e}, "
                            f"top-1 agreement {fp32_row['top1_agreement']:.4f}); nothing was written")
        manifest["parity"] = parity
        if cfg.cond_len:  # the encoder graph against PyTorch (its output feeds every canvas call of a request)
            files = {p: entry_graphs(tmp, entry, cfg) for p, entry in manifest["precisions"].items()}
            manifest["encoder_parity"] = encoder_parity(model, files, canvases, tokenizer.pad_id)
        return manifest

    return write_bundle(out_dir, build, overwrite=options.overwrite)


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
    entries = {p: entry_of(cfg, {"canvas": files[p]}) for p in ("fp32", "fp16") if p in precisions or p == "fp32"}
    write_encoders(model, tmp, entries, say)
    manifest = bundle_manifest(cfg, tokenizer, ckpt, topk, entries, fp32_nodes(fp32), cfg.canvas_buckets(), {})
    manifest["heads"]["logits"] = {"outputs": ["logits"], "shape": ["batch", "canvas", cfg.vocab_size], "dtype": "float32"}
    return manifest
