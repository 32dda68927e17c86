"""Text generation: a model path -> a runner -> prompt -> canvas -> the sampler -> text (or, for the
autoregressive baseline, token by token through the torch runner's KV cache)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import check_fits, memory_plan
from jetson_dllm.prompt import PLACEHOLDER, Canvas, build_canvas
from jetson_dllm.runners import SAMPLING_OUTPUTS, Runner, is_bundle, open_runner, sampling_fn
from jetson_dllm.sampler import SamplerConfig, SampleResult, SpecialIds, Step, sample
from jetson_dllm.tokenizer import TextTokenizer


@dataclass
class Generation:
    texts: list[str]
    canvas: Canvas
    result: SampleResult
    backend: str
    sampler: SamplerConfig

    def to_json(self) -> dict:
        r = self.result
        return {
            "texts": self.texts,
            "tokens": r.tokens.tolist(),
            "backend": self.backend,
            "canvas_len": int(self.canvas.tokens.size),
            "steps_asked": self.sampler.steps,
            "steps": r.steps,
            "evaluations": r.evaluations,
            "deadline_hit": r.deadline_hit,
            "total_ms": r.total_s * 1e3,
            "network_ms": r.network_s * 1e3,
            "sampler_ms": r.sampler_s * 1e3,
            "step_ms": [{"network": s.network_ms, "sampler": s.sampler_ms, "evaluated": s.evaluated} for s in r.history],
            "sampler": self.sampler.__dict__,
        }

    def summary(self) -> str:
        r = self.result
        return (f"{self.backend}: {r.steps} steps, {r.evaluations} network evaluations, canvas {self.canvas.tokens.size}, "
                f"{r.total_s * 1e3:.0f} ms ({r.network_s * 1e3:.0f} ms network)" + (", deadline hit" if r.deadline_hit else ""))


@dataclass
class ArGeneration:
    """What the autoregressive baseline generated, in the same shape of report."""

    texts: list[str]
    tokens: np.ndarray
    new_tokens: int
    seconds: float
    backend: str = "torch-ar"

    def to_json(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens.tolist(), "backend": self.backend, "new_tokens": self.new_tokens,
                "evaluations": self.new_tokens, "total_ms": self.seconds * 1e3}

    def summary(self) -> str:
        return f"autoregressive: {self.new_tokens} tokens with a KV cache in {self.seconds * 1e3:.0f} ms"


def open_model(path: str | Path, backend: str = "auto", precision: str = "fp32", device: str = "cpu", providers: str = "",
               threads: int = 0) -> Runner:
    """The runner for a checkpoint (torch) or a bundle (onnx, trt); `auto` picks torch or onnx by what `path` holds."""
    kind = backend if backend != "auto" else ("onnx" if is_bundle(path) else "torch")
    options: dict = {}
    if kind == "torch":
        options = {"device": device, "threads": threads}
    elif kind == "onnx":
        options = {"threads": threads, **({"providers": providers} if providers else {})}
    return open_runner(kind, path, precision=precision, **options)


def generate(
    runner: Runner,
    tokenizer: TextTokenizer,
    prompt: str,
    length: int = 0,
    num_samples: int = 1,
    sampler: SamplerConfig | None = None,
    gap: int = 12,
    on_step: Callable[[np.ndarray, Step], None] | None = None,
    allow_empty: bool = False,
) -> Generation:
    """Generate `num_samples` completions (or infillings) of `prompt` as one batch."""
    sampler = sampler or SamplerConfig()
    sampler.validate()
    if num_samples <= 0:
        raise DllmError(f"--num-samples must be positive, got {num_samples}")
    canvas = build_canvas(tokenizer, prompt, length, runner.canvas_lengths, gap=gap, allow_empty=allow_empty)
    plan = memory_plan(runner.cfg, runner.precision, num_samples, canvas.tokens.size, runner.topk, device=False)
    check_fits(plan["activations"] + plan["io"], f"{num_samples} samples of a {canvas.tokens.size}-token canvas",
               "generate fewer samples at once (-n) or a shorter --length")
    tokens, fixed = canvas.batch(num_samples)
    special = SpecialIds(mask=tokenizer.mask_id, eot=tokenizer.eot_id, pad=tokenizer.pad_id)
    result = sample(sampling_fn(runner), tokens, fixed, special, sampler, on_step=on_step)
    texts = [tokenizer.decode(row) for row in result.tokens]
    return Generation(texts, canvas, result, runner.name, sampler)


def complete(runner: Runner, prompt: str, length: int = 0, num_samples: int = 1, sampler: SamplerConfig | None = None,
             gap: int = 12, on_step=None) -> Generation | ArGeneration | BlockGeneration:
    """`dllm run`'s generation: the diffusion sampler, or token by token for the autoregressive baseline."""
    sampler = sampler or SamplerConfig()
    sampler.validate()
    if runner.cfg.block_size:
        return complete_blockwise(runner, prompt, length, num_samples, sampler, on_step)
    if not runner.cfg.causal:
        return generate(runner, runner.tokenizer, prompt, length, num_samples, sampler, gap, on_step=on_step)
    tok, ids = runner.tokenizer, _left_to_right(runner, prompt, "generate_autoregressive", "the autoregressive baseline",
                                                "its decode graph runs on onnxruntime; TensorRT engines for it are not built yet")
    _check_context(runner, [runner.tokenizer.eot_id, *ids], length and length - 1)  # the start token, the last token never read
    result = runner.generate_autoregressive(ids, length or runner.cfg.canvas_len - len(ids), num_samples,
                                            sampler.temperature, sampler.top_k, sampler.top_p, sampler.seed)
    return ArGeneration([tok.decode(r) for r in result.tokens], result.tokens, result.new_tokens, result.seconds)


