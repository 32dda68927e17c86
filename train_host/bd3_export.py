"""Block diffusion's graphs, static shapes as TensorRT wants them: a *block step* and a *commit*.

    block step  tokens (B, b) int32, k_cache and v_cache (n_layer, B, heads, max_len, head_dim) float32, valid_len
                (B,) int32, each row's own (TensorRT takes no int64 inputs)  ->  topk_logprobs (B, b, K), topk_ids
                (B, b, K): a row's block attends to its first valid_len cached positions and to itself; the
                vocabulary-sized work covers b positions only.
    commit      the same inputs  ->  k_new, v_new (n_layer, B, heads, b, head_dim): the keys and values of a final
                (clean) block, which the runner writes into its cache at each row's valid_len, in place.
    commit_step prev_tokens (B, b), then the block step's inputs with valid_len at the *previous* block  ->  the
                block step's top-K for the new block and the commit's keys and values for the previous one: the
                commit folded into the next block's first pass (2b positions under training's mask: the clean block
                block-causal, the noised block seeing it), one network call fewer per block, exactly.

The cache is allocated once per run at its largest length; positions past valid_len are masked out, so its
contents there never matter. The graphs are train_host.graph_modules, which reuse the model's own layers (no second
implementation) and which the torch runner runs too.
"""

from __future__ import annotations

from pathlib import Path

from train_host.graph_modules import example_memory
from train_host.model import Denoiser

BLOCK_GRAPHS = ("block_step", "commit", "commit_step")  # the commit step is FP32 / FP16 only (INT8 has none)


def export_block_graphs(model: Denoiser, folder: Path, k: int, opset: int = 18) -> dict[str, Path]:
    """Write block_step.onnx, commit.onnx and commit_step.onnx (FP32) for a block-diffusion model; static block and
    cache shapes, the batch dynamic (each graph's names, order and axes from its signature)."""
    from train_host.onnx_tools import export_graph

    paths = {g: Path(folder) / f"{g}.onnx" for g in BLOCK_GRAPHS}
    for graph, path in paths.items():
        export_graph(model, graph, k, path, opset)
    return paths


def fp16_block_graphs(folder: Path) -> dict[str, str]:
    """FP16 copies of the two graphs, with the same FP32 islands as the canvas graph's; inputs and outputs stay FP32."""
    import onnx

    from train_host.onnx_tools import check_graph, convert_fp16

    files = {}
    for name in BLOCK_GRAPHS:
        fp16 = convert_fp16(onnx.load(str(folder / f"{name}.fp32.onnx")))
        check_graph(fp16, f"{name}.fp16.onnx")
        onnx.save(fp16, str(folder / f"{name}.fp16.onnx"))
        files[name] = f"{name}.fp16.onnx"
    return files


