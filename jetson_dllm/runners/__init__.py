"""Runners: one interface over torch, onnxruntime and TensorRT (+pycuda), in the shape of Polygraphy's runners.

A runner takes name-keyed numpy arrays and returns name-keyed numpy arrays, so a parity check between
runners is one loop over the same inputs (`jetson_dllm.parity.compare_runners`). Input `tokens` (B, T)
int32; outputs `topk_logprobs` (B, T, K) float32 and `topk_ids` (B, T, K) int32 (the sampling head), or
`logits` (B, T, vocab). Each runner lives in its own module and imports its library there; loaders are
plain functions (`runner_from_checkpoint`, `onnx_runner_from_bundle`, `onnx_runner_from_file`,
`trt_runner_from_bundle`). Every runner is a context manager that closes itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.precisions import RUNNERS, parse_precisions
from jetson_dllm.tokenizer import TextTokenizer

SAMPLING_OUTPUTS = ("topk_logprobs", "topk_ids")
COMMIT_OUTPUTS = ("k_new", "v_new")  # a block-diffusion commit / an AR decode step: the keys and values it wrote


class Runner(Protocol):
    name: str  # e.g. "torch-cpu", "onnx-cpu", "trt-fp16"
    precision: str  # fp32 | fp16 | int8 | int8-dynamic
    cfg: ModelConfig
    tokenizer: TextTokenizer | None  # None for a bare ONNX file
    topk: int  # K of the sampling head
    canvas_lengths: list[int]  # canvas lengths the runner accepts

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = SAMPLING_OUTPUTS) -> dict[str, np.ndarray]:
        """Run the network; `outputs` names what to return."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes the profiler reports: at least `weights`; `device_used` where the runner can tell."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...


class RunnerBase:
    """What every runner shares: closing as a context manager (the one base class; no other behaviour)."""

    def close(self) -> None:  # pragma: no cover - every runner defines its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def sampling_fn(runner: Runner):
    """The sampler's view of a runner: canvas in, (top-K log-probabilities, ids) out."""

    def run(canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = runner.run({"tokens": canvas})
        return out["topk_logprobs"], out["topk_ids"]

    return run


def check_tokens(feeds: dict[str, np.ndarray], canvas_lengths: list[int], vocab_size: int) -> np.ndarray:
    tokens = feeds.get("tokens")
    if tokens is None or tokens.ndim != 2:
        raise DllmError("the network takes one input, tokens, shaped (batch, canvas)")
    if tokens.shape[1] > max(canvas_lengths):
        raise DllmError(f"canvas of {tokens.shape[1]} tokens is longer than this model takes ({max(canvas_lengths)})")
    return np.ascontiguousarray(tokens, dtype=np.int32)


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
    from jetson_dllm.runners.trt_runner import trt_runner_from_bundle

    return trt_runner_from_bundle(str(path), precision=precision, **options)
