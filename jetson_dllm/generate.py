"""Text generation: a model path -> a runner -> the model family's generation loop (jetson_dllm.families) -> text."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jetson_dllm.condition import condition_ids
from jetson_dllm.errors import DllmError
from jetson_dllm.families import check_options, family_of
from jetson_dllm.runners.graphs import GRAPHS
from jetson_dllm.runners.loaders import is_bundle, open_runner
from jetson_dllm.runners.protocol import Runner
from jetson_dllm.sampler import SamplerConfig


def open_model(path: str | Path, backend: str = "auto", precision: str = "fp32", device: str = "cpu", providers: str = "",
               threads: int = 0) -> Runner:
    """The runner for a checkpoint (torch) or a bundle (onnx, trt); `auto` picks torch or onnx by what `path` holds."""
    kind = backend if backend != "auto" else ("onnx" if is_bundle(path) else "torch")
    options: dict = {}
    if kind not in ("torch", "onnx") and threads:
        raise DllmError(f"--threads applies to the torch and onnx backends, not {kind}; leave it out")
    if kind != "torch" and device != "cpu":
        raise DllmError(f"--device is the torch backend's; the {kind} backend takes --providers (onnx) or runs on the GPU (trt)")
    if kind != "onnx" and providers:
        raise DllmError(f"--providers is the onnx backend's, not {kind}'s; leave it out")
    if kind == "torch":
        options = {"device": device, "threads": threads}
    elif kind == "onnx":
        options = {"threads": threads, **({"providers": providers} if providers else {})}
    return open_runner(kind, path, precision=precision, **options)


def complete(runner: Runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None,
             gap: int = 12, on_step=None, given: set[str] = frozenset(), condition: str | None = None):
    """`dllm run`'s generation: the model family's loop (jetson_dllm.families) on the runner. `given`: the sampler
    options the user set explicitly; one the family does not use is refused. `condition`: a conditional model's
    (refused for a model without one)."""
    sampler = (sampler or SamplerConfig()).validate()
    family = family_of(runner.cfg)
    check_options(family, set(given))
    if "guidance_schedule" in given and not sampler.guidance:
        raise DllmError("--guidance-schedule shapes --guidance over the steps; give --guidance W too, or leave it out", option="--guidance-schedule")
    if not runner.cfg.cond_len:
        condition_ids(runner, condition)  # a condition for a model without one: refused
        return family.runtime_module().complete(runner, prompt, length, num_samples, sampler, gap, on_step)
    return family.runtime_module().complete(runner, prompt, length, num_samples, sampler, gap, on_step, condition=condition)


@dataclass
class CallRecorder:
    """A runner wrapper that keeps a copy of every network call's feeds, whatever the family, for INT8 calibration
    and inspection.

    Saved as `.npz`: per graph, `GRAPH.INPUT` arrays stacked over the calls' rows (`valid_len` repeated per row; a
    graph of any width, verify, padded with -1 to its widest call and each row's width in `GRAPH.width`), `tokens`
    for the canvas graph's canvases (what `dllm export --calib-file` reads), `calls` (graph, count) and
    `tokenizer_sha256`."""

    runner: Runner
    path: Path | None = None  # where save() writes; checked before any network call
    seen: dict = field(default_factory=dict)  # graph -> input -> list of arrays

    def __post_init__(self):
        if self.path is not None:
            self.path = Path(self.path)
            if self.path.is_dir():
                raise DllmError(f"--save-canvases {self.path} is a folder; give a file name (e.g. {self.path / 'calls.npz'})")
            if not self.path.parent.is_dir():
                raise DllmError(f"--save-canvases {self.path}: the folder {self.path.parent} does not exist")

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.runner.close()
        return False

    def run(self, graph, feeds, outputs=None):
        rows = len(feeds["tokens"])
        for name, value in feeds.items():
            value = np.asarray(value)
            self.seen.setdefault(graph, {}).setdefault(name, []).append(np.full(rows, value) if value.ndim == 0 else value.copy())
        return self.runner.run(graph, feeds, outputs)

    def save_message(self, path: str | Path | None = None) -> str:
        """Save (to `path`, or the recorder's own), and say what was saved."""
        path = path or self.path
        counts = self.save(path)
        return f"saved {sum(counts.values())} network calls ({', '.join(f'{g} {n}' for g, n in counts.items())}) to {path}"

    def calls(self) -> dict[str, int]:
        return {graph: len(inputs["tokens"]) for graph, inputs in self.seen.items()}

    def save(self, path: str | Path) -> dict[str, int]:
        """Write the recorded calls; returns the number of calls per graph."""
        arrays = {f"{graph}.{name}": ragged(values) for graph, inputs in self.seen.items() for name, values in inputs.items()}
        for graph, inputs in self.seen.items():
            if GRAPHS.get(graph) and GRAPHS[graph].width == "W":  # a graph of any width: each row's own
                arrays[f"{graph}.width"] = np.concatenate([np.full(len(t), t.shape[1]) for t in inputs["tokens"]])
        if "canvas.tokens" in arrays:
            arrays["tokens"] = arrays["canvas.tokens"]
        counts = self.calls()
        np.savez_compressed(path, **arrays, calls=np.array(sorted(counts.items()), dtype=object).astype(str),
                            tokenizer_sha256=self.runner.tokenizer.sha256)
        return counts


def ragged(values: list[np.ndarray]) -> np.ndarray:
    """Calls' arrays stacked over their rows; arrays of a graph of any width (verify) padded with -1 to the widest."""
    widest = max((v.shape[1] for v in values if v.ndim > 1), default=0)
    if all(v.ndim < 2 or v.shape[1] == widest for v in values):
        return np.concatenate(values)
    return np.concatenate([np.pad(v, [(0, 0), (0, widest - v.shape[1]), *[(0, 0)] * (v.ndim - 2)], constant_values=-1) for v in values])


UNDERTRAINED = 0.9  # within 10% of the word-frequency baseline: little learned beyond it
# Below this share of the baseline text starts to read like the data (measured, docs/data-and-training.md): the
# built-in corpus's readable tiny model at 1.50 of 5.23 (0.29) and the same quickstart beside busy work, unreadable,
# at 3.98 (0.76); on TinyStories an AR model at 3.42 of 5.93 (0.58, judge perplexity 31) against MDLM at 5.21 (0.88,
# judge 71, words without sentences).
READABLE = 0.6


def undertrained(metrics: dict | None) -> str | None:
    """"validation NLL X against Y for word frequencies alone" (and how far readable text is) when a checkpoint's
    recorded validation NLL is not below READABLE x what knowing only word frequencies scores, else None."""
    metrics = metrics or {}
    nll, baseline = metrics.get("val_nll"), metrics.get("unigram_nll")
    if not isinstance(nll, (int, float)) or not isinstance(baseline, (int, float)) or not nll > READABLE * baseline:
        return None
    why = f"validation NLL {nll:.2f} against {baseline:.2f} for word frequencies alone"
    return why if nll > UNDERTRAINED * baseline else f"{why}; text reads like the data below about {READABLE * baseline:.2f}"


def undertrained_note(runner: Runner) -> str | None:
    """A warning when the model is undertrained (`undertrained`): its text will not read like the data."""
    why = undertrained(getattr(runner, "metrics", None))
    return why and (f"this model is undertrained ({why}): expect text that does not read like its data yet; train it longer "
                    "(dllm train ... --resume --steps N)")


def read_prompt(prompt: str) -> str:
    """The prompt itself, or standard input when it is "-"."""
    if prompt != "-":
        return prompt
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError as e:
        raise DllmError(f"the prompt on standard input is not UTF-8 (bad byte at offset {e.start}); convert it first") from None
