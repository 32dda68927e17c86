"""The TensorRT runner of a block-diffusion bundle, driven by pycuda: a block-step and a commit engine over one KV
cache that never leaves the GPU.

Buffers are allocated once per batch size and bound to both engines once. The cache (n_layer, B, heads, max_len,
head_dim, keys and values) and the commit's output (the finished block's keys and values) live in device memory:
every step re-reads the cache, and the GPU caches device memory where it does not cache mapped pinned memory
(tensorrt-jetson.md 5.5). The cache is zeroed when allocated: positions past the valid length are masked out of
attention, but a masked weight of 0 times a NaN of uninitialised memory would still be NaN. After a commit engine
runs, one 2-D device-to-device copy per tensor on the same stream writes the block into the cache at its valid
length, in place (n_layer x B x heads rows of b x head_dim floats, into rows of max_len x head_dim; per layer and
row when the rows sit at different positions). The block's
tokens, its valid length and the top-K outputs are small: zero-copy mapped pinned memory on an integrated GPU
(the Jetson), pinned host memory and async copies elsewhere. Engines come from jetson_dllm.engine_build, one block
step and one commit per (precision, batch), over the whole cache.
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.bundle import Bundle
from jetson_dllm.engine import input_shapes, io_buffers
from jetson_dllm.errors import DllmError
from jetson_dllm.runners.feeds import call_slots, graph_soft_inputs, valid_length
from jetson_dllm.runners.graphs import COMMIT_OUTPUTS, SAMPLING_OUTPUTS
from jetson_dllm.runners.protocol import RunnerBase, check_graph
from jetson_dllm.runners.trt_common import TrtEngines

ON_DEVICE = ("k_cache", "v_cache", "k_new", "v_new")  # GPU-only tensors, never mapped to the host


class _BlockSession:
    """One batch size's buffers, the two engines' execution contexts bound to them, and the stream they share."""

    def __init__(self, cuda, cfg, engines: dict, batch: int, k: int, integrated: bool):
        self.cuda, self.cfg, self.integrated, self.batch = cuda, cfg, integrated, batch
        self.stream = cuda.Stream()
        self.host, self.device, address = {}, {}, {}
        self.nbytes = {}
        for name, (shape, dtype, nbytes) in io_buffers(cfg, tuple(engines), batch, k).items():
            self.nbytes[name] = nbytes
            if name in ON_DEVICE:
                self.device[name] = cuda.mem_alloc(nbytes)
                cuda.memset_d32(self.device[name], 0, nbytes // 4)  # zeros, not NaN, past the valid length
                address[name] = int(self.device[name])
            elif integrated:  # zero-copy: the GPU works on the pinned pages themselves
                self.host[name] = cuda.pagelocked_empty(shape or (1,), dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
                address[name] = self.host[name].base.get_device_pointer()
            else:
                self.host[name] = cuda.pagelocked_empty(shape or (1,), dtype)
                self.device[name] = cuda.mem_alloc(nbytes)
                address[name] = int(self.device[name])
        self.contexts = {}
        for graph, engine in engines.items():
            context = engine.create_execution_context()
            for name, shape in input_shapes(cfg, batch, cfg.canvas_len, graph).items():
                if not context.set_input_shape(name, shape):
                    raise DllmError(f"the {graph} engine does not take {name} shaped {shape}; rebuild it (dllm build)")
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if not context.set_tensor_address(name, address[name]):
                    raise DllmError(f"TensorRT refused the buffer for {name}; rebuild the {graph} engine")
            self.contexts[graph] = context
        self.start, self.end = cuda.Event(), cuda.Event()
        self.gpu_ms = 0.0

    def _enqueue(self, graph: str, tokens: np.ndarray, valid: np.ndarray, soft: dict | None = None) -> None:
        cuda = self.cuda
        small = {"tokens": tokens, "valid_len": valid, **(soft or {})}  # a self-conditioned block step's soft inputs too
        for name, value in small.items():
            np.copyto(self.host[name], value)
        if not self.integrated:
            for name in small:
                cuda.memcpy_htod_async(self.device[name], self.host[name], self.stream)
        self.start.record(self.stream)
        if not self.contexts[graph].execute_async_v3(self.stream.handle):
            raise DllmError(f"TensorRT failed to enqueue the {graph} engine; rebuild it or check the messages above")
        self.end.record(self.stream)

    def step(self, tokens: np.ndarray, valid: np.ndarray, soft: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._enqueue("block_step", tokens, valid, soft)
        if not self.integrated:
            for name in SAMPLING_OUTPUTS:
                self.cuda.memcpy_dtoh_async(self.host[name], self.device[name], self.stream)
        self.stream.synchronize()
        self.gpu_ms = self.end.time_since(self.start)
        return tuple(self.host[name].copy() for name in SAMPLING_OUTPUTS)

    def commit(self, tokens: np.ndarray, valid: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Run the commit engine, then write its keys and values into the cache at each row's valid length, on the
        GPU (only `rows` when given: a pool call's other rows are padding); a shifted model's commit engine also
        writes the block's top-K (the block step's buffers), which come back."""
        self._enqueue("commit", tokens, valid)
        if self.cfg.shift and not self.integrated:
            for name in SAMPLING_OUTPUTS:
                self.cuda.memcpy_dtoh_async(self.host[name], self.device[name], self.stream)
        c, (batch, b) = self.cfg, tokens.shape
        row = 4 * c.head_dim  # bytes of one position's key (float32)
        # Every row at the same position (one request): one 2-D copy per tensor over all n_layer x B x heads rows;
        # rows at different positions: one per (layer, row), over its heads.
        parts = [(0, 0, c.n_layer * batch * c.n_kv_head, int(valid[0]))] if rows is None and (valid == valid[0]).all() else [
            ((layer * batch + r) * c.n_kv_head, (layer * batch + r) * c.n_kv_head, c.n_kv_head, int(valid[r]))
            for layer in range(c.n_layer) for r in (range(batch) if rows is None else rows)]
        for new, cache in zip(COMMIT_OUTPUTS, ("k_cache", "v_cache")):
            for src_row, dst_row, height, at in parts:
                copy = self.cuda.Memcpy2D()
                copy.set_src_device(int(self.device[new]) + src_row * b * row)
                copy.src_pitch = b * row
                copy.set_dst_device(int(self.device[cache]) + dst_row * c.canvas_len * row)
                copy.dst_pitch = c.canvas_len * row
                copy.dst_x_in_bytes = at * row
                copy.width_in_bytes = b * row
                copy.height = height
                copy(self.stream)
        self.stream.synchronize()  # the next call rewrites the tokens the engine read
        return tuple(self.host[name].copy() for name in SAMPLING_OUTPUTS) if self.cfg.shift else None

    def cache_bytes(self) -> int:
        return sum(self.nbytes[name] for name in ON_DEVICE)


