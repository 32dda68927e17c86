"""The graph contract: every graph's name, inputs, outputs and cache use (`GRAPHS`), what a model's features add to
them (`FEATURES`, as data), and a graph's spec and signature for one model (`graph_spec`, `graph_signature`): the one
place the tensors' names, order, dtypes and shapes are written. The exporters (names, order, dynamic axes), the
torch graph modules (their arguments and returns), the onnxruntime buffers, the TensorRT engines' profiles and
buffers and the bundle's check all read it."""

from __future__ import annotations

from dataclasses import dataclass

from jetson_dllm.config import ModelConfig
from jetson_dllm.families import family_of

SAMPLING_OUTPUTS = ("topk_logprobs", "topk_ids")
ENTROPY = "entropy"  # (B, T) the whole distribution's entropy: graphs exported since it came return it, older ones not
COMMIT_OUTPUTS = ("k_new", "v_new")  # inside a runner: the keys and values a cache-writing graph computed
CACHE_INPUTS = ("k_cache", "v_cache")  # (n_layer, B, heads, context, head_dim): a cached graph's, owned by the runner
TOKEN_INPUTS = ("prev_tokens", "tokens")  # a graph's token inputs come first, in this order
SOFT_INPUTS = ("soft_ids", "soft_probs")  # (B, T, soft_k) int32 / float32: a model with soft inputs (self-conditioning, SDD)
CONDITION_INPUTS = ("memory", "memory_bias")  # (B, cond_len + 1, d) / (B, cond_len + 1) float32: the encoder's outputs
OPTIONAL_OUTPUTS = (ENTROPY,)  # a bundle's graph may lack these (exported before they came); runners ask the session


@dataclass(frozen=True)
class GraphSpec:
    """A graph's interface as its callers see it: what they feed, what comes back, and what it does to the cache.

    `cache`: "" (none), "read" (attends to the first valid_len positions), "write" (its tokens' keys and values go
    into the cache at valid_len; it reads the positions before). `entropy`: the graph also returns each position's
    entropy (ENTROPY) beside the top-K, for the diffusion samplers. `logits`: it can return its positions' logits
    (B, T, vocab) when asked. `width`: its tokens' positions per call: "" the family's (the canvas "T", a block, one
    token), "W" any number up to the context (the verify graph), "cond_len" the condition's (the encoder)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cache: str = ""
    entropy: bool = False
    logits: bool = False
    width: str = ""


GRAPHS: dict[str, GraphSpec] = {
    "canvas": GraphSpec(("tokens",), SAMPLING_OUTPUTS, entropy=True, logits=True),  # a whole canvas, bidirectional
    "block_step": GraphSpec(("tokens", "valid_len"), SAMPLING_OUTPUTS, "read", True),  # a noised block over the cache
    "commit": GraphSpec(("tokens", "valid_len"), (), "write"),  # a finished block's keys and values into the cache
    "commit_step": GraphSpec(("prev_tokens", "tokens", "valid_len"), SAMPLING_OUTPUTS, "write", True),  # commit + next step
    "decode": GraphSpec(("tokens", "valid_len"), SAMPLING_OUTPUTS, "write"),  # one token in, the next one's top-K out
    # any number of tokens in, causally (a prompt's prefill, a speculative draft checked): each one's next top-K out
    "verify": GraphSpec(("tokens", "valid_len"), SAMPLING_OUTPUTS, "write", entropy=True, width="W"),
    "encoder": GraphSpec(("tokens", "condition_len"), CONDITION_INPUTS, width="cond_len"),  # a conditional model's condition
}


@dataclass(frozen=True)
class Feature:
    """What a model feature adds to the graphs it touches, when the model config's `field` is set (truthy): inputs,
    the sampling head with its entropy (`head`), the logits on request (`logits`, graphs with a head only)."""

    field: str
    graphs: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    head: bool = False
    logits: bool = False


FEATURES = (
    # soft inputs (self-conditioning, SDD's candidates) go to the denoising graph; a block's first step (the commit
    # step) has no previous prediction to take
    Feature("soft_k", ("canvas", "block_step"), SOFT_INPUTS),
    # a conditional model's encoding goes to every denoising graph; their heads can return logits (guidance's mix)
    Feature("cond_len", ("canvas", "block_step", "commit", "commit_step"), CONDITION_INPUTS, logits=True),
    # a shifted block-diffusion model's commit returns its block's top-K (position 0: the next block's first token)
    Feature("shift", ("commit",), head=True),
)


def graph_spec(graph: str, cfg: ModelConfig) -> GraphSpec:
    """A graph's spec for this model: GRAPHS' entry, what the model's features add (FEATURES) and its family's own
    canvas inputs and outputs (`Family.canvas_inputs` / `canvas_outputs`: SDD's noise level, continuous diffusion's
    latents). The inputs in the order the graph takes them, the outputs in the order it returns them."""
    spec, family = GRAPHS[graph], family_of(cfg)
    inputs, outputs, entropy, logits = list(spec.inputs), list(spec.outputs), spec.entropy, spec.logits
    active = [f for f in FEATURES if graph in f.graphs and getattr(cfg, f.field, 0)]
    for feature in active:
        inputs += [n for n in feature.inputs if n not in inputs]
        if feature.head and not outputs:
            outputs, entropy = list(SAMPLING_OUTPUTS), True
    logits = logits or (bool(outputs) and any(f.logits for f in active))
    if graph == "canvas":
        inputs[1 + len(SOFT_INPUTS) * bool(cfg.soft_k) : 1 + len(SOFT_INPUTS) * bool(cfg.soft_k)] = family.canvas_inputs
        outputs += family.canvas_outputs
    return GraphSpec(tuple(inputs), tuple(outputs), spec.cache, entropy, logits, spec.width)


def returns_logits(graph: str, cfg: ModelConfig) -> bool:
    """The graph also returns its positions' logits (B, T, vocab), for a caller to ask for (guidance mixes two rows'
    whole distributions): the canvas graph, and a conditional block-diffusion model's graphs that have a top-K head."""
    return graph_spec(graph, cfg).logits


