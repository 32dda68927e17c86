"""The runner protocol: what every runner (torch, onnxruntime, TensorRT) is to its callers, the one base class they
share (closing as a context manager), and the check that a runner runs a graph."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.runners.graphs import ENTROPY, GraphSpec, graph_spec
from jetson_dllm.tokenizer import TextTokenizer


class Runner(Protocol):
    name: str  # e.g. "torch-cpu", "onnx-cpu", "trt-fp16"
    precision: str  # fp32 | fp16 | int8 | int8-dynamic
    cfg: ModelConfig
    tokenizer: TextTokenizer | None  # None for a bare ONNX file
    topk: int  # K of the sampling head
    canvas_lengths: list[int]  # canvas lengths the runner accepts
    graphs: tuple[str, ...]  # the graphs it runs (GRAPHS' names)
    returns_logits: bool  # the canvas graph's logits can be asked for (not from TensorRT engines: the head only)

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Run a graph; `outputs` names what to return (default: the graph's outputs)."""
        ...

    def open_slots(self, rows: int) -> int:
        """A cached family's cache pool of `rows` rows, allocated once (calls then name their rows with `slots`);
        the bytes it holds."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes the profiler reports: at least `weights`; `device_used` where the runner can tell."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...


class RunnerBase:
    """What every runner shares: closing as a context manager (the one base class; no other behaviour)."""

    returns_logits = True

    def close(self) -> None:  # pragma: no cover - every runner defines its own
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def sampling_fn(runner: Runner):
    """The sampler's view of a runner's canvas graph: canvas in, (top-K log-probabilities, ids) out."""

    def run(canvas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = runner.run("canvas", {"tokens": canvas})
        return out["topk_logprobs"], out["topk_ids"], out.get(ENTROPY)

    return run


def check_graph(runner: Runner, graph: str) -> GraphSpec:
    """The graph's spec, or a clear error when this runner (its model's family) has no such graph."""
    if graph not in runner.graphs:
        raise DllmError(f"{runner.name} runs the {', '.join(runner.graphs)} graph{'s' if len(runner.graphs) > 1 else ''} of this model, "
                        f"not {graph!r}")
    return graph_spec(graph, runner.cfg)
