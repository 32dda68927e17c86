"""The onnxruntime runner's key/value cache: buffers allocated once per batch size and bound to every cached graph.

The cache (n_layer, batch, heads, max_len, head_dim), the tokens (a block, or one token) and valid length, the
finished block of the commit step, the top-K outputs and the new keys and values of a cache-writing graph are
allocated once and bound to the sessions through I/O binding. A call writes its feeds into the bound buffers and
runs; a cache-writing graph's keys and values are then copied into the cache at the valid length, in place. Nothing
is allocated or converted between calls. The buffers are host memory: on the CPU provider that is where the graphs
run; with the CUDA provider onnxruntime would copy the bound cache to the GPU on each call, which is why the GPU
path for cached graphs is TensorRT (trt_blocks.py).
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.runners import COMMIT_OUTPUTS, ENTROPY, GRAPHS, graph_spec


class CacheBuffers:
    """One batch size's buffers, bound once to each cached graph's session. `sessions`: graph -> session; `width`:
    the tokens a call takes (the block, or 1)."""

    def __init__(self, sessions: dict, cfg, batch: int, k: int, width: int):
        cache = (cfg.n_layer, batch, cfg.n_kv_head, cfg.canvas_len, cfg.head_dim)
        new = (cfg.n_layer, batch, cfg.n_kv_head, width, cfg.head_dim)
        self.k, self.v = np.zeros(cache, np.float32), np.zeros(cache, np.float32)
        self.inputs = {"tokens": np.zeros((batch, width), np.int32), "prev_tokens": np.zeros((batch, width), np.int32),
                       "valid_len": np.zeros((), np.int32), "k_cache": self.k, "v_cache": self.v}
        self.out = {"topk_logprobs": np.zeros((batch, width, k), np.float32), "topk_ids": np.zeros((batch, width, k), np.int32),
                    "k_new": np.zeros(new, np.float32), "v_new": np.zeros(new, np.float32), ENTROPY: np.zeros((batch, width), np.float32)}
        self.bindings = {graph: self._binding(session, graph, cfg) for graph, session in sessions.items()}

    def _binding(self, session, graph: str, cfg):
        spec = graph_spec(graph, cfg)
        io = session.io_binding()
        for name in (*spec.inputs, "k_cache", "v_cache"):
            a = self.inputs[name]
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        has_entropy = ENTROPY in {o.name for o in session.get_outputs()}
        for name in spec.outputs + (COMMIT_OUTPUTS if spec.cache == "write" else ()) + ((ENTROPY,) if has_entropy else ()):
            a = self.out[name]
            io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        return io

    def load(self, graph: str, feeds: dict[str, np.ndarray]) -> None:
        for name in GRAPHS[graph].inputs:
            np.copyto(self.inputs[name], feeds[name], casting="unsafe")

    def write_new(self) -> None:
        """The new keys and values into the cache at the valid length, in place."""
        valid, b = int(self.inputs["valid_len"]), self.inputs["tokens"].shape[1]
        self.k[:, :, :, valid : valid + b] = self.out["k_new"]
        self.v[:, :, :, valid : valid + b] = self.out["v_new"]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
