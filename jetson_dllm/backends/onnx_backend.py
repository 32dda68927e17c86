"""The onnxruntime backend: runs a bundle's ONNX model with the CPU, CUDA or TensorRT execution provider.

For sampling, the session is built from the graph with the `logits` output removed, so the vocabulary-
sized tensor stays internal; inputs and outputs are bound (I/O binding) to buffers allocated once per
canvas shape, so a denoising step allocates nothing on the Python side. Returned arrays are those
buffers: they stay valid until the next call with the same shape (copy them to keep them longer).
"""

from __future__ import annotations

import os

import numpy as np

from jetson_dllm.backends import SAMPLING_OUTPUTS, check_tokens
from jetson_dllm.bundle import load_bundle
from jetson_dllm.errors import DllmError

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def resolve_providers(spec: str, available: list[str], cache_dir: str, fp16: bool) -> list:
    """Provider list for onnxruntime from "cpu", "cuda", "trt" or full names, comma-separated."""
    names = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in (spec or "cpu").split(",") if p.strip()]
    missing = [n for n in names if n not in available]
    if missing:
        raise DllmError(f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)}); "
                        "install onnxruntime-gpu (see jetson-setup.sh) or use --providers cpu")
    providers: list = []
    for n in names:
        if n == "TensorrtExecutionProvider":
            providers.append((n, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir,
                                  "trt_timing_cache_enable": True, "trt_fp16_enable": fp16}))
        else:
            providers.append(n)
    if "CPUExecutionProvider" not in names:
        providers.append("CPUExecutionProvider")  # for any node the accelerator does not take
    return providers


class OnnxBackend:
    def __init__(self, bundle_path: str, precision: str = "fp32", providers: str = "cpu", threads: int = 0, verify_files: bool = True):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise DllmError("the onnx backend needs onnxruntime and onnx: pip install 'jetson-dllm[export]'") from None
        self.ort = ort
        self.bundle = load_bundle(bundle_path, verify=verify_files)
        self.tokenizer = self.bundle.tokenizer()
        path = self.bundle.onnx_path(precision)
        if verify_files:
            self.bundle.check([path.name])
        self.precision, self.cfg = precision, self.bundle.config
        self.topk, self.canvas_lengths = self.bundle.topk, self.bundle.canvas_lengths
        cache = self.bundle.engines_dir / "ort-trt"
        self.providers = resolve_providers(providers, ort.get_available_providers(), str(cache), fp16=precision != "fp32")
        if any(isinstance(p, tuple) for p in self.providers):
            cache.mkdir(parents=True, exist_ok=True)
        self.options = ort.SessionOptions()
        self.options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.options.intra_op_num_threads = threads or physical_cores()
        self.options.log_severity_level = 3
        self.path = path
        if path.suffix == ".ort":  # onnxruntime's own format (the CPU INT8 variant): used as it is
            self.weight_bytes = path.stat().st_size
            self.session = self._session(str(path))
        else:
            # The sampling graph is the file with `logits` dropped from the outputs. Nothing of it is kept
            # once the session holds the weights: on a Jetson every copy comes out of the same 8 GB.
            from jetson_dllm.profiler import onnx_weight_bytes

            proto = onnx.load(str(path))
            self.weight_bytes = onnx_weight_bytes(proto)
            keep = [o for o in proto.graph.output if o.name in SAMPLING_OUTPUTS]
            del proto.graph.output[:]
            proto.graph.output.extend(keep)
            data = proto.SerializeToString()
            del proto
            self.session = self._session(data)
            del data
        self._full = None
        self.name = f"onnx-{self.session.get_providers()[0].replace('ExecutionProvider', '').lower()}"
        self._bound: dict[tuple[int, int], tuple] = {}

    def _session(self, model: bytes | str):
        try:
            return self.ort.InferenceSession(model, self.options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
            raise DllmError(f"onnxruntime could not load {self.precision} model of {self.bundle.path}: {str(e).splitlines()[0][:160]}") from None

    def _binding(self, shape: tuple[int, int]):
        """Input and output buffers for a canvas shape, bound once and reused by every later step."""
        if shape not in self._bound:
            if len(self._bound) > 8:  # many shapes (a sweep): keep memory bounded
                self._bound.clear()
            B, T = shape
            tokens = np.zeros(shape, dtype=np.int32)
            outs = {"topk_logprobs": np.zeros((B, T, self.topk), dtype=np.float32),
                    "topk_ids": np.zeros((B, T, self.topk), dtype=np.int32)}
            binding = self.session.io_binding()
            binding.bind_input("tokens", "cpu", 0, np.int32, list(shape), tokens.ctypes.data)
            for name, arr in outs.items():
                binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            self._bound[shape] = (binding, tokens, outs)
        return self._bound[shape]

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = SAMPLING_OUTPUTS) -> dict[str, np.ndarray]:
        tokens = check_tokens(feeds, self.canvas_lengths, self.cfg.vocab_size)
        if "logits" in outputs:
            if self._full is None:  # the file itself has every output
                self._full = self.session if self.path.suffix == ".ort" else self._session(str(self.path))
            result = self._full.run(list(outputs), {"tokens": tokens})
            return dict(zip(outputs, result))
        binding, buf, outs = self._binding(tokens.shape)
        np.copyto(buf, tokens)
        self.session.run_with_iobinding(binding)
        return {name: outs[name] for name in outputs}

    def memory(self) -> dict[str, int]:
        return {"weights": self.weight_bytes}

    def close(self) -> None:
        self._bound.clear()
        self.session = self._full = None
