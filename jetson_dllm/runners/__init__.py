"""Runners: one interface over torch, onnxruntime and TensorRT (+pycuda), in the shape of Polygraphy's runners.

A runner executes named graphs (`run(graph, feeds)`): name-keyed numpy arrays in, name-keyed numpy arrays out,
so a parity check between runners is one loop over the same inputs (`jetson_dllm.parity.compare_runners`). The
graphs (`GRAPHS`) are the same for every runner; a bundle carries those of its family (jetson_dllm.families), a
runner says which it runs (`graphs`). A graph that reads or writes the key/value cache does so on a cache the runner
allocates and owns (numpy buffers bound once to onnxruntime, device memory on TensorRT, tensors on torch); the caller
passes only tokens and each row's valid length (`valid_len`, (B,) or one scalar for every row), never the cache.
Rows of one call may sit at different positions. Without `slots`, a call's B rows are the rows of a cache of B rows
(allocated on the first call of that batch size); with `slots` (B,) int32, they are rows of the cache pool that
`open_slots(n)` allocated once (the server: one request's rows per slot, requests at any position in one call).
Outputs are `topk_logprobs` (B, T, K) float32 and `topk_ids` (B, T, K) int32 (the sampling head), or `logits`
(B, T, vocab) from the canvas graph; they may be the runner's own buffers, valid until its next call.

A family's generation loop is a generator of `Call`s; `drive` runs one on a runner (the server interleaves many).
Each runner lives in its own module and imports its library there; loaders are plain functions
(`runner_from_checkpoint`, `onnx_runner_from_bundle`, `onnx_runner_from_file`, `trt_runner_from_bundle`). Every
runner is a context manager that closes itself.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import FAMILIES, check_engines, family_of
from jetson_dllm.precisions import RUNNERS, parse_precisions
from jetson_dllm.tokenizer import TextTokenizer

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


@dataclass
class Call:
    """One network call a generation loop asks for: a graph, its feeds, and what it returns (None: the graph's
    sampling outputs; ("logits",): a guided call's whole distributions, jetson_dllm.guidance)."""

    graph: str
    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None = None


R = TypeVar("R")


def drive(runner: Runner, loop: Generator[Call, dict[str, np.ndarray], R]) -> R:
    """Run a generation loop (a generator of Calls, sent each call's outputs) on one runner; its return value."""
    try:
        call = next(loop)
        while True:
            call = loop.send(runner.run(call.graph, call.feeds, call.outputs))
    except StopIteration as done:
        return done.value


class Runner(Protocol):
    name: str  # e.g. "torch-cpu", "onnx-cpu", "trt-fp16"
    precision: str  # fp32 | fp16 | int8 | int8-dynamic
    cfg: ModelConfig
    tokenizer: TextTokenizer | None  # None for a bare ONNX file
    topk: int  # K of the sampling head
    canvas_lengths: list[int]  # canvas lengths the runner accepts
    graphs: tuple[str, ...]  # the graphs it runs (GRAPHS' names)
    returns_logits: bool  # the canvas graph's logits can be asked for (not from TensorRT engines: the head only)

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Run a graph; `outputs` names what to return (default: the graph's outputs)."""
        ...

    def open_slots(self, rows: int) -> int:
        """A cached family's cache pool of `rows` rows, allocated once (calls then name their rows with `slots`);
        the bytes it holds."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes the profiler reports: at least `weights`; `device_used` where the runner can tell."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...


class RunnerBase:
    """What every runner shares: closing as a context manager (the one base class; no other behaviour)."""

    returns_logits = True

    def close(self) -> None:  # pragma: no cover - every runner defines its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def sampling_fn(runner: Runner):
    """The sampler's view of a runner's canvas graph: canvas in, (top-K log-probabilities, ids) out."""

    def run(canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = runner.run("canvas", {"tokens": canvas})
        return out["topk_logprobs"], out["topk_ids"], out.get(ENTROPY)

    return run


def check_graph(runner: Runner, graph: str) -> GraphSpec:
    """The graph's spec, or a clear error when this runner (its model's family) has no such graph."""
    if graph not in runner.graphs:
        raise DllmError(f"{runner.name} runs the {', '.join(runner.graphs)} graph{'s' if len(runner.graphs) > 1 else ''} of this model, "
                        f"not {graph!r}")
    return graph_spec(graph, runner.cfg)


def valid_length(feeds: dict[str, np.ndarray], batch: int, limit: int) -> np.ndarray:
    """A cached call's valid lengths, one per row (B,) int32 (a scalar feed is every row's), checked against the
    cache's length."""
    valid = feeds.get("valid_len")
    rows = None if valid is None else np.asarray(valid)
    if rows is None or rows.ndim > 1 or (rows.ndim == 1 and rows.shape[0] != batch) or not np.issubdtype(rows.dtype, np.integer):
        raise DllmError(f"valid_len must be one integer or one per row ({batch}), got {valid!r}"[:200])
    rows = np.broadcast_to(rows, (batch,)).astype(np.int32)
    if rows.min() < 0 or rows.max() >= limit:
        raise DllmError(f"valid_len must be in 0..{limit - 1}, got {rows.tolist()}"[:200])
    return rows