def graph_width(graph: str, cfg: ModelConfig) -> int | str:
    """A graph's positions per call: a static number (a block, one token, the condition), or a symbolic dim ("T": the
    canvas graph's canvas, "W": the verify graph's any number of tokens)."""
    width = GRAPHS[graph].width
    return family_of(cfg).positions_per_call(cfg, "T") if not width else cfg.cond_len if width == "cond_len" else width


def graph_signature(graph: str, cfg: ModelConfig, topk: int) -> tuple[dict, dict]:
    """(inputs, outputs) a graph of this model has, name -> (dtype, dims), in the order the graph takes and returns
    them: its token inputs, the cache (a cached graph's), the rest of its inputs; the sampling head, the entropy, its
    family's own outputs, the new keys and values (a cache-writing graph's: the runner writes them into its cache), the
    logits (where it returns them). "B" is the batch, "T" the canvas graph's canvas and "W" the verify graph's width
    (dynamic); every other dim static."""
    spec, width = graph_spec(graph, cfg), graph_width(graph, cfg)
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
    tokens = [n for n in TOKEN_INPUTS if n in spec.inputs]
    inputs = [*tokens, *(CACHE_INPUTS if spec.cache else ()), *(n for n in spec.inputs if n not in tokens)]
    head = [n for n in spec.outputs if n in SAMPLING_OUTPUTS]
    outputs = [*head, *((ENTROPY,) if spec.entropy else ()), *(n for n in spec.outputs if n not in head),
               *(COMMIT_OUTPUTS if spec.cache == "write" else ()), *(("logits",) if spec.logits else ())]
    return {n: known[n] for n in inputs}, {n: known[n] for n in outputs}


def signature_at(graph: str, cfg: ModelConfig, topk: int, batch: int, width: int = 0) -> tuple[dict, dict]:
    """`graph_signature` at a batch size and a width (the canvas graph's canvas, the verify graph's tokens):
    (inputs, outputs), name -> (shape, dtype), in the graph's order."""
    def concrete(part: dict) -> dict:
        return {n: (tuple(batch if d == "B" else width if d in ("T", "W") else d for d in dims), dtype) for n, (dtype, dims) in part.items()}

    inputs, outputs = graph_signature(graph, cfg, topk)
    return concrete(inputs), concrete(outputs)


def tensor_shapes(graphs: tuple[str, ...], cfg: ModelConfig, topk: int, batch: int, canvas: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every input and output of `graphs` at a batch size and a width (`canvas`: the canvas graph's length, or the
    verify graph's tokens): name -> (shape, dtype). The logits and the entropy excepted: engines keep only the top-K
    (the sampler estimates the entropy from it)."""
    out = {}
    for graph in graphs:
        for part in signature_at(graph, cfg, topk, batch, canvas):
            out |= {name: shape for name, shape in part.items() if name not in ("logits", ENTROPY)}
    return out