@dataclass
class BlockGeneration:
    """What a block-diffusion model generated: block by block with an exact KV cache."""

    texts: list[str]
    tokens: np.ndarray
    new_tokens: int
    evaluations: int
    commits: int
    seconds: float
    block: int
    backend: str = "torch-bd3"
    folded: int = 0  # commits done inside the next block's first step

    def to_json(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens.tolist(), "backend": self.backend, "block_size": self.block,
                "new_tokens": self.new_tokens, "evaluations": self.evaluations, "cache_passes": self.commits, "folded_commits": self.folded,
                "total_ms": self.seconds * 1e3, "tokens_per_s": self.new_tokens * len(self.texts) / max(self.seconds, 1e-9)}

    def summary(self) -> str:
        return (f"block diffusion (block {self.block}): {self.new_tokens} tokens, {self.evaluations} network evaluations, "
                f"{self.commits} cache passes ({self.folded} more folded into steps), {self.seconds * 1e3:.0f} ms")


def complete_blockwise(runner: Runner, prompt: str, length: int, num_samples: int, sampler: SamplerConfig, on_step=None) -> BlockGeneration:
    """A block-diffusion model's generation: `sampler.steps` per block; ends at end-of-text or `length` tokens;
    `on_step` sees the text grow block by block."""
    tok, ids = runner.tokenizer, _left_to_right(runner, prompt, "generate_blockwise", "a block-diffusion model",
                                                "its block-step graphs run on onnxruntime and TensorRT")
    _check_context(runner, ids, length)
    r = runner.generate_blockwise(ids, length or runner.cfg.canvas_len - len(ids), num_samples, sampler, on_step=on_step)
    texts = [tok.decode([int(t) for t in row]) for row in r.tokens]
    return BlockGeneration(texts, r.tokens, r.new_tokens, r.evaluations, r.commits, r.seconds, runner.cfg.block_size,
                           "torch-bd3" if runner.name.startswith("torch") else runner.name, r.folded)


def _check_context(runner: Runner, ids: list[int], length: int) -> None:
    """A left-to-right model's cache (its context) holds the prompt and the tokens it generates, no more."""
    limit = runner.cfg.canvas_len
    if len(ids) + length > limit or len(ids) >= limit:
        raise DllmError(f"the prompt ({len(ids)} tokens) and --length {length} need {len(ids) + length} positions; "
                        f"this model's context (its cache) holds {limit}: shorten the prompt or --length")


def _left_to_right(runner: Runner, prompt: str, method: str, what: str, why_torch: str) -> list[int]:
    """The prompt's ids for a model that writes left to right (no gaps to fill), on a runner that can."""
    if PLACEHOLDER.search(prompt):
        raise DllmError(f"{what} writes left to right and cannot fill gaps; use a masked-diffusion (MDLM) model for infilling")
    if not hasattr(runner, method):
        raise DllmError(f"{what} runs on the torch backend for now ({why_torch})")
    return runner.tokenizer.encode(prompt)


@dataclass
class CanvasRecorder:
    """A runner wrapper that keeps a copy of every canvas the network runs on, for INT8 calibration.

    Saved as `.npz` with `tokens` (n, canvas) int32 and `tokenizer_sha256` (what `dllm export --calib-file` reads).
    """

    runner: Runner
    seen: list = field(default_factory=list)

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.runner.close()
        return False

    def run(self, feeds, outputs=SAMPLING_OUTPUTS):
        self.seen.append(feeds["tokens"].copy())
        return self.runner.run(feeds, outputs)

    def save(self, path: str | Path) -> int:
        """Write the recorded canvases (all of one length) and return how many there are."""
        tokens = np.concatenate(self.seen) if self.seen else np.zeros((0, 0), dtype=np.int32)
        np.savez_compressed(path, tokens=tokens, tokenizer_sha256=self.runner.tokenizer.sha256)
        return len(tokens)


UNDERTRAINED = 0.9  # within 10% of the word-frequency baseline: little learned beyond it


def undertrained_note(runner: Runner) -> str | None:
    """A warning when the model's validation NLL is not clearly below what knowing only word frequencies scores
    (recorded with each checkpoint): its text will not read like the data."""
    metrics = getattr(runner, "metrics", None) or {}
    nll, baseline = metrics.get("val_nll"), metrics.get("unigram_nll")
    if not isinstance(nll, (int, float)) or not isinstance(baseline, (int, float)) or not nll > UNDERTRAINED * baseline:
        return None
    return (f"this model is undertrained (validation NLL {nll:.2f} against {baseline:.2f} for word frequencies alone): expect "
            "text that does not read like its data yet; train it longer (dllm train ... --resume --steps N)")


def read_prompt(prompt: str) -> str:
    """The prompt itself, or standard input when it is "-"."""
    if prompt != "-":
        return prompt
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError as e:
        raise DllmError(f"the prompt on standard input is not UTF-8 (bad byte at offset {e.start}); convert it first") from None
