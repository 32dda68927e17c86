"""The TensorRT runner, driven by pycuda: the Jetson's fast path.

One engine per (batch, canvas), found or built by jetson_dllm.engine_build (runners/trt_common.py). Per thread, one execution context,
one non-default stream and I/O buffers allocated once: on an integrated GPU (the Jetson) mapped pinned
memory that the GPU reads and writes in place (zero-copy), elsewhere pinned host memory plus device
buffers and async copies. CUDA events time every step on the GPU. When cuda-python is installed the
enqueue is captured once into a CUDA graph and replayed (pycuda has no capture API); otherwise, or if
capture fails, each step enqueues normally.
"""

from __future__ import annotations

import threading

import numpy as np

from jetson_dllm.bundle import Bundle
from jetson_dllm.engine import input_shapes, io_buffers
from jetson_dllm.errors import DllmError
from jetson_dllm.runners.feeds import canvas_inputs
from jetson_dllm.runners.graphs import SAMPLING_OUTPUTS
from jetson_dllm.runners.protocol import RunnerBase, check_graph
from jetson_dllm.runners.trt_common import TrtEngines


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

    def __init__(self, trt, cuda, engine, cfg, batch: int, canvas: int, k: int, integrated: bool, use_graph: bool):
        self.cuda, self.integrated = cuda, integrated
        self.context = engine.create_execution_context()
        self.stream = cuda.Stream()
        self.host, self.device = {}, {}
        for name, (shape, dtype, nbytes) in io_buffers(cfg, ("canvas",), batch, k, canvas).items():
            if integrated:  # zero-copy: the GPU works on the pinned pages themselves
                self.host[name] = cuda.pagelocked_empty(shape, dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
                address = self.host[name].base.get_device_pointer()
            else:
                self.host[name] = cuda.pagelocked_empty(shape, dtype)
                self.device[name] = cuda.mem_alloc(nbytes)
                address = int(self.device[name])
            if not self.context.set_tensor_address(name, address):
                raise DllmError(f"TensorRT refused the buffer for {name}; rebuild the engine")
        self.inputs = input_shapes(cfg, batch, canvas)  # tokens, and a model's soft inputs
        for name, shape in self.inputs.items():
            if not self.context.set_input_shape(name, shape):
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

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self.cuda
        for name in self.inputs:
            np.copyto(self.host[name], inputs[name])
            if not self.integrated:
                cuda.memcpy_htod_async(self.device[name], self.host[name], self.stream)
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


class TrtRunner(RunnerBase):
    """A canvas graph's engines on TensorRT, one per (batch, canvas)."""

    returns_logits = False  # engines mark the sampling head only: the logits stay on the GPU

    def __init__(self, bundle: Bundle, precision: str = "fp16", build: bool = True, cuda_graph: bool = True, progress=None):
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer()
        self.trt_engines = TrtEngines(bundle, precision, build, progress)  # a clear error without TensorRT, pycuda or a GPU
        import pycuda.driver as cuda  # this module drives pycuda and TensorRT itself (their names are checked here)
        import tensorrt as trt

        self.trt, self.cuda, self.device = trt, cuda, self.trt_engines.device
        self.precision, self.cfg, self.topk = precision, bundle.config, bundle.topk
        self.canvas_lengths = bundle.canvas_lengths
        self.cuda_graph = cuda_graph
        self._local = threading.local()
        bundle.onnx_path(precision)  # the bundle must have the precision asked for
        self.graphs = bundle.family.trt_graphs
        self.name = f"trt-{precision}"

    def _runner(self, shape: tuple[int, int]) -> _EngineRun:
        runners = getattr(self._local, "runners", None)
        if runners is None:
            runners = self._local.runners = {}
            if threading.current_thread() is not threading.main_thread():
                self._local.context = self.cuda.Device(0).retain_primary_context()
                self._local.context.push()
        if shape not in runners:
            runners[shape] = _EngineRun(self.trt, self.cuda, self.trt_engines.engine(shape[0], shape[1]), self.cfg, shape[0], shape[1], self.topk,
                                        self.device.integrated, self.cuda_graph)
        return runners[shape]

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        outputs = outputs or check_graph(self, graph).outputs
        if "logits" in outputs:
            raise DllmError("TensorRT engines carry the sampling head only; use the onnx backend for logits")
        inputs = canvas_inputs(feeds, self.canvas_lengths, self.cfg)
        runner = self._runner(inputs["tokens"].shape)
        result = runner.run(inputs)
        self.last_gpu_ms = runner.gpu_ms
        return {name: result[name] for name in outputs}

    def memory(self) -> dict[str, int]:
        return self.trt_engines.memory()

    def close(self) -> None:
        self._local = threading.local()
        self.trt_engines.close()
