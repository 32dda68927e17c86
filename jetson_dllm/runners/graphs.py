"""The graph contract: every graph's name, inputs, outputs and cache use (`GRAPHS`), a graph's spec and signature for
one model (`graph_spec`, `graph_signature`): the one place the tensors' names and shapes are written, which the
exporters, the runners' buffers and the TensorRT engines all read."""

from __future__ import annotations

from dataclasses import dataclass

from jetson_dllm.config import ModelConfig
from jetson_dllm.families import family_of

SAMPLING_OUTPUTS = ("topk_logprobs", "topk_ids")
ENTROPY = "entropy"  # (B, T) the whole distribution's entropy: graphs exported since it came return it, older ones not
COMMIT_OUTPUTS = ("k_new", "v_new")  # inside a runner: the keys and values a cache-writing graph computed


@dataclass(frozen=True)
class GraphSpec:
    """A graph's interface as its callers see it: what they feed, what comes back, and what it does to the cache.

    `cache`: "" (none), "read" (attends to the first valid_len positions), "write" (its tokens' keys and values go
    into the cache at valid_len; it reads the positions before). `writes_prev`: the commit step writes `prev_tokens`
    (the finished block) and steps `tokens` (the next). `entropy`: the graph also returns each position's entropy
    (ENTROPY) beside the top-K, for the diffusion samplers (graphs exported before it came lack it)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cache: str = ""
    entropy: bool = False


GRAPHS: dict[str, GraphSpec] = {
    "canvas": GraphSpec(("tokens",), SAMPLING_OUTPUTS, entropy=True),  # a whole canvas, bidirectional; also `logits`
    "block_step": GraphSpec(("tokens", "valid_len"), SAMPLING_OUTPUTS, "read", True),  # a noised block over the cache
    "commit": GraphSpec(("tokens", "valid_len"), (), "write"),  # a finished block's keys and values into the cache
    "commit_step": GraphSpec(("prev_tokens", "tokens", "valid_len"), SAMPLING_OUTPUTS, "write", True),  # commit + next step
    "decode": GraphSpec(("tokens", "valid_len"), SAMPLING_OUTPUTS, "write"),  # one token in, the next one's top-K out
    "encoder": GraphSpec(("tokens", "condition_len"), ("memory", "memory_bias")),  # a conditional model's condition, once
}


SOFT_INPUTS = ("soft_ids", "soft_probs")  # (B, T, soft_k) int32 / float32: a model with soft inputs (self-conditioning, SDD)
CONDITION_INPUTS = ("memory", "memory_bias")  # (B, cond_len + 1, d) / (B, cond_len + 1) float32: the encoder's outputs


def graph_spec(graph: str, cfg: ModelConfig) -> GraphSpec:
    """A graph's spec for this model: a shifted block-diffusion model's commit also returns its block's top-K
    (position 0 predicts the next block's first token); a model with soft inputs (`cfg.soft_k`) takes them in its
    denoising graph, the canvas or the block step (SOFT_INPUTS; a runner fills zeros, no soft input, when a call
    brings none; a block's first step, the commit step, has no previous prediction to take)."""
    spec, family = GRAPHS[graph], family_of(cfg)
    if graph == "canvas" and (cfg.soft_k or family.canvas_inputs or cfg.cond_len):  # SDD: t; continuous: x and t; the condition
        extra = (SOFT_INPUTS if cfg.soft_k else ()) + family.canvas_inputs + (CONDITION_INPUTS if cfg.cond_len else ())
        return GraphSpec(spec.inputs + extra, spec.outputs + family.canvas_outputs, spec.cache, spec.entropy)
    memory = CONDITION_INPUTS if cfg.cond_len and spec.cache else ()  # a conditional block-diffusion model's graphs
    if graph == "block_step" and cfg.soft_k:
        return GraphSpec(spec.inputs + SOFT_INPUTS + memory, spec.outputs, spec.cache, spec.entropy)
    if graph == "commit" and cfg.shift:
        return GraphSpec(spec.inputs + memory, SAMPLING_OUTPUTS, spec.cache, entropy=True)
    return GraphSpec(spec.inputs + memory, spec.outputs, spec.cache, spec.entropy) if memory else spec


def returns_logits(graph: str, cfg: ModelConfig) -> bool:
    """The graph also returns its positions' logits (B, T, vocab), for a caller to ask for (guidance mixes two rows'
    whole distributions): the canvas graph, and a conditional block-diffusion model's graphs that have a top-K head
    (the block step, the commit step; a shifted model's commit)."""
    return graph == "canvas" or bool(cfg.cond_len and graph in ("block_step", "commit", "commit_step") and graph_spec(graph, cfg).outputs)


def graph_signature(graph: str, cfg: ModelConfig, topk: int) -> tuple[dict, dict]:
    """(inputs, outputs) a graph of this model has: name -> (dtype, dims); "B" is the batch, "T" the canvas length
    of the canvas graph, every other dim static. The one place the tensors' names and shapes are written: the
    onnxruntime check of a bundle's graphs and the TensorRT buffers read it. A cache-writing graph's outputs include
    the new keys and values (the runner writes them into its cache); the canvas graph's include the logits."""
    spec = graph_spec(graph, cfg)
    width = family_of(cfg).positions_per_call(cfg, "T")  # a block, one token, or the canvas
    cache = ("float32", (cfg.n_layer, "B", cfg.n_kv_head, cfg.canvas_len, cfg.head_dim))
    new = ("float32", (cfg.n_layer, "B", cfg.n_kv_head, width, cfg.head_dim))
    known = {"tokens": ("int32", ("B", width)), "prev_tokens": ("int32", ("B", width)), "valid_len": ("int32", ("B",)),
             "k_cache": cache, "v_cache": cache, "topk_logprobs": ("float32", ("B", width, topk)),
             "topk_ids": ("int32", ("B", width, topk)), "soft_ids": ("int32", ("B", width, cfg.soft_k)),
             "soft_probs": ("float32", ("B", width, cfg.soft_k)), "t": ("float32", ("B",)), ENTROPY: ("float32", ("B", width)),
             "logits": ("float32", ("B", width, cfg.vocab_size)), "k_new": new, "v_new": new, "x": ("float32", ("B", width, cfg.latent_dim)),
             "x0": ("float32", ("B", width, cfg.latent_dim)), "x0_top1": ("float32", ("B", width, cfg.latent_dim)),
             "condition_len": ("int32", ("B",)), "memory": ("float32", ("B", cfg.cond_len + 1, cfg.d_model)),
             "memory_bias": ("float32", ("B", cfg.cond_len + 1))}
    if graph == "encoder":  # its tokens are the condition's
        known["tokens"] = ("int32", ("B", cfg.cond_len))
    inputs = [*spec.inputs, *(("k_cache", "v_cache") if spec.cache else ())]
    outputs = [*spec.outputs, *(COMMIT_OUTPUTS if spec.cache == "write" else ()), *(("logits",) if returns_logits(graph, cfg) else ())]
    return {n: known[n] for n in inputs}, {n: known[n] for n in outputs}


def tensor_shapes(graphs: tuple[str, ...], cfg: ModelConfig, topk: int, batch: int, canvas: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every input and output of `graphs` (the logits excepted: engines keep them inside) at a batch size (and the
    canvas graph's length): name -> (shape, dtype)."""
    out = {}
    for graph in graphs:
        for name, (dtype, dims) in {k: v for part in graph_signature(graph, cfg, topk) for k, v in part.items()}.items():
            if name != "logits":
                out[name] = (tuple(batch if d == "B" else canvas if d == "T" else d for d in dims), dtype)
    return out
