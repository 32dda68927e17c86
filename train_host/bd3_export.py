"""Block diffusion's graphs, static shapes as TensorRT wants them: a *block step* and a *commit*.

    block step  tokens (B, b) int32, k_cache and v_cache (n_layer, B, heads, max_len, head_dim) float32, valid_len
                () int32 (TensorRT takes no int64 inputs)  ->  topk_logprobs (B, b, K), topk_ids (B, b, K): the block's queries attend to the first
                valid_len cached positions and to the block itself; the vocabulary-sized work covers b positions only.
    commit      the same inputs  ->  k_new, v_new (n_layer, B, heads, b, head_dim): the keys and values of a final
                (clean) block, which the runner writes into its cache at valid_len, in place.
    commit_step prev_tokens (B, b), then the block step's inputs with valid_len at the *previous* block  ->  the
                block step's top-K for the new block and the commit's keys and values for the previous one: the
                commit folded into the next block's first pass (2b positions under training's mask: the clean block
                block-causal, the noised block seeing it), one network call fewer per block, exactly.

The cache is allocated once per run at its largest length; positions past valid_len are masked out, so its
contents there never matter. Both graphs reuse the model's own layers (no second implementation).
"""

from __future__ import annotations

from pathlib import Path

import torch

from train_host.bd3 import fused_mask
from train_host.model import Denoiser, sampling_head, shifted


class TensorCache:
    """The model's cache interface over explicit tensors: reads past keys, records the block's, writes nothing."""

    frozen = True
    len = 0

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_k.append(k)
        self.new_v.append(v)
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


def _hidden(model: Denoiser, tokens, k_cache, v_cache, valid_len) -> tuple[torch.Tensor, TensorCache]:
    b, max_len = tokens.shape[1], k_cache.shape[3]
    cache = TensorCache(k_cache, v_cache)
    valid_len = valid_len.to(torch.int64)
    positions = valid_len + torch.arange(b, device=tokens.device)
    past = (torch.arange(max_len, device=tokens.device) < valid_len).unsqueeze(0).expand(b, max_len)
    mask = torch.cat([past, torch.ones(b, b, dtype=torch.bool, device=tokens.device)], dim=1)  # (b, max_len + b)
    return model.hidden(tokens, cache=cache, attn_mask=mask, rope_positions=positions), cache


class BlockStep(torch.nn.Module):
    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens, k_cache, v_cache, valid_len):
        h, _ = _hidden(self.model, tokens, k_cache, v_cache, valid_len)
        logits = self.model.logits_from_hidden(h)
        return sampling_head(shifted(logits) if self.model.cfg.shift else logits, self.k)


class CommitStep(torch.nn.Module):
    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, prev_tokens, tokens, k_cache, v_cache, valid_len):
        b, max_len = tokens.shape[1], k_cache.shape[3]
        cache = TensorCache(k_cache, v_cache)
        valid_len = valid_len.to(torch.int64)
        positions = valid_len + torch.arange(2 * b, device=tokens.device)
        past = (torch.arange(max_len, device=tokens.device) < valid_len).unsqueeze(0).expand(2 * b, max_len)
        mask = torch.cat([past, fused_mask(b, tokens.device)], dim=1)
        h = self.model.hidden(torch.cat([prev_tokens, tokens], dim=1), cache=cache, attn_mask=mask, rope_positions=positions)
        rows = h[:, b - 1 : 2 * b - 1] if self.model.cfg.shift else h[:, b:]  # shifted: from the position before
        lp, ids, entropy = sampling_head(self.model.logits_from_hidden(rows), self.k)
        return lp, ids, entropy, torch.stack(cache.new_k)[:, :, :, :b], torch.stack(cache.new_v)[:, :, :, :b]


