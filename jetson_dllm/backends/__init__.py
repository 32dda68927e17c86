"""Backends: one small interface over torch, onnxruntime and TensorRT (+pycuda).

A backend takes name-keyed numpy arrays and returns name-keyed numpy arrays, so a parity check between
backends is one loop over the same inputs. Input `tokens` (B, T) int32; outputs `topk_logprobs`
(B, T, K) float32 and `topk_ids` (B, T, K) int32 (the sampling head), or `logits` (B, T, vocab).
Each backend lives in its own module and imports its library there.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from jetson_dllm.errors import DllmError

SAMPLING_OUTPUTS = ("topk_logprobs", "topk_ids")
BACKENDS = ("torch", "onnx", "trt")


class Backend(Protocol):
    name: str  # e.g. "torch-cpu", "onnx-CPUExecutionProvider", "trt"
    precision: str  # fp32 | fp16 | int8 | ...
    topk: int  # K of the sampling head
    canvas_lengths: list[int]  # canvas lengths the backend accepts

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = SAMPLING_OUTPUTS) -> dict[str, np.ndarray]:
        """Run the network; `outputs` names what to return."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes the profiler reports: at least `weights`; `device` where the backend can tell."""
        ...

    def close(self) -> None: ...


def sampling_fn(backend: Backend):
    """The sampler's view of a backend: canvas in, (top-K log-probabilities, ids) out."""

    def run(canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = backend.run({"tokens": canvas})
        return out["topk_logprobs"], out["topk_ids"]

    return run


def check_tokens(feeds: dict[str, np.ndarray], canvas_lengths: list[int], vocab_size: int) -> np.ndarray:
    tokens = feeds.get("tokens")
    if tokens is None or tokens.ndim != 2:
        raise DllmError("the network takes one input, tokens, shaped (batch, canvas)")
    if tokens.shape[1] > max(canvas_lengths):
        raise DllmError(f"canvas of {tokens.shape[1]} tokens is longer than this model takes ({max(canvas_lengths)})")
    return np.ascontiguousarray(tokens, dtype=np.int32)


def open_backend(kind: str, path: str, precision: str = "fp32", **options) -> Backend:
    """The backend `kind` over a checkpoint (torch) or a bundle (onnx, trt)."""
    if kind == "torch":
        from jetson_dllm.backends.torch_backend import TorchBackend

        return TorchBackend(path, **options)
    if kind == "onnx":
        from jetson_dllm.backends.onnx_backend import OnnxBackend

        return OnnxBackend(path, precision=precision, **options)
    if kind == "trt":
        from jetson_dllm.backends.trt_backend import TrtBackend

        return TrtBackend(path, precision=precision, **options)
    raise DllmError(f"unknown backend {kind!r}; choose one of: {', '.join(BACKENDS)}")
