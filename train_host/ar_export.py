"""The autoregressive baseline's graphs: one *decode* step with its KV cache, and the *verify* graph that reads any
number of tokens in one pass, so the baseline runs on the same runtime (onnxruntime, TensorRT) as the diffusion
models it is compared with.

    decode  tokens (B, 1) int32, k_cache and v_cache (n_layer, B, heads, max_len, head_dim) float32, valid_len (B,) int32 (each row's own)
            ->  topk_logprobs, topk_ids (B, 1, K) of the next token, and k_new, v_new (n_layer, B, heads, 1, head_dim)
            of the token read: one pass per token, its keys and values written into the cache at valid_len by the
            runner, in place (what block diffusion's block-step and commit graphs do in two passes, fused).

    verify  tokens (B, W) int32 (W dynamic, 1..max_len), the cache, valid_len (B,)  ->  topk_logprobs, topk_ids (B, W, K)
            and entropy (B, W) after each of the W tokens read causally, and k_new, v_new (n_layer, B, heads, W, head_dim):
            a prompt read in one pass (prefill), a speculative draft checked in one pass. Rolling back a rejected
            suffix is only `valid_len` moving back: positions past it are masked out and overwritten by the next call.

The same layers as the model's (train_host.graph_modules).
"""

from __future__ import annotations

from pathlib import Path

from jetson_dllm.runners.calls import Call
from train_host.model import Denoiser


def export_decode_graph(model: Denoiser, path: Path, k: int, opset: int) -> None:
    from train_host.onnx_tools import export_graph

    export_graph(model, "decode", k, path, opset)


PARITY_TOKENS = 256  # positions decode parity reads (an imported model's context can be thousands)
VERIFY_WIDTHS = (1, 3, 8, 2, 16, 5)  # verify parity reads its text in calls of these widths, in turn


def verify_calls(x, n: int):
    """Calls of the verify graph reading the first `n` positions of `x` (B, T) in chunks of VERIFY_WIDTHS, in turn."""
    import numpy as np

    calls, at, i = [], 0, 0
    while at < n:
        w = min(VERIFY_WIDTHS[i % len(VERIFY_WIDTHS)], n - at)
        calls.append(Call("verify", {"tokens": x[:, at : at + w], "valid_len": np.int32(at)}))
        at, i = at + w, i + 1
    return calls


def verify_against_decode(runner, x, n: int) -> dict:
    """The verify graph against single decode calls on one runner over the same text (`x`'s first `n` positions,
    each pass over the cache the one before wrote): the worst |log-probability difference| of the sorted top-K at
    every position and the top-1 agreement."""
    import numpy as np

    def read(calls) -> tuple:
        lp, ids = [], []
        for call in calls:
            got = runner.run(call.graph, call.feeds)  # the runner's buffers are reused between calls: copied
            lp.append(got["topk_logprobs"].copy())
            ids.append(got["topk_ids"].copy())
        return np.concatenate(lp, 1), np.concatenate(ids, 1)

    one_lp, one_ids = read(Call("decode", {"tokens": x[:, i : i + 1], "valid_len": np.int32(i)}) for i in range(n))
    many_lp, many_ids = read(verify_calls(x, n))
    finite = bool(np.isfinite(many_lp).all())
    return {"max_abs_logprob_diff": float(np.abs(one_lp - many_lp).max()) if finite else float("inf"),
            "top1_agreement": float((one_ids[..., 0] == many_ids[..., 0]).mean()) if finite else 0.0, "positions": int(n * len(x))}


def decode_parity(model: Denoiser, paths: dict[str, Path], k: int, precision: str = "fp32", batch: int = 2, seed: int = 0) -> dict:
    """The bundle's graphs (graph -> path) on the onnxruntime runner against the torch runner, each over its own
    cache (jetson_dllm.parity.compare_calls): decode token by token over random text, then verify over the same
    text in chunks of several widths; with the verify graph, also verify against this runner's own decode calls
    (`verify_vs_decode`: k tokens in one pass are k passes of one)."""
    import numpy as np

    from jetson_dllm.parity import compare_calls
    from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs
    from jetson_dllm.runners.torch_runner import TorchRunner

    cfg = model.cfg
    x = np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, cfg.canvas_len)).astype(np.int32)
    n = min(cfg.canvas_len, PARITY_TOKENS)
    calls = [Call("decode", {"tokens": x[:, i : i + 1], "valid_len": np.int32(i)}) for i in range(n)]
    calls += verify_calls(x, n) if "verify" in paths else []
    with TorchRunner(model, topk=k) as reference, onnx_runner_from_graphs(paths, cfg, precision) as runner:
        report = compare_calls(reference, {precision: runner}, calls)[precision]
        if "verify" in paths:
            report["verify_vs_decode"] = verify_against_decode(runner, x, n)
    return report


