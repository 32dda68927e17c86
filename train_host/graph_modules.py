"""Every graph of jetson_dllm.runners.graphs.GRAPHS as one torch module over named tensors: what the exporters export
(`export_graph`, in onnx_tools) and what the torch runner runs (`graph_outputs`), one computation for both.

A graph's computation is a function here (`GRAPH_FUNCTIONS`) from the model and its named inputs to its named
outputs; `GraphModule` takes the inputs positionally and returns the outputs in the order of the graph's one
signature (`graph_signature`), so names, order and dynamic axes are written in one place only. The cached graphs
take the cache's keys and values (n_layer, B, heads, positions, head_dim) and each row's valid length (B,): a row's
queries sit at its valid length onward and attend to its first valid_len cached positions (past them the cache is
masked out, so what it holds there never matters) and to the call's own positions.

    canvas      a whole canvas, bidirectional: the sampling head (and a family's own outputs, the logits)
    block_step  a noised block over the cache: its top-K (and entropy)
    commit      a final block's keys and values (a shifted model's also its block's top-K)
    commit_step the finished block committed and the next noised block stepped in one pass (training's mask)
    decode      one token read (its keys and values) and the next one's top-K
    verify      any number of tokens read causally (their keys and values) and each one's next top-K and entropy: a
                prompt's prefill, a speculative draft checked in one call
    encoder     a conditional model's condition, once per request
"""

from __future__ import annotations

import torch

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.graphs import GRAPHS, graph_signature, signature_at
from train_host.bd3 import fused_mask
from train_host.model import Denoiser, sampling_head, shifted, topk_logprobs


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

    def new(self, upto: int | None = None) -> dict[str, torch.Tensor]:
        """The keys and values the call's positions computed (the first `upto` of them)."""
        k, v = torch.stack(self.new_k), torch.stack(self.new_v)
        return {"k_new": k[:, :, :, :upto], "v_new": v[:, :, :, :upto]} if upto is not None else {"k_new": k, "v_new": v}


def row_mask(valid_len: torch.Tensor, queries: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's rotary positions (B, Q) and attention mask over [cache; the call's own positions] (B, 1, Q,
    max_len + Q): row r's queries sit at valid_len[r] onward and see its first valid_len[r] cached positions, and
    among the call's own positions what `queries` (Q, Q) bool allows."""
    valid_len = valid_len.to(torch.int64)
    q = queries.shape[0]
    positions = valid_len.unsqueeze(1) + torch.arange(q, device=valid_len.device)
    past = (torch.arange(max_len, device=valid_len.device) < valid_len.unsqueeze(1)).unsqueeze(1).expand(-1, q, -1)
    own = queries.unsqueeze(0).expand(valid_len.shape[0], -1, -1)
    return positions, torch.cat([past, own], dim=2).unsqueeze(1)


def _soft(f: dict) -> tuple | None:
    return (f["soft_ids"], f["soft_probs"]) if "soft_ids" in f else None


def _memory(f: dict) -> tuple | None:
    return (f["memory"], f["memory_bias"]) if "memory" in f else None


def _hidden(model: Denoiser, f: dict, tokens: torch.Tensor, queries: torch.Tensor | None = None) -> tuple[torch.Tensor, TensorCache]:
    """Hidden states of `tokens` over the call's cache (`f`'s k_cache, v_cache, valid_len); `queries` (Q, Q) what the
    call's own positions see of each other (default: all of them); `f`'s soft inputs and encoding where it has them."""
    q = tokens.shape[1]
    cache = TensorCache(f["k_cache"], f["v_cache"])
    own = queries if queries is not None else torch.ones(q, q, dtype=torch.bool, device=tokens.device)
    positions, mask = row_mask(f["valid_len"], own, f["k_cache"].shape[3])
    h = model.hidden(tokens, cache=cache, attn_mask=mask, rope_positions=positions, soft=_soft(f), memory=_memory(f))
    return h, cache


