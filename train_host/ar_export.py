"""The autoregressive baseline's graph: one *decode* step with its KV cache, so the baseline runs on the same runtime
(onnxruntime, TensorRT) as the diffusion models it is compared with.

    decode  tokens (B, 1) int32, k_cache and v_cache (n_layer, B, heads, max_len, head_dim) float32, valid_len (B,) int32 (each row's own)
            ->  topk_logprobs, topk_ids (B, 1, K) of the next token, and k_new, v_new (n_layer, B, heads, 1, head_dim)
            of the token read: one pass per token, its keys and values written into the cache at valid_len by the
            runner, in place (what block diffusion's block-step and commit graphs do in two passes, fused).

The prompt is read through the same graph, one token per pass. The same layers as the model's (train_host.graph_modules).
"""

from __future__ import annotations

from pathlib import Path

from train_host.model import Denoiser


def export_decode_graph(model: Denoiser, path: Path, k: int, opset: int) -> None:
    from train_host.onnx_tools import export_graph

    export_graph(model, "decode", k, path, opset)


PARITY_TOKENS = 256  # positions decode parity reads (an imported model's context can be thousands)


def decode_parity(model: Denoiser, path: Path, k: int, precision: str = "fp32", batch: int = 2, seed: int = 0) -> dict:
    """The decode graph on the onnxruntime runner against the torch runner, token by token over random text, each
    over its own cache (jetson_dllm.parity.compare_calls)."""
    import numpy as np

    from jetson_dllm.parity import compare_calls
    from jetson_dllm.runners.calls import Call
    from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs
    from jetson_dllm.runners.torch_runner import TorchRunner

    cfg = model.cfg
    x = np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, cfg.canvas_len)).astype(np.int32)
    n = min(cfg.canvas_len, PARITY_TOKENS)
    calls = [Call("decode", {"tokens": x[:, i : i + 1], "valid_len": np.int32(i)}) for i in range(n)]
    with TorchRunner(model, topk=k) as reference, onnx_runner_from_graphs({"decode": path}, cfg, precision) as runner:
        return compare_calls(reference, {precision: runner}, calls)[precision]


def export_ar_bundle(model: Denoiser, tokenizer, ckpt: dict, out_dir, topk: int, overwrite: bool, say, precisions=("fp32",)):
    """A bundle of the autoregressive baseline: the decode graph (FP32, and FP16 with the usual FP32 islands), the
    tokenizer, a manifest and the graph's parity with the torch model (refused, writing nothing, if FP32 disagrees);
    with "int8" in `precisions`, the dynamic INT8 variant for onnxruntime's CPU provider (INT8 weights of every
    MatMul with a constant weight; the tied head stays FP32; slower than FP32 on an AVX2 core without VNNI,
    docs/import.md)."""
    import shutil

    import onnx

    from calibration.dynamic import write_dynamic_cpu_variant
    from jetson_dllm.bundle import entry_files, entry_of, write_bundle
    from jetson_dllm.errors import DllmError
    from train_host.onnx_tools import OPSET, bundle_manifest, check_graph, convert_fp16, fp32_nodes

    cfg = model.cfg

    def build(tmp: Path) -> dict:
        say("exporting the decode graph (FP32): one token per pass, its keys and values out")
        export_decode_graph(model, tmp / "decode.fp32.onnx", topk, OPSET)
        tokenizer.save(tmp / "tokenizer.json")
        entries = {"fp32": entry_of(cfg, {"decode": "decode.fp32.onnx"})}
        fp32 = onnx.load(str(tmp / "decode.fp32.onnx"))
        if "fp16" in precisions:
            say("converting to FP16 (RMSNorm, softmax, residuals, the head and the cache plumbing stay FP32)")
            fp16 = convert_fp16(fp32)
            check_graph(fp16, "decode.fp16.onnx")
            onnx.save(fp16, str(tmp / "decode.fp16.onnx"))
            entries["fp16"] = entry_of(cfg, {"decode": "decode.fp16.onnx"})
        if "int8" in precisions:
            say("writing dynamic INT8 (INT8 weights of every MatMul, per channel; activations quantized as it runs) for the CPU")
            (tmp / ".int8-work").mkdir()
            write_dynamic_cpu_variant(tmp / "decode.fp32.onnx", tmp / "decode.int8-dynamic.ort", tmp / ".int8-work")
            shutil.rmtree(tmp / ".int8-work", ignore_errors=True)
            entries["int8-dynamic"] = entry_of(cfg, {"decode": "decode.int8-dynamic.ort"}, target="onnxruntime CPU")
        say("checking the graph against PyTorch")
        parity = {p: decode_parity(model, tmp / entry_files(cfg, e)["decode"], topk, p) for p, e in entries.items()}
        if not (parity["fp32"]["max_abs_logprob_diff"] <= 1e-3 and parity["fp32"]["top1_agreement"] >= 0.999):
            raise DllmError(f"the FP32 decode graph disagrees with PyTorch ({parity['fp32']}); nothing was written")
        return bundle_manifest(cfg, tokenizer, ckpt, topk, entries, fp32_nodes(fp32), [cfg.canvas_len], {"decode_parity": parity})

    return write_bundle(out_dir, build, overwrite=overwrite)
