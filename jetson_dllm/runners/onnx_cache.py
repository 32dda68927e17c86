"""The onnxruntime runner's key/value cache: buffers allocated once per batch size and bound to every cached graph.

The cache (n_layer, batch, heads, max_len, head_dim) is allocated once per batch size; each cached graph's other
inputs and outputs (its tokens, each row's valid length, soft inputs, the encoding, the top-K, the new keys and
values) are allocated from the graph's signature (runners.graphs.signature_at) once per width (a block, one token,
or the verify graph's any number of tokens) and bound to its session with the cache through I/O binding. A call
writes its feeds into the bound buffers and runs; a cache-writing graph's keys and values are then copied into the
cache at each row's valid length, in place. Nothing is allocated or converted between calls. The buffers are host
memory: on the CPU provider that is where the graphs run; with the CUDA provider onnxruntime would copy the bound
cache to the GPU on each call, which is why the GPU path for cached graphs is TensorRT (trt_blocks.py).

A pool (`open_slots`) is such buffers at the pool's rows. A call on some of its rows (`slots`) runs on buffers of
its own batch size into which those rows' caches are copied first (up to the furthest valid length), and its new
keys and values go straight into the pool's rows; a call on all of them, in order, runs on the pool itself.
Graphs exported before per-row valid lengths take one scalar for every row (`legacy`): their rows must agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.feeds import condition_inputs, graph_soft_inputs
from jetson_dllm.runners.graphs import CACHE_INPUTS, COMMIT_OUTPUTS, TOKEN_INPUTS, signature_at

WIDTHS_KEPT = 24  # a graph of any width (verify, prefill) keeps its buffers for this many widths


@dataclass
class GraphIO:
    """One cached graph's bound buffers at one width: its inputs but the cache, its outputs, the binding."""

    inputs: dict[str, np.ndarray]
    out: dict[str, np.ndarray]
    binding: object
    width: int


class CacheBuffers:
    """One batch size's cache, and each cached graph's buffers bound with it to the graph's session (per width).
    `sessions`: graph -> session; `legacy`: the graphs take one valid length for every row."""

    def __init__(self, sessions: dict, cfg, batch: int, k: int, legacy: bool = False):
        self.sessions, self.cfg, self.batch, self.topk, self.legacy = sessions, cfg, batch, k, legacy
        graph = next(iter(sessions))
        shape, dtype = signature_at(graph, cfg, k, batch)[0]["k_cache"]
        self.k, self.v = np.zeros(shape, dtype), np.zeros(shape, dtype)
        self.io: dict[tuple[str, int], GraphIO] = {}

    def graph_io(self, graph: str, width: int) -> GraphIO:
        """The graph's buffers at `width` tokens per call, allocated and bound on first use; the outputs the signature
        names that the session has (an optional entropy, the logits of a conditional model's graphs)."""
        key = (graph, width)
        if key not in self.io:
            if len(self.io) >= WIDTHS_KEPT * len(self.sessions):
                self.io.pop(next(iter(self.io)))
            session = self.sessions[graph]
            inputs, outputs = signature_at(graph, self.cfg, self.topk, self.batch, width)
            if self.legacy:
                inputs["valid_len"] = ((), "int32")
            has = {o.name for o in session.get_outputs()}
            ins = {name: np.zeros(*shape) for name, shape in inputs.items() if name not in CACHE_INPUTS}
            out = {name: np.zeros(*shape) for name, shape in outputs.items() if name in has}
            io = session.io_binding()
            for name, a in {**ins, "k_cache": self.k, "v_cache": self.v}.items():
                io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            for name, a in out.items():
                io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            self.io[key] = GraphIO(ins, out, io, width)
        return self.io[key]

    def load(self, graph: str, feeds: dict[str, np.ndarray], valid: np.ndarray) -> GraphIO:
        """The call's feeds into the graph's buffers at the call's width; those buffers."""
        io = self.graph_io(graph, int(np.shape(feeds["tokens"])[1]))
        for name in TOKEN_INPUTS:
            if name in io.inputs:
                np.copyto(io.inputs[name], feeds[name], casting="unsafe")
        for name, value in (graph_soft_inputs(graph, feeds, io.inputs["tokens"].shape, self.cfg) or {}).items():
            np.copyto(io.inputs[name], value)  # a self-conditioned block step: the previous step's top-k, or zeros
        for name, value in condition_inputs(feeds, self.batch, self.cfg).items():
            np.copyto(io.inputs[name], value)  # a conditional model's encoding, per row
        if self.legacy and (valid != valid[0]).any():
            raise DllmError("this bundle's cached graphs take one valid length for every row (exported before per-row positions); "
                            "re-export it (dllm export) to run rows at different positions in one call")
        np.copyto(io.inputs["valid_len"], valid[0] if self.legacy else valid)
        return io

    def gather(self, pool: CacheBuffers, slots: np.ndarray, upto: int) -> None:
        """The pool's rows `slots` into these buffers' rows, up to position `upto` (what the call can attend to)."""
        for r, slot in enumerate(slots):
            self.k[:, r, :, :upto] = pool.k[:, slot, :, :upto]
            self.v[:, r, :, :upto] = pool.v[:, slot, :, :upto]

    def write_new(self, io: GraphIO, into: CacheBuffers, rows: np.ndarray, valid: np.ndarray) -> None:
        """The call's new keys and values into `into`'s cache rows `rows`, each at its row's valid length, in place."""
        k_new, v_new = (io.out[name] for name in COMMIT_OUTPUTS)
        for r, (row, at) in enumerate(zip(rows, valid)):
            into.k[:, row, :, at : at + io.width] = k_new[:, r]
            into.v[:, row, :, at : at + io.width] = v_new[:, r]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def valid_rank(session) -> int:
    return next(len(i.shape) for i in session.get_inputs() if i.name == "valid_len")
