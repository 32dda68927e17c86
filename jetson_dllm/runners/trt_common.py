"""What both TensorRT runners hold, by composition (neither runner derives from the other): pycuda and TensorRT
imported, the device, one TensorRT runtime, the engines of a bundle found in `engines/` or built on first use and
deserialized once, and the memory report (on an integrated GPU from NvMap, not cudaMemGetInfo)."""

from __future__ import annotations

import threading

from jetson_dllm.bundle import Bundle
from jetson_dllm.engine import detect_device
from jetson_dllm.engine_build import find_or_build
from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import unified_memory


class TrtEngines:
    def __init__(self, bundle: Bundle, precision: str, build: bool = True, progress=None):
        self.device = detect_device()  # a clear error without TensorRT, pycuda or a GPU
        import pycuda.autoprimaryctx  # noqa: F401  (the primary context, shared with TensorRT)
        import pycuda.driver as cuda
        import tensorrt as trt

        self.trt, self.cuda = trt, cuda
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.bundle, self.precision, self.build, self.progress = bundle, precision, build, progress
        self.engines: dict[tuple, object] = {}  # (batch, canvas, graph) -> engine
        self.plan_bytes = 0
        self._lock = threading.Lock()

    def engine(self, batch: int, canvas: int, graph: str = ""):
        """The deserialized engine for (batch, canvas, graph) on this device, found in or built into the bundle."""
        with self._lock:
            key = (batch, canvas, graph)
            if key not in self.engines:
                path = find_or_build(self.bundle, self.precision, batch, canvas, build=self.build, progress=self.progress, graph=graph)
                data = path.read_bytes()
                engine = self.runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise DllmError(f"{path.name} cannot be loaded by this TensorRT; delete it and run dllm build again")
                self.plan_bytes += len(data)
                self.engines[key] = engine
            return self.engines[key]

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
        self.engines.clear()