def call_slots(feeds: dict[str, np.ndarray], batch: int, pool: int) -> np.ndarray | None:
    """A call's rows of the cache pool (`slots`, (B,), distinct, each below the pool's `pool` rows), or None when the
    call brings no slots (its rows are a cache of its own batch size)."""
    slots = feeds.get("slots")
    if slots is None:
        return None
    rows = np.asarray(slots)
    if not pool:
        raise DllmError("slots given, but no cache pool is open (open_slots)")
    if rows.shape != (batch,) or not np.issubdtype(rows.dtype, np.integer) or rows.min() < 0 or rows.max() >= pool or len(set(rows.tolist())) != batch:
        raise DllmError(f"slots must be {batch} distinct rows of the pool's {pool}, got {slots!r}"[:200])
    return rows.astype(np.int64)


def check_tokens(feeds: dict[str, np.ndarray], canvas_lengths: list[int], vocab_size: int) -> np.ndarray:
    tokens = feeds.get("tokens")
    if tokens is None or tokens.ndim != 2:
        raise DllmError("the network takes one input, tokens, shaped (batch, canvas)")
    if tokens.shape[1] > max(canvas_lengths):
        raise DllmError(f"canvas of {tokens.shape[1]} tokens is longer than this model takes ({max(canvas_lengths)})")
    return np.ascontiguousarray(tokens, dtype=np.int32)


def canvas_inputs(feeds: dict[str, np.ndarray], canvas_lengths: list[int], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The canvas graph's inputs from a call's feeds, checked: `tokens`, a model's soft inputs (`graph_soft_inputs`)
    and its family's own (`Family.canvas_inputs`: a noise level `t` per row in [0, 1], continuous diffusion's noised
    latents `x`, finite); one a model does not take is refused."""
    tokens = check_tokens(feeds, canvas_lengths, cfg.vocab_size)
    family = family_of(cfg)
    for name in sorted({n for f in FAMILIES.values() for n in f.canvas_inputs} - set(family.canvas_inputs)):
        if name in feeds:
            raise DllmError(f"{name} is an input of the {', '.join(f.title for f in FAMILIES.values() if name in f.canvas_inputs)}; "
                            f"this {family.title} model takes none")
    out = {"tokens": tokens, **(graph_soft_inputs("canvas", feeds, tokens.shape, cfg) or {})}
    B, T = tokens.shape
    if "t" in family.canvas_inputs:  # the noise level of each row, in [0, 1]
        t = feeds.get("t")
        t = None if t is None else np.asarray(t, dtype=np.float32)
        if t is None or t.shape != (B,) or not np.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise DllmError(f"the {family.title} graph takes t, each row's noise level in [0, 1], shaped ({B},)")
        out["t"] = np.ascontiguousarray(t)
    if "x" in family.canvas_inputs:
        x = feeds.get("x")
        x = None if x is None else np.asarray(x, dtype=np.float32)
        if x is None or x.shape != (B, T, cfg.latent_dim) or not np.isfinite(x).all():
            raise DllmError(f"the {family.title} graph takes x, the noised latents, finite, shaped ({B}, {T}, {cfg.latent_dim})")
        out["x"] = np.ascontiguousarray(x)
    return out | condition_inputs(feeds, B, cfg)


def condition_inputs(feeds: dict[str, np.ndarray], batch: int, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A conditional model's denoising call's encoded condition (the encoder graph's outputs, per row), checked; a
    model without a condition refuses one."""
    if not cfg.cond_len:
        if any(name in feeds for name in CONDITION_INPUTS):
            raise DllmError("this model takes no condition (it was trained without one); leave the condition out")
        return {}
    memory, bias = (None if feeds.get(n) is None else np.asarray(feeds[n], dtype=np.float32) for n in CONDITION_INPUTS)
    width = cfg.cond_len + 1
    if memory is None or bias is None or memory.shape != (batch, width, cfg.d_model) or bias.shape != (batch, width) \
            or not (np.isfinite(memory).all() and np.isfinite(bias).all()):
        raise DllmError(f"a conditional model's graphs take its condition's encoding (the encoder graph's memory ({batch}, {width}, "
                        f"{cfg.d_model}) and memory_bias ({batch}, {width}), finite); run the encoder graph first")
    return {"memory": np.ascontiguousarray(memory), "memory_bias": np.ascontiguousarray(bias)}