class Commit(torch.nn.Module):
    """A shifted model's commit also returns its block's top-K (position 0: the next block's first token)."""

    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens, k_cache, v_cache, valid_len):
        h, cache = _hidden(self.model, tokens, k_cache, v_cache, valid_len)
        new = (torch.stack(cache.new_k), torch.stack(cache.new_v))
        if self.model.cfg.shift:
            return (*sampling_head(shifted(self.model.logits_from_hidden(h)), self.k), *new)
        return new


def example_inputs(model: Denoiser, batch: int = 2) -> tuple:
    cfg = model.cfg
    shape = (cfg.n_layer, batch, cfg.n_kv_head, cfg.canvas_len, cfg.head_dim)
    tokens = torch.full((batch, cfg.block_size), cfg.mask_id, dtype=torch.int32)
    return tokens, torch.zeros(shape), torch.zeros(shape), torch.tensor(0, dtype=torch.int32)


def export_block_graphs(model: Denoiser, folder: Path, k: int, opset: int = 18) -> dict[str, Path]:
    """Write block_step.onnx, commit.onnx and commit_step.onnx (FP32) for a block-diffusion model; static block and
    cache shapes."""
    from train_host.onnx_tools import quiet_exporter

    model = model.eval()
    model.set_attention("math")
    names = ["tokens", "k_cache", "v_cache", "valid_len"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = {"tokens": {0: batch}, "k_cache": {1: batch}, "v_cache": {1: batch}, "valid_len": {}}
    paths = {g: Path(folder) / f"{g}.onnx" for g in ("block_step", "commit", "commit_step")}
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(BlockStep(model, k).eval(), example_inputs(model), str(paths["block_step"]), input_names=names,
                              output_names=["topk_logprobs", "topk_ids", "entropy"], opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic)
            commit_out = ["topk_logprobs", "topk_ids", "entropy"] * model.cfg.shift + ["k_new", "v_new"]
            torch.onnx.export(Commit(model, k).eval(), example_inputs(model), str(paths["commit"]), input_names=names,
                              output_names=commit_out, opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic)
            tokens = example_inputs(model)[0]
            torch.onnx.export(CommitStep(model, k).eval(), (tokens, *example_inputs(model)), str(paths["commit_step"]),
                              input_names=["prev_tokens", *names], output_names=["topk_logprobs", "topk_ids", "entropy", "k_new", "v_new"],
                              opset_version=opset, dynamo=True, external_data=False, dynamic_shapes={"prev_tokens": {0: batch}, **dynamic})
    finally:
        model.set_attention("sdpa")
    return paths


def fp16_block_graphs(folder: Path) -> dict[str, str]:
    """FP16 copies of the two graphs, with the same FP32 islands as the canvas graph's; inputs and outputs stay FP32."""
    import onnx

    from train_host.onnx_tools import check_graph, convert_fp16

    entry = {}
    for key, name in (("file", "block_step"), ("commit", "commit"), ("commit_step", "commit_step")):
        fp16 = convert_fp16(onnx.load(str(folder / f"{name}.fp32.onnx")))
        check_graph(fp16, f"{name}.fp16.onnx")
        onnx.save(fp16, str(folder / f"{name}.fp16.onnx"))
        entry[key] = f"{name}.fp16.onnx"
    return entry


def export_bd3_bundle(model: Denoiser, tokenizer, ckpt: dict, out_dir, topk: int, overwrite: bool, say, precisions=("fp32",),
                      calibration_canvases=None, int8=None):
    """A bundle of a block-diffusion model: block-step and commit graphs (FP32, FP16, INT8 Q/DQ), the tokenizer, a
    manifest, and a parity report of every precision against the torch cache (refused, writing nothing, if FP32
    disagrees). INT8 calibrates on `calibration_canvases(n)` (calibration.blocks)."""
    import onnx

    from jetson_dllm.bundle import write_bundle
    from jetson_dllm.errors import DllmError
    from train_host.onnx_tools import OPSET, bundle_manifest, fp32_nodes

    cfg = model.cfg

    def build(tmp: Path) -> dict:
        say("exporting the block-step and commit graphs (FP32)")
        paths = export_block_graphs(model, tmp, topk, OPSET)
        for graph, path in paths.items():
            path.rename(tmp / f"{graph}.fp32.onnx")
        tokenizer.save(tmp / "tokenizer.json")
        entries = {"fp32": {"file": "block_step.fp32.onnx", "commit": "commit.fp32.onnx", "commit_step": "commit_step.fp32.onnx"}}
        if "fp16" in precisions:
            say("converting to FP16 (RMSNorm, softmax, residuals, the head and the cache plumbing stay FP32)")
            entries["fp16"] = fp16_block_graphs(tmp)
        calibration = None
        if "int8" in precisions:
            from calibration.blocks import quantize_block_graphs

            canvases, source = calibration_canvases(int8.n_canvases + int8.eval_canvases)
            calibration = quantize_block_graphs(tmp, cfg, canvases, cfg.mask_id, tokenizer.pad_id, source, int8, progress=say)
            entries["int8"] = {"file": "block_step.int8.onnx", "commit": "commit.int8.onnx", "target": "tensorrt (explicit Q/DQ)"}
        say("checking the graphs against PyTorch")
        graph_files = {p: {g: tmp / e["file" if g == "block_step" else g] for g in ("block_step", "commit", "commit_step")
                           if ("file" if g == "block_step" else g) in e} for p, e in entries.items()}
        parity = {p: block_parity(model, files, topk, p) for p, files in graph_files.items()}
        if not (parity["fp32"]["max_abs_logprob_diff"] <= 1e-3 and parity["fp32"]["top1_agreement"] >= 0.999):
            raise DllmError(f"the FP32 block graphs disagree with PyTorch ({parity['fp32']}); nothing was written")
        nodes = {g: fp32_nodes(onnx.load(str(tmp / f"{g}.fp32.onnx"))) for g in ("block_step", "commit")}
        return bundle_manifest(cfg, tokenizer, ckpt, topk, entries, nodes, [cfg.canvas_len],
                               {"block_parity": parity, **({"calibration": calibration} if calibration else {})})

    return write_bundle(out_dir, build, overwrite=overwrite)


def parity_calls(cfg, batch: int = 2, seed: int = 0) -> list:
    """The calls block parity sends to both runners: a canvas of random tokens, block by block: the block half
    masked through the block step, then (from the second block on) through the commit step with the previous block,
    then committed clean."""
    import numpy as np

    from jetson_dllm.runners import Call

    rng, b = np.random.default_rng(seed), cfg.block_size
    x = rng.integers(3, cfg.vocab_size, (batch, cfg.canvas_len)).astype(np.int32)
    calls = []
    for j in range(cfg.canvas_len // b):
        block = x[:, j * b : (j + 1) * b]
        z = np.where(rng.random(block.shape) < 0.5, cfg.mask_id, block).astype(np.int32)
        calls.append(Call("block_step", {"tokens": z, "valid_len": np.int32(j * b)}))
        if j > 0:  # the previous block's commit folded into this step: it rewrites that block's keys, the same
            calls.append(Call("commit_step", {"prev_tokens": x[:, (j - 1) * b : j * b], "tokens": z, "valid_len": np.int32((j - 1) * b)}))
        calls.append(Call("commit", {"tokens": block, "valid_len": np.int32(j * b)}))
    return calls


def block_parity(model: Denoiser, paths: dict[str, Path], k: int, precision: str = "fp32") -> dict:
    """A precision's block graphs on the onnxruntime runner against the torch runner, each over its own cache
    (jetson_dllm.parity.compare_calls)."""
    from jetson_dllm.parity import compare_calls
    from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs
    from jetson_dllm.runners.torch_runner import TorchRunner

    calls = parity_calls(model.cfg)
    calls = [c for c in calls if c.graph in paths]  # INT8 has no commit-step graph
    with TorchRunner(model, topk=k) as reference, onnx_runner_from_graphs(paths, model.cfg, precision) as runner:
        return compare_calls(reference, {precision: runner}, calls)[precision]
