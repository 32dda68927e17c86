"""Block diffusion's graphs, static shapes as TensorRT wants them: a *block step* and a *commit*.

    block step  tokens (B, b) int32, k_cache and v_cache (n_layer, B, heads, max_len, head_dim) float32, valid_len
                () int32 (TensorRT takes no int64 inputs)  ->  topk_logprobs (B, b, K), topk_ids (B, b, K): the block's queries attend to the first
                valid_len cached positions and to the block itself; the vocabulary-sized work covers b positions only.
    commit      the same inputs  ->  k_new, v_new (n_layer, B, heads, b, head_dim): the keys and values of a final
                (clean) block, which the runner writes into its cache at valid_len, in place.

The cache is allocated once per run at its largest length; positions past valid_len are masked out, so its
contents there never matter. Both graphs reuse the model's own layers (no second implementation).
"""

from __future__ import annotations

from pathlib import Path

import torch

from train_host.model import Denoiser, topk_logprobs


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
        return topk_logprobs(self.model.logits_from_hidden(h), self.k)


class Commit(torch.nn.Module):
    def __init__(self, model: Denoiser):
        super().__init__()
        self.model = model

    def forward(self, tokens, k_cache, v_cache, valid_len):
        _, cache = _hidden(self.model, tokens, k_cache, v_cache, valid_len)
        return torch.stack(cache.new_k), torch.stack(cache.new_v)


def example_inputs(model: Denoiser, batch: int = 2) -> tuple:
    cfg = model.cfg
    shape = (cfg.n_layer, batch, cfg.n_head, cfg.canvas_len, cfg.head_dim)
    tokens = torch.full((batch, cfg.block_size), cfg.mask_id, dtype=torch.int32)
    return tokens, torch.zeros(shape), torch.zeros(shape), torch.tensor(0, dtype=torch.int32)


def export_block_graphs(model: Denoiser, folder: Path, k: int, opset: int = 18) -> dict[str, Path]:
    """Write block_step.onnx and commit.onnx (FP32) for a block-diffusion model; static block and cache shapes."""
    from train_host.export import _quiet_exporter

    model = model.eval()
    model.set_attention("math")
    names = ["tokens", "k_cache", "v_cache", "valid_len"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = {"tokens": {0: batch}, "k_cache": {1: batch}, "v_cache": {1: batch}, "valid_len": {}}
    paths = {"block_step": Path(folder) / "block_step.onnx", "commit": Path(folder) / "commit.onnx"}
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(BlockStep(model, k).eval(), example_inputs(model), str(paths["block_step"]), input_names=names,
                              output_names=["topk_logprobs", "topk_ids"], opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic)
            torch.onnx.export(Commit(model).eval(), example_inputs(model), str(paths["commit"]), input_names=names,
                              output_names=["k_new", "v_new"], opset_version=opset, dynamo=True, external_data=False,
                              dynamic_shapes=dynamic)
    finally:
        model.set_attention("sdpa")
    return paths
