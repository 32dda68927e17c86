"""Text generation: prompt -> canvas -> sampler over a backend -> text."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jetson_dllm.backends import Backend, sampling_fn
from jetson_dllm.prompt import Canvas, build_canvas
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


def generate(
    backend: Backend,
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
    from jetson_dllm.errors import DllmError

    sampler = sampler or SamplerConfig()
    sampler.validate()
    if num_samples <= 0:
        raise DllmError(f"--num-samples must be positive, got {num_samples}")
    canvas = build_canvas(tokenizer, prompt, length, backend.canvas_lengths, gap=gap, allow_empty=allow_empty)
    tokens, fixed = canvas.batch(num_samples)
    special = SpecialIds(mask=tokenizer.mask_id, eot=tokenizer.eot_id, pad=tokenizer.pad_id)
    result = sample(sampling_fn(backend), tokens, fixed, special, sampler, on_step=on_step)
    texts = [tokenizer.decode(row) for row in result.tokens]
    return Generation(texts, canvas, result, backend.name, sampler)
