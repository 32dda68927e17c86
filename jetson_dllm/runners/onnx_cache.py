"""The onnxruntime runner's key/value cache: buffers allocated once per batch size and bound to every cached graph.

The cache (n_layer, batch, heads, max_len, head_dim), the tokens (a block, or one token) and each row's valid
length, the finished block of the commit step, the top-K outputs and the new keys and values of a cache-writing
graph are allocated once and bound to the sessions through I/O binding. A call writes its feeds into the bound
buffers and runs; a cache-writing graph's keys and values are then copied into the cache at each row's valid
length, in place. Nothing is allocated or converted between calls. The buffers are host memory: on the CPU provider
that is where the graphs run; with the CUDA provider onnxruntime would copy the bound cache to the GPU on each call,
which is why the GPU path for cached graphs is TensorRT (trt_blocks.py).

A pool (`open_slots`) is such buffers at the pool's rows. A call on some of its rows (`slots`) runs on buffers of
its own batch size into which those rows' caches are copied first (up to the furthest valid length), and its new
keys and values go straight into the pool's rows; a call on all of them, in order, runs on the pool itself.
Graphs exported before per-row valid lengths take one scalar for every row (`legacy`): their rows must agree.
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.feeds import condition_inputs, graph_soft_inputs
from jetson_dllm.runners.graphs import COMMIT_OUTPUTS, ENTROPY, GRAPHS, graph_spec, returns_logits


class CacheBuffers:
    """One batch size's buffers, bound once to each cached graph's session. `sessions`: graph -> session; `width`:
    the tokens a call takes (the block, or 1); `legacy`: the graphs take one valid length for every row."""

    def __init__(self, sessions: dict, cfg, batch: int, k: int, width: int, legacy: bool = False):
        cache = (cfg.n_layer, batch, cfg.n_kv_head, cfg.canvas_len, cfg.head_dim)
        new = (cfg.n_layer, batch, cfg.n_kv_head, width, cfg.head_dim)
        self.batch = batch
        self.legacy = legacy  # graphs exported before per-row valid lengths: one for every row
        self.k, self.v = np.zeros(cache, np.float32), np.zeros(cache, np.float32)
        self.cfg = cfg
        self.inputs = {"tokens": np.zeros((batch, width), np.int32), "prev_tokens": np.zeros((batch, width), np.int32),
                       "valid_len": np.zeros(() if self.legacy else (batch,), np.int32), "k_cache": self.k, "v_cache": self.v,
                       "soft_ids": np.zeros((batch, width, cfg.soft_k), np.int32), "soft_probs": np.zeros((batch, width, cfg.soft_k), np.float32),
                       "memory": np.zeros((batch, cfg.cond_len + 1, cfg.d_model), np.float32),
                       "memory_bias": np.zeros((batch, cfg.cond_len + 1), np.float32)}
        self.out = {"topk_logprobs": np.zeros((batch, width, k), np.float32), "topk_ids": np.zeros((batch, width, k), np.int32),
                    "k_new": np.zeros(new, np.float32), "v_new": np.zeros(new, np.float32), ENTROPY: np.zeros((batch, width), np.float32)}
        if any(returns_logits(graph, cfg) for graph in sessions):  # a conditional model's (guidance asks for them)
            self.out["logits"] = np.zeros((batch, width, cfg.vocab_size), np.float32)
        self.bindings = {graph: self._binding(session, graph, cfg) for graph, session in sessions.items()}

    def _binding(self, session, graph: str, cfg):
        spec = graph_spec(graph, cfg)
        io = session.io_binding()
        for name in (*spec.inputs, "k_cache", "v_cache"):
            a = self.inputs[name]
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        has = {o.name for o in session.get_outputs()}
        extra = tuple(name for name in (ENTROPY, "logits") if name in has)
        for name in spec.outputs + (COMMIT_OUTPUTS if spec.cache == "write" else ()) + extra:
            a = self.out[name]
            io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        return io

    def load(self, graph: str, feeds: dict[str, np.ndarray], valid: np.ndarray) -> None:
        for name in GRAPHS[graph].inputs:
            if name != "valid_len":
                np.copyto(self.inputs[name], feeds[name], casting="unsafe")
        for name, value in (graph_soft_inputs(graph, feeds, self.inputs["tokens"].shape, self.cfg) or {}).items():
            np.copyto(self.inputs[name], value)  # a self-conditioned block step: the previous step's top-k, or zeros
        for name, value in condition_inputs(feeds, self.batch, self.cfg).items():
            np.copyto(self.inputs[name], value)  # a conditional model's encoding, per row
        if self.legacy and (valid != valid[0]).any():
            raise DllmError("this bundle's cached graphs take one valid length for every row (exported before per-row positions); "
                            "re-export it (dllm export) to run rows at different positions in one call")
        np.copyto(self.inputs["valid_len"], valid[0] if self.legacy else valid)

    def gather(self, pool: CacheBuffers, slots: np.ndarray, upto: int) -> None:
        """The pool's rows `slots` into these buffers' rows, up to position `upto` (what the call can attend to)."""
        for r, slot in enumerate(slots):
            self.k[:, r, :, :upto] = pool.k[:, slot, :, :upto]
            self.v[:, r, :, :upto] = pool.v[:, slot, :, :upto]

    def write_new(self, into: CacheBuffers, rows: np.ndarray, valid: np.ndarray) -> None:
        """The new keys and values into `into`'s cache rows `rows`, each at its row's valid length, in place."""
        b = self.inputs["tokens"].shape[1]
        for r, (row, at) in enumerate(zip(rows, valid)):
            into.k[:, row, :, at : at + b] = self.out["k_new"][:, r]
            into.v[:, row, :, at : at + b] = self.out["v_new"][:, r]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def valid_rank(session) -> int:
    return next(len(i.shape) for i in session.get_inputs() if i.name == "valid_len")