def export_ar_bundle(model: Denoiser, tokenizer, ckpt: dict, out_dir, topk: int, overwrite: bool, say, precisions=("fp32",)):
    """A bundle of the autoregressive baseline: the decode and verify graphs (FP32, and FP16 with the usual FP32
    islands), the tokenizer, a manifest and the graphs' parity with the torch model and with each other (refused,
    writing nothing, if FP32 disagrees);
    with "int8" in `precisions`, the dynamic INT8 variant for onnxruntime's CPU provider (INT8 weights of every
    MatMul with a constant weight; the tied head stays FP32; slower than FP32 on an AVX2 core without VNNI,
    docs/import.md)."""
    import shutil

    import onnx

    from calibration.dynamic import write_dynamic_cpu_variant
    from jetson_dllm.bundle import entry_files, entry_of, write_bundle
    from jetson_dllm.errors import DllmError
    from jetson_dllm.families import family_of
    from train_host.onnx_tools import OPSET, bundle_manifest, check_graph, convert_fp16, export_graph, fp32_nodes

    cfg = model.cfg
    graphs = family_of(cfg).graphs  # decode (the entry's `file`) and verify

    def build(tmp: Path) -> dict:
        say("exporting the decode graph (FP32): one token per pass, its keys and values out")
        export_decode_graph(model, tmp / "decode.fp32.onnx", topk, OPSET)
        say("exporting the verify graph (FP32): any number of tokens per pass (prefill, speculative drafts)")
        export_graph(model, "verify", topk, tmp / "verify.fp32.onnx", OPSET)
        tokenizer.save(tmp / "tokenizer.json")
        entries = {"fp32": entry_of(cfg, {g: f"{g}.fp32.onnx" for g in graphs})}
        fp32 = onnx.load(str(tmp / "decode.fp32.onnx"))
        if "fp16" in precisions:
            say("converting to FP16 (RMSNorm, softmax, residuals, the head and the cache plumbing stay FP32)")
            for g in graphs:
                fp16 = convert_fp16(onnx.load(str(tmp / f"{g}.fp32.onnx")))
                check_graph(fp16, f"{g}.fp16.onnx")
                onnx.save(fp16, str(tmp / f"{g}.fp16.onnx"))
            entries["fp16"] = entry_of(cfg, {g: f"{g}.fp16.onnx" for g in graphs})
        if "int8" in precisions:
            say("writing dynamic INT8 (INT8 weights of every MatMul, per channel; activations quantized as it runs) for the CPU")
            for g in graphs:
                (tmp / ".int8-work").mkdir()
                write_dynamic_cpu_variant(tmp / f"{g}.fp32.onnx", tmp / f"{g}.int8-dynamic.ort", tmp / ".int8-work")
                shutil.rmtree(tmp / ".int8-work", ignore_errors=True)
            entries["int8-dynamic"] = entry_of(cfg, {g: f"{g}.int8-dynamic.ort" for g in graphs}, target="onnxruntime CPU")
        say("checking the graphs against PyTorch, and verify against decode")
        parity = {p: decode_parity(model, {g: tmp / f for g, f in entry_files(cfg, e).items()}, topk, p) for p, e in entries.items()}
        worst = parity["fp32"]
        if not (worst["max_abs_logprob_diff"] <= 1e-3 and worst["top1_agreement"] >= 0.999
                and worst["verify_vs_decode"]["max_abs_logprob_diff"] <= 1e-3):
            raise DllmError(f"the FP32 graphs disagree with PyTorch or with each other ({worst}); nothing was written")
        return bundle_manifest(cfg, tokenizer, ckpt, topk, entries, fp32_nodes(fp32), [cfg.canvas_len], {"decode_parity": parity})

    return write_bundle(out_dir, build, overwrite=overwrite)
