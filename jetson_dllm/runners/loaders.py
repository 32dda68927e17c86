"""Opening a runner: `open_runner` (torch over a checkpoint, onnxruntime or TensorRT over a bundle, by name) and
`trt_runner_from_bundle`. Kept out of the protocol modules so that no import circle runs through them: the runners
import the contract, and only this module imports the runners (lazily)."""

from __future__ import annotations

from pathlib import Path

from jetson_dllm.errors import DllmError
from jetson_dllm.families import check_engines
from jetson_dllm.precisions import RUNNERS, parse_precisions
from jetson_dllm.runners.protocol import Runner


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
    return trt_runner_from_bundle(str(path), precision=precision, **options)


def trt_runner_from_bundle(bundle_path: str, precision: str = "fp16", build: bool = True, cuda_graph: bool = True, progress=None) -> Runner:
    """A bundle on TensorRT: a canvas graph's engine per (batch, canvas) (runners/trt_runner.py), or a cached
    family's block-step and commit engines per batch over a cache on the GPU (runners/trt_blocks.py); engines are
    found in `engines/` or built on first use."""
    from jetson_dllm.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    check_engines(bundle.config, bundle.path)
    if bundle.family.cached:
        from jetson_dllm.runners.trt_blocks import TrtBlockRunner

        return TrtBlockRunner(bundle, precision, build=build, progress=progress)
    from jetson_dllm.runners.trt_runner import TrtRunner

    return TrtRunner(bundle, precision, build=build, cuda_graph=cuda_graph, progress=progress)