def _head(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    lp, ids, entropy = sampling_head(logits, k)
    return {"topk_logprobs": lp, "topk_ids": ids, "entropy": entropy, "logits": logits}


def canvas(model, k: int, f: dict) -> dict[str, torch.Tensor]:
    latent = {"x": f["x"]} if "x" in f else {}  # continuous diffusion's noised latents
    logits = model(f["tokens"], soft=_soft(f), t=f.get("t"), **latent, **({"memory": _memory(f)} if "memory" in f else {}))
    out = _head(logits, k)
    if latent:  # the expected clean latent, and the top-1's (clamping)
        out |= {"x0": model.expected_latent(logits), "x0_top1": model.top1_latent(logits)}
    return out


def block_step(model: Denoiser, k: int, f: dict) -> dict[str, torch.Tensor]:
    h, _ = _hidden(model, f, f["tokens"])
    logits = model.logits_from_hidden(h)
    return _head(shifted(logits) if model.cfg.shift else logits, k)


def commit(model: Denoiser, k: int, f: dict) -> dict[str, torch.Tensor]:
    """A shifted model's commit also returns its block's top-K (position 0: the next block's first token)."""
    h, cache = _hidden(model, f, f["tokens"])
    return cache.new() | (_head(shifted(model.logits_from_hidden(h)), k) if model.cfg.shift else {})


def commit_step(model: Denoiser, k: int, f: dict) -> dict[str, torch.Tensor]:
    b = f["tokens"].shape[1]
    h, cache = _hidden(model, f, torch.cat([f["prev_tokens"], f["tokens"]], dim=1), fused_mask(b, f["tokens"].device))
    rows = h[:, b - 1 : 2 * b - 1] if model.cfg.shift else h[:, b:]  # shifted: from the position before
    return cache.new(b) | _head(model.logits_from_hidden(rows), k)


def decode(model: Denoiser, k: int, f: dict) -> dict[str, torch.Tensor]:
    h, cache = _hidden(model, f, f["tokens"])
    lp, ids = topk_logprobs(model.logits_from_hidden(h), k)
    return {"topk_logprobs": lp, "topk_ids": ids} | cache.new()


def verify(model: Denoiser, k: int, f: dict) -> dict[str, torch.Tensor]:
    """W tokens read causally over the cache: each sees the cache and the tokens up to itself (an arange comparison,
    not a triangle op, so the width stays dynamic for every exporter and parser)."""
    w = torch.arange(f["tokens"].shape[1], device=f["tokens"].device)
    h, cache = _hidden(model, f, f["tokens"], w.unsqueeze(0) <= w.unsqueeze(1))
    return _head(model.logits_from_hidden(h), k) | cache.new()


def encoder(model: Denoiser, k: int, f: dict) -> dict[str, torch.Tensor]:
    memory, bias = model.encode(f["tokens"], f["condition_len"])
    return {"memory": memory, "memory_bias": bias}


GRAPH_FUNCTIONS = {"canvas": canvas, "block_step": block_step, "commit": commit, "commit_step": commit_step, "decode": decode,
                   "verify": verify, "encoder": encoder}


class GraphModule(torch.nn.Module):
    """One graph as a module: its inputs positionally and its outputs as a tuple, both in the order of the graph's
    signature for this model (jetson_dllm.runners.graphs.graph_signature)."""

    def __init__(self, model: Denoiser, graph: str, k: int):
        super().__init__()
        if graph not in GRAPH_FUNCTIONS:
            raise DllmError(f"no graph {graph!r}; the graphs are {', '.join(GRAPH_FUNCTIONS)}")
        self.model, self.graph, self.k = model, graph, k
        inputs, outputs = graph_signature(graph, model.cfg, k)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = GRAPH_FUNCTIONS[self.graph](self.model, self.k, dict(zip(self.inputs, args)))
        return tuple(got[name] for name in self.outputs)


def example_feeds(model: Denoiser, graph: str, k: int, batch: int = 2, width: int = 0) -> dict[str, torch.Tensor]:
    """Example inputs of a graph, by name (the shapes of its signature; the canvas graph's canvas or the verify graph's
    width `width`, else a short one): tokens in the vocabulary, an empty cache, valid lengths 0, soft inputs that
    sum below 1, noise levels, latents, and a conditional model's encoding of one condition and of the empty one."""
    cfg = model.cfg
    width = width or min(24, cfg.canvas_len) if GRAPHS[graph].width != "W" else width or 3
    inputs, _ = signature_at(graph, cfg, k, batch, width)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (shape, dtype) in inputs.items():
        if name in ("tokens", "prev_tokens", "soft_ids"):
            out[name] = torch.randint(3, cfg.vocab_size, shape, dtype=torch.int32, generator=g)
        elif name == "soft_probs":
            out[name] = torch.softmax(torch.randn(*shape[:-1], shape[-1] + 1, generator=g), -1)[..., : shape[-1]]
        elif name == "t":
            out[name] = torch.linspace(0.3, 0.9, batch)
        elif name == "x":
            out[name] = torch.randn(shape, generator=g)
        elif name == "condition_len":
            out[name] = torch.tensor([3, 0] * batch, dtype=torch.int32)[:batch]
        else:  # the cache, valid lengths
            out[name] = torch.zeros(shape, dtype=getattr(torch, dtype))
    return out | (example_memory(model, batch, g) if "memory" in inputs else {})


def example_memory(model: Denoiser, batch: int = 2, g: torch.Generator | None = None) -> dict:
    """A conditional model's example encoding (one row's condition, the next one's empty); {} without a condition."""
    cfg = model.cfg
    if not cfg.cond_len:
        return {}
    g = g or torch.Generator().manual_seed(0)
    with torch.no_grad():
        lengths = torch.tensor([cfg.cond_len // 2 + 1, 0] * batch)[:batch]
        memory, bias = model.encode(torch.randint(3, cfg.vocab_size, (batch, cfg.cond_len), generator=g), lengths)
    return {"memory": memory, "memory_bias": bias}


def graph_outputs(model: Denoiser, graph: str, k: int, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One graph through its module on named tensors (a cached graph's cache as explicit tensors (n_layer, B, heads,
    positions, head_dim) and each row's valid length (B,)): the graph's outputs by name (the new keys and values
    included, for the caller to write). What the torch runner runs: the exported computation."""
    module = GraphModule(model, graph, k)
    missing = [name for name in module.inputs if name not in feeds]
    if missing:
        raise DllmError(f"the {graph} graph takes {', '.join(module.inputs)}; missing {', '.join(missing)}")
    return dict(zip(module.outputs, module(*(feeds[name] for name in module.inputs))))