def export_bd3_bundle(model: Denoiser, tokenizer, ckpt: dict, out_dir, topk: int, overwrite: bool, say, precisions=("fp32",),
                      calibration_canvases=None, int8=None):
    """A bundle of a block-diffusion model: block-step and commit graphs (FP32, FP16, INT8 Q/DQ), the tokenizer, a
    manifest, and a parity report of every precision against the torch cache (refused, writing nothing, if FP32
    disagrees). INT8 calibrates on `calibration_canvases(n)` (calibration.blocks)."""
    import numpy as np
    import onnx

    from jetson_dllm.bundle import entry_files, entry_of, write_bundle
    from jetson_dllm.errors import DllmError
    from train_host.canvas_export import encoder_parity, write_encoders
    from train_host.onnx_tools import OPSET, bundle_manifest, fp32_nodes

    cfg = model.cfg

    def build(tmp: Path) -> dict:
        say("exporting the block-step and commit graphs (FP32)")
        paths = export_block_graphs(model, tmp, topk, OPSET)
        for graph, path in paths.items():
            path.rename(tmp / f"{graph}.fp32.onnx")
        tokenizer.save(tmp / "tokenizer.json")
        entries = {"fp32": entry_of(cfg, {g: f"{g}.fp32.onnx" for g in BLOCK_GRAPHS})}
        if "fp16" in precisions:
            say("converting to FP16 (RMSNorm, softmax, residuals, the head and the cache plumbing stay FP32)")
            entries["fp16"] = entry_of(cfg, fp16_block_graphs(tmp))
        write_encoders(model, tmp, entries, say)  # a conditional model's encoder, once per request (before INT8 calibrates with it)
        calibration = None
        if "int8" in precisions:
            from calibration.blocks import quantize_block_graphs

            canvases, source = calibration_canvases(int8.n_canvases + int8.eval_canvases)
            calibration = quantize_block_graphs(tmp, cfg, canvases, cfg.mask_id, tokenizer.pad_id, source, int8, progress=say)
            int8_files = {"block_step": "block_step.int8.onnx", "commit": "commit.int8.onnx"}  # with the FP32 encoder, once a request
            entries["int8"] = entry_of(cfg, int8_files | {g: f for g, f in entry_files(cfg, entries["fp32"]).items() if g == "encoder"},
                                       target="tensorrt (explicit Q/DQ)")
        say("checking the graphs against PyTorch")
        graph_files = {p: {g: tmp / f for g, f in entry_files(cfg, e).items()} for p, e in entries.items()}
        parity = {p: block_parity(model, {g: f for g, f in files.items() if g != "encoder"}, topk, p) for p, files in graph_files.items()}
        if not (parity["fp32"]["max_abs_logprob_diff"] <= 1e-3 and parity["fp32"]["top1_agreement"] >= 0.999):
            raise DllmError(f"the FP32 block graphs disagree with PyTorch ({parity['fp32']}); nothing was written")
        extra = {"block_parity": parity, **({"calibration": calibration} if calibration else {})}
        if cfg.cond_len:  # the encoder graph against PyTorch (its output feeds every block graph's call of a request)
            probe = np.random.default_rng(1).integers(3, cfg.vocab_size, (8, cfg.canvas_len))
            extra["encoder_parity"] = encoder_parity(model, graph_files, probe, tokenizer.pad_id)
        nodes = {g: fp32_nodes(onnx.load(str(tmp / f"{g}.fp32.onnx"))) for g in ("block_step", "commit")}
        return bundle_manifest(cfg, tokenizer, ckpt, topk, entries, nodes, [cfg.canvas_len], extra)

    return write_bundle(out_dir, build, overwrite=overwrite)


def parity_calls(cfg, batch: int = 2, seed: int = 0, memory: dict | None = None) -> list:
    """The calls block parity sends to both runners: a canvas of random tokens, block by block: the block half
    masked through the block step (a self-conditioned model's with soft inputs: random candidates at the masked
    positions, probabilities summing below 1), then (from the second block on) through the commit step with the
    previous block, then committed clean. `memory`: a conditional model's encodings (batch rows), in every call."""
    import numpy as np

    from jetson_dllm.runners.calls import Call

    rng, b, memory = np.random.default_rng(seed), cfg.block_size, memory or {}
    x = rng.integers(3, cfg.vocab_size, (batch, cfg.canvas_len)).astype(np.int32)
    calls = []
    for j in range(cfg.canvas_len // b):
        block = x[:, j * b : (j + 1) * b]
        z = np.where(rng.random(block.shape) < 0.5, cfg.mask_id, block).astype(np.int32)
        soft = {}
        if cfg.soft_k:
            probs = rng.dirichlet(np.ones(cfg.soft_k + 1), z.shape)[..., : cfg.soft_k] * (z == cfg.mask_id)[..., None]
            soft = {"soft_ids": rng.integers(3, cfg.vocab_size, (*z.shape, cfg.soft_k)).astype(np.int32), "soft_probs": probs.astype(np.float32)}
        calls.append(Call("block_step", {"tokens": z, "valid_len": np.int32(j * b), **soft, **memory}))
        if j > 0:  # the previous block's commit folded into this step: it rewrites that block's keys, the same
            calls.append(Call("commit_step", {"prev_tokens": x[:, (j - 1) * b : j * b], "tokens": z, "valid_len": np.int32((j - 1) * b), **memory}))
        calls.append(Call("commit", {"tokens": block, "valid_len": np.int32(j * b), **memory}))
    return calls


def block_parity(model: Denoiser, paths: dict[str, Path], k: int, precision: str = "fp32") -> dict:
    """A precision's block graphs on the onnxruntime runner against the torch runner, each over its own cache
    (jetson_dllm.parity.compare_calls)."""
    from jetson_dllm.parity import compare_calls
    from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs
    from jetson_dllm.runners.torch_runner import TorchRunner

    memory = {name: value.numpy() for name, value in example_memory(model).items()}  # a conditional model's: one condition, one empty
    calls = parity_calls(model.cfg, memory=memory)
    calls = [c for c in calls if c.graph in paths]  # INT8 has no commit-step graph
    with TorchRunner(model, topk=k) as reference, onnx_runner_from_graphs(paths, model.cfg, precision) as runner:
        return compare_calls(reference, {precision: runner}, calls)[precision]