def encoder_inputs(feeds: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The encoder graph's inputs, checked: the condition's ids (B, cond_len) in the vocabulary and each row's length."""
    tokens, lengths = feeds.get("tokens"), feeds.get("condition_len")
    tokens = None if tokens is None else np.asarray(tokens)
    lengths = None if lengths is None else np.asarray(lengths)
    if tokens is None or tokens.ndim != 2 or tokens.shape[1] != cfg.cond_len or not np.issubdtype(tokens.dtype, np.integer):
        raise DllmError(f"the encoder graph takes tokens, the condition's ids, shaped (batch, {cfg.cond_len})")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise DllmError(f"the condition's ids must be in 0..{cfg.vocab_size - 1}")
    if lengths is None or lengths.shape != (tokens.shape[0],) or not np.issubdtype(lengths.dtype, np.integer) \
            or (lengths.size and (lengths.min() < 0 or lengths.max() > cfg.cond_len)):
        raise DllmError(f"the encoder graph takes condition_len, each row's condition length in 0..{cfg.cond_len}")
    return {"tokens": np.ascontiguousarray(tokens, dtype=np.int32), "condition_len": np.ascontiguousarray(lengths, dtype=np.int32)}


def graph_soft_inputs(graph: str, feeds: dict[str, np.ndarray], shape: tuple[int, int], cfg: ModelConfig) -> dict[str, np.ndarray] | None:
    """A call's soft inputs for `graph` (`soft_inputs`: zeros when it brings none), or None when the graph takes none
    (soft inputs brought to it are refused): the one check every runner makes."""
    if SOFT_INPUTS[0] not in graph_spec(graph, cfg).inputs:
        if any(name in feeds for name in SOFT_INPUTS):
            raise DllmError(f"the {graph} graph of this model takes no soft inputs (it was trained without them)")
        return None
    return dict(zip(SOFT_INPUTS, soft_inputs(feeds, shape, cfg.soft_k, cfg.vocab_size)))


def soft_inputs(feeds: dict[str, np.ndarray], shape: tuple[int, int], k: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A canvas call's soft inputs (ids (B, T, k) int32, probabilities (B, T, k) float32), checked: both or neither
    (neither: zeros, no soft input), k at most the model's, ids in the vocabulary, probabilities in [0, 1] summing to
    at most 1 per position (true softmax values of k candidates). Fewer than k candidates are padded with zeros."""
    ids, probs = feeds.get("soft_ids"), feeds.get("soft_probs")
    full = (*shape, k)
    if ids is None and probs is None:
        return np.zeros(full, dtype=np.int32), np.zeros(full, dtype=np.float32)
    if ids is None or probs is None:
        raise DllmError("soft inputs come as a pair: soft_ids and soft_probs")
    ids, probs = np.asarray(ids), np.asarray(probs)
    if ids.shape != probs.shape or ids.ndim != 3 or ids.shape[:2] != tuple(shape):
        raise DllmError(f"soft_ids and soft_probs must both be shaped (batch, canvas, k) = {(*shape, 'k')}, got {ids.shape} and {probs.shape}")
    if ids.shape[2] > k:
        raise DllmError(f"{ids.shape[2]} soft candidates per position; this model's graph takes at most {k} (its soft_k)")
    if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() >= vocab_size)):
        raise DllmError(f"soft_ids must be token ids in 0..{vocab_size - 1}")
    sums = probs.sum(-1, dtype=np.float64) if probs.size else np.zeros(1)
    if not np.isfinite(probs).all() or (probs.size and probs.min() < 0) or sums.max() > 1 + 1e-3:
        raise DllmError("soft_probs must be probabilities: each in [0, 1], each position's summing to at most 1")
    if ids.shape[2] < k:
        pad = ((0, 0), (0, 0), (0, k - ids.shape[2]))
        ids, probs = np.pad(ids, pad), np.pad(probs, pad)
    return np.ascontiguousarray(ids, dtype=np.int32), np.ascontiguousarray(probs, dtype=np.float32)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def open_runner(kind: str, path: str | Path, precision: str = "fp32", **options) -> Runner:
    """The runner `kind` over a checkpoint (torch) or a bundle (onnx, trt); `auto` picks by what `path` is."""
    if kind == "auto":  # what `generate.open_model` also decides, with the options each runner takes
        kind = "onnx" if is_bundle(path) else "torch"
    if kind not in RUNNERS:
        raise DllmError(f"unknown backend {kind!r}; choose one of: auto, {', '.join(RUNNERS)}")
    parse_precisions(precision, kind)  # an unknown precision, or one this runner does not run, is refused
    if kind == "torch":
        from jetson_dllm.runners.torch_runner import runner_from_checkpoint

        return runner_from_checkpoint(str(path), **options)
    if kind == "onnx":
        from jetson_dllm.runners.onnx_runner import onnx_runner_from_bundle

        return onnx_runner_from_bundle(str(path), precision=precision, **options)
    return trt_runner_from_bundle(str(path), precision=precision, **options)


def trt_runner_from_bundle(bundle_path: str, precision: str = "fp16", build: bool = True, cuda_graph: bool = True, progress=None) -> Runner:
    """A bundle on TensorRT: a canvas graph's engine per (batch, canvas) (runners/trt_runner.py), or a cached
    family's block-step and commit engines per batch over a cache on the GPU (runners/trt_blocks.py); engines are
    found in `engines/` or built on first use."""
    from jetson_dllm.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    check_engines(bundle.config, bundle.path)
    if bundle.family.cached:
        from jetson_dllm.runners.trt_blocks import TrtBlockRunner

        return TrtBlockRunner(bundle, precision, build=build, progress=progress)
    from jetson_dllm.runners.trt_runner import TrtRunner

    return TrtRunner(bundle, precision, build=build, cuda_graph=cuda_graph, progress=progress)
