"""The TensorRT runner, driven by pycuda: the Jetson's fast path.

One engine per (batch, canvas), found or built by jetson_dllm.engine. Per thread, one execution context,
one non-default stream and I/O buffers allocated once: on an integrated GPU (the Jetson) mapped pinned
memory that the GPU reads and writes in place (zero-copy), elsewhere pinned host memory plus device
buffers and async copies. CUDA events time every step on the GPU. When cuda-python is installed the
enqueue is captured once into a CUDA graph and replayed (pycuda has no capture API); otherwise, or if
capture fails, each step enqueues normally.
"""

from __future__ import annotations

import threading

import numpy as np

from jetson_dllm.bundle import Bundle, load_bundle
from jetson_dllm.engine import detect_device, io_buffers
from jetson_dllm.engine_build import find_or_build
from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import unified_memory
from jetson_dllm.runners import SAMPLING_OUTPUTS, RunnerBase, check_tokens


def _cudart():
    """cuda-python's runtime module (new and old layouts), or None."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return None
    return cudart


class _EngineRun:
    """One engine's execution context, stream, buffers and (maybe) CUDA graph, used by one thread."""

    def __init__(self, trt, cuda, engine, batch: int, canvas: int, k: int, integrated: bool, use_graph: bool):
        self.cuda, self.integrated = cuda, integrated
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self.host, self.device = {}, {}
        for name, (shape, dtype, nbytes) in io_buffers(batch, canvas, k).items():
            if integrated:  # zero-copy: the GPU works on the pinned pages themselves
                self.host[name] = cuda.pagelocked_empty(shape, dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
                address = self.host[name].base.get_device_pointer()
            else:
                self.host[name] = cuda.pagelocked_empty(shape, dtype)
                self.device[name] = cuda.mem_alloc(nbytes)
                address = int(self.device[name])
            if not self.context.set_tensor_address(name, address):
                raise DllmError(f"TensorRT refused the buffer for {name}; rebuild the engine")
        if not self.context.set_input_shape("tokens", (batch, canvas)):
            raise DllmError(f"the engine does not take a {batch} x {canvas} canvas; rebuild it for that shape")
        self.start, self.end = cuda.Event(), cuda.Event()
        self.gpu_ms = 0.0
        self.graph = None
        self._enqueue()  # the first run initialises the engine; never capture that
        self.stream.synchronize()
        if use_graph:
            self.graph = self._capture()

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise DllmError("TensorRT failed to enqueue the engine; rebuild it or check the messages above")

    def _capture(self):
        cudart = _cudart()
        if cudart is None:
            return None
        try:
            handle = cudart.cudaStream_t(self.stream.handle)
            (err,) = cudart.cudaStreamBeginCapture(handle, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
            if err != cudart.cudaError_t.cudaSuccess:
                return None
            ok = self.context.execute_async_v3(self.stream.handle)
            err, graph = cudart.cudaStreamEndCapture(handle)
            if not ok or err != cudart.cudaError_t.cudaSuccess:
                return None
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
            if err != cudart.cudaError_t.cudaSuccess:
                return None
            return cudart, handle, graph, graph_exec
        except Exception:  # any cuda-python mismatch: plain enqueue is always correct
            return None

    def run(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        cuda = self.cuda
        np.copyto(self.host["tokens"], tokens)
        if not self.integrated:
            cuda.memcpy_htod_async(self.device["tokens"], self.host["tokens"], self.stream)
        self.start.record(self.stream)
        if self.graph is not None:
            cudart, handle, _, graph_exec = self.graph
            (err,) = cudart.cudaGraphLaunch(graph_exec, handle)
            if err != cudart.cudaError_t.cudaSuccess:
                self.graph = None
                self._enqueue()
        else:
            self._enqueue()
        self.end.record(self.stream)
        if not self.integrated:
            for name in SAMPLING_OUTPUTS:
                cuda.memcpy_dtoh_async(self.host[name], self.device[name], self.stream)
        self.stream.synchronize()
        self.gpu_ms = self.end.time_since(self.start)
        return {name: self.host[name] for name in SAMPLING_OUTPUTS}


def engine_from_bundle(runtime, bundle: Bundle, precision: str, batch: int, canvas: int, build: bool = True, progress=None):
    """The deserialized engine for (precision, batch, canvas) on this device, found in or built into the bundle.
    Returns (engine, plan bytes)."""
    path = find_or_build(bundle, precision, batch, canvas, build=build, progress=progress)
    data = path.read_bytes()
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise DllmError(f"{path.name} cannot be loaded by this TensorRT; delete it and run dllm build again")
    return engine, len(data)


class TrtRunner(RunnerBase):
    def __init__(self, bundle: Bundle, precision: str = "fp16", build: bool = True, cuda_graph: bool = True, progress=None):
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer()
        self.device = detect_device()  # a clear error without TensorRT, pycuda or a GPU
        import pycuda.autoprimaryctx  # noqa: F401  (the primary context, shared with TensorRT)
        import pycuda.driver as cuda
        import tensorrt as trt

        self.trt, self.cuda = trt, cuda
        self.precision, self.cfg, self.topk = precision, bundle.config, bundle.topk
        self.canvas_lengths = bundle.canvas_lengths
        self.build, self.cuda_graph, self.progress = build, cuda_graph, progress
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines: dict[tuple[int, int], object] = {}
        self.plan_bytes = 0
        self._local = threading.local()
        self._lock = threading.Lock()
        bundle.onnx_path(precision)  # the bundle must have the precision asked for
        self.name = f"trt-{precision}"

    def _engine(self, shape: tuple[int, int]):
        with self._lock:
            if shape not in self.engines:
                engine, size = engine_from_bundle(self.runtime, self.bundle, self.precision, shape[0], shape[1],
                                                  build=self.build, progress=self.progress)
                self.plan_bytes += size
                self.engines[shape] = engine
            return self.engines[shape]

    def _runner(self, shape: tuple[int, int]) -> _EngineRun:
        runners = getattr(self._local, "runners", None)
        if runners is None:
            runners = self._local.runners = {}
            if threading.current_thread() is not threading.main_thread():
                self._local.context = self.cuda.Device(0).retain_primary_context()
                self._local.context.push()
        if shape not in runners:
            runners[shape] = _EngineRun(self.trt, self.cuda, self._engine(shape), shape[0], shape[1], self.topk,
                                        self.device.integrated, self.cuda_graph)
        return runners[shape]

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = SAMPLING_OUTPUTS) -> dict[str, np.ndarray]:
        if "logits" in outputs:
            raise DllmError("TensorRT engines carry the sampling head only; use the onnx backend for logits")
        tokens = check_tokens(feeds, self.canvas_lengths, self.cfg.vocab_size)
        runner = self._runner(tokens.shape)
        result = runner.run(tokens)
        self.last_gpu_ms = runner.gpu_ms
        return {name: result[name] for name in outputs}

    def memory(self) -> dict[str, int]:
        activations = sum(int(e.device_memory_size_v2) for e in self.engines.values())
        mem = {"weights": self.plan_bytes, "activations": activations}
        if self.device.integrated:
            # Unified memory: cudaMemGetInfo ignores swap and counts page cache; NvMap is what the GPU holds.
            unified = unified_memory()
            if "gpu_nvmap" in unified:
                mem["device_used"] = unified["gpu_nvmap"]
        else:
            free, total = self.cuda.mem_get_info()
            mem["device_used"] = int(total - free)
        return mem

    def close(self) -> None:
        self._local = threading.local()
        self.engines.clear()


def trt_runner_from_bundle(bundle_path: str, precision: str = "fp16", build: bool = True, cuda_graph: bool = True, progress=None) -> TrtRunner:
    """A bundle on TensorRT: one engine per (batch, canvas), found in `engines/` or built on first use; a
    block-diffusion bundle: a block-step and a commit engine per batch (runners/trt_blocks.py)."""
    bundle = load_bundle(bundle_path)
    if bundle.config.block_size:
        from jetson_dllm.runners.trt_blocks import TrtBlockRunner

        return TrtBlockRunner(bundle, precision, build=build, progress=progress)
    return TrtRunner(bundle, precision, build=build, cuda_graph=cuda_graph, progress=progress)
