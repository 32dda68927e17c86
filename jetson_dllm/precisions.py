"""The one table of precisions: the file each is exported to, its weight size, the runners that take it, TensorRT's flags."""

from __future__ import annotations

from dataclasses import dataclass

from jetson_dllm.errors import DllmError


@dataclass(frozen=True)
class Precision:
    """One precision of a bundle's graph.

    Args:
        name: what the user types (`--precision int8`).
        file: the file in the bundle.
        weight_bytes: bytes per matmul weight; embedding and norms stay FP16 below FP16 (see `ModelConfig.weight_bytes`).
        activation_bytes: bytes per activation when the graph runs.
        runners: the runners that run it.
        trt_flags: TensorRT builder flags (empty: not built into an engine, or no flags).
        exported: written by `dllm export` on request (int8 brings int8-dynamic with it).
    """

    name: str
    file: str
    weight_bytes: int
    activation_bytes: int
    runners: tuple[str, ...]
    trt_flags: tuple[str, ...] = ()
    exported: bool = True


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", "model.fp32.onnx", 4, 4, ("torch", "onnx", "trt")),
    "fp16": Precision("fp16", "model.fp16.onnx", 2, 2, ("onnx", "trt")),
    "int8": Precision("int8", "model.int8.onnx", 1, 2, ("onnx", "trt"), ("INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS")),
    "int8-dynamic": Precision("int8-dynamic", "model.int8-dynamic.ort", 1, 4, ("onnx",), exported=False),
}
WEIGHT_PRECISIONS = ("fp32", "fp16", "int8")  # the distinct weight formats (int8-dynamic stores int8 weights)
RUNNERS = ("torch", "onnx", "trt")


def precision(name: str) -> Precision:
    """The record of a precision; a clear error for an unknown one."""
    if name not in PRECISIONS:
        raise DllmError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def weight_format(name: str) -> str:
    """The weight format a precision stores (int8-dynamic -> int8)."""
    return "int8" if precision(name).weight_bytes == 1 else name


def for_runner(runner: str) -> tuple[str, ...]:
    return tuple(p.name for p in PRECISIONS.values() if runner in p.runners)


def parse_precisions(text: str, runner: str | None = None) -> list[str]:
    """A comma-separated list of precisions, every one known (and taken by `runner` when given)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise DllmError("no precision given; choose from " + ", ".join(PRECISIONS))
    for n in names:
        precision(n)
        if runner is not None and runner not in PRECISIONS[n].runners:
            raise DllmError(f"the {runner} runner does not run {n}; it runs {', '.join(for_runner(runner))}")
    return names