class TrtBlockRunner(RunnerBase):
    """A cached family's bundle on TensorRT: the block-step and commit engines per batch, with the cache on the GPU."""

    returns_logits = False

    def __init__(self, bundle: Bundle, precision: str = "fp16", build: bool = True, progress=None):
        self.bundle, self.tokenizer = bundle, bundle.tokenizer()
        self.trt_engines = TrtEngines(bundle, precision, build, progress)
        import pycuda.driver as cuda  # (checked names: this module drives pycuda)

        self.cuda, self.device = cuda, self.trt_engines.device
        self.precision, self.cfg, self.topk, self.canvas_lengths = precision, bundle.config, bundle.topk, bundle.canvas_lengths
        self.graphs = bundle.family.trt_graphs
        self.width = bundle.family.positions_per_call(self.cfg, self.cfg.canvas_len)  # tokens per call: a block
        for graph in self.graphs:
            bundle.onnx_path(precision, graph)  # the bundle must have each graph at this precision
        self.name = f"trt-{precision}"
        self.sessions: dict[int, _BlockSession] = {}
        self.pool: _BlockSession | None = None  # open_slots: the server's rows

    def _session(self, batch: int) -> _BlockSession:
        if batch not in self.sessions:
            engines = {graph: self.trt_engines.engine(batch, self.cfg.canvas_len, graph) for graph in self.graphs}
            self.sessions = {batch: _BlockSession(self.cuda, self.cfg, engines, batch, self.topk, self.device.integrated)}
        return self.sessions[batch]

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """A block step or a commit over the cache on the GPU (the commit step is not built for TensorRT: the family
        loop commits on its own when a runner lacks it)."""
        outputs = outputs or check_graph(self, graph).outputs
        tokens = feeds.get("tokens")
        if tokens is None or np.ndim(tokens) != 2 or tokens.shape[1] != self.width:
            raise DllmError(f"the {graph} graph takes tokens shaped (batch, {self.width})")
        valid = valid_length(feeds, tokens.shape[0], self.cfg.canvas_len - self.width + 1)
        slots = call_slots(feeds, tokens.shape[0], self.pool.batch if self.pool else 0)
        soft = graph_soft_inputs(graph, feeds, tokens.shape, self.cfg)
        if slots is not None:
            return self._run_pool(graph, tokens, valid, slots, outputs, soft)
        session = self._session(tokens.shape[0])
        if graph == "commit":
            got = session.commit(tokens, valid)
            return {} if got is None else {name: value for name, value in zip(SAMPLING_OUTPUTS, got) if name in outputs}
        lp, ids = session.step(tokens, valid, soft)
        self.last_gpu_ms = session.gpu_ms
        return {name: value for name, value in zip(SAMPLING_OUTPUTS, (lp, ids)) if name in outputs}

    def _run_pool(self, graph: str, tokens: np.ndarray, valid: np.ndarray, slots: np.ndarray, outputs, soft: dict | None = None) -> dict[str, np.ndarray]:
        """A call on some rows of the pool: the engines run on every row of the pool (one engine per graph at the
        pool's batch, no copy of any cache: on a GPU a small model's call is bound by launches, not rows), the rows
        not in the call masked tokens at position 0, and a commit writes only the call's rows."""
        pool = self.pool
        full = np.full((pool.batch, self.width), self.cfg.mask_id, np.int32)
        at = np.zeros(pool.batch, np.int32)
        full[slots], at[slots] = tokens, valid
        if graph == "commit":
            got = pool.commit(full, at, rows=slots)
            return {} if got is None else {name: value[slots] for name, value in zip(SAMPLING_OUTPUTS, got) if name in outputs}
        if soft is not None:  # the call's rows' soft inputs; the other rows none
            padded = {name: np.zeros((pool.batch, *v.shape[1:]), v.dtype) for name, v in soft.items()}
            for name, v in soft.items():
                padded[name][slots] = v
            soft = padded
        lp, ids = pool.step(full, at, soft)
        self.last_gpu_ms = pool.gpu_ms
        return {name: value[slots] for name, value in zip(SAMPLING_OUTPUTS, (lp, ids)) if name in outputs}

    def open_slots(self, rows: int) -> int:
        engines = {graph: self.trt_engines.engine(rows, self.cfg.canvas_len, graph) for graph in self.graphs}
        self.pool = _BlockSession(self.cuda, self.cfg, engines, rows, self.topk, self.device.integrated)
        return self.pool.cache_bytes()

    def memory(self) -> dict[str, int]:
        held = [*self.sessions.values(), *([self.pool] if self.pool else [])]
        return {**self.trt_engines.memory(), "cache": sum(s.cache_bytes() for s in held)}

    def close(self) -> None:
        self.sessions.clear()
        self.pool = None
        self.trt_engines.close()
