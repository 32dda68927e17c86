"""A judge for generated text: its perplexity under an autoregressive checkpoint (generative perplexity).

The judge re-tokenizes the text with its own tokenizer and scores every token and the end-of-text after
it, behind an end-of-text as beginning-of-story, exactly as the AR model was trained.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jetson_dllm.errors import DllmError
from jetson_dllm.generate import complete, undertrained
from jetson_dllm.runners.torch_runner import runner_from_checkpoint
from jetson_dllm.sampler import SamplerConfig
from jetson_dllm.textstats import distinct, repetition
from train_host.autoregressive import shift_right
from train_host.checkpoint import load_model


class Judge:
    def __init__(self, checkpoint: str | Path, device: str = "cpu"):
        self.model, self.tokenizer, self.config = load_model(checkpoint, device=device)
        if self.model.cfg.attention != "causal":
            raise DllmError(f"{checkpoint} is a diffusion model; the judge must be autoregressive (dllm train --objective ar)")
        self.device = device
        why = undertrained(self.config.get("metrics"))  # a warning about the judge itself, for the caller to show
        self.note = why and (f"the judge {checkpoint} is undertrained ({why}): its perplexities rank texts by word "
                             "frequency, not by how well they read")

    @torch.inference_mode()
    def token_nll(self, texts: list[str], batch: int = 16) -> list[tuple[float, int]]:
        """(NLL in nats, tokens scored) of each text: its tokens and the end-of-text after them."""
        tok, L = self.tokenizer, self.model.cfg.canvas_len
        out = []
        for start in range(0, len(texts), batch):
            rows = [tok.encode(t)[: L - 1] + [tok.eot_id] for t in texts[start : start + batch]]
            x = torch.full((len(rows), max(map(len, rows))), tok.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, : len(r)] = torch.tensor(r)
            x = x.to(self.device)
            logits = self.model(shift_right(x, tok.bos_id)).float()
            ce = F.cross_entropy(logits.transpose(1, 2), x, reduction="none")  # (B, T)
            keep = x != tok.pad_id
            out += [(float(ce[i][keep[i]].sum()), int(keep[i].sum())) for i in range(len(rows))]
        return out

    @torch.inference_mode()
    def continuation_nll(self, conditions: list[str], texts: list[str]) -> list[tuple[float, int]]:
        """(NLL in nats, tokens scored) of each text's tokens and the end-of-text after them, read after its
        condition (a story's first sentence); an empty condition reads the text as a story's start."""
        tok, L = self.tokenizer, self.model.cfg.canvas_len
        out = []
        for condition, text in zip(conditions, texts):
            first = tok.encode(condition) if condition else []
            rest = (tok.encode(text) + [tok.eot_id])[: L - len(first)]
            x = torch.tensor([first + rest], dtype=torch.long, device=self.device)
            logits = self.model(shift_right(x, tok.bos_id)).float()[0, len(first) :]
            out.append((float(F.cross_entropy(logits, x[0, len(first) :], reduction="sum")), len(rest)))
        return out

    def perplexity(self, texts: list[str]) -> float:
        """exp(total NLL / total tokens) over the texts."""
        scores = self.token_nll(texts)
        return math.exp(sum(s for s, _ in scores) / max(1, sum(n for _, n in scores)))


def sample_quality(texts: list[str], judge: Judge | None = None) -> dict[str, float]:
    """Generative perplexity (when a judge is given), repetition and distinct-1/2 of generated texts."""
    stats = {"repetition": float(np.mean([repetition(t) for t in texts])) if texts else 0.0,
             "distinct1": distinct(texts, 1), "distinct2": distinct(texts, 2)}
    if judge is not None:
        stats["gen_ppl"] = judge.perplexity(texts)
    return stats


def judge_generations(checkpoint: str | Path, scorer: Judge | None = None, samples: int = 16, prompt: str = "Once upon a time",
                      steps: int = 64, strategy: str = "confidence", temperature: float = 0.8, seed: int = 1234, progress=None) -> dict:
    """Generate `samples` texts from a checkpoint (in batches of 8) and judge them: generative perplexity under
    `scorer` (an AR judge), repetition, distinct-n, the time per batch and an example."""
    texts, seconds = [], []
    with runner_from_checkpoint(str(checkpoint)) as runner:
        for i in range(0, samples, 8):
            sampler = SamplerConfig(steps=steps, strategy=strategy, temperature=temperature, seed=seed + i)
            t0 = time.perf_counter()
            texts += complete(runner, prompt, num_samples=min(8, samples - i), sampler=sampler).texts
            seconds.append(time.perf_counter() - t0)
            if progress:
                progress("generate", min(samples, i + 8), samples)
    return {"gen_ms": 1e3 * sum(seconds) / len(seconds), "example": texts[0][:300], **sample_quality(texts, scorer)}


def perplexity_fn(checkpoint: str | Path, warn=None):
    """The judge as a callable (texts -> generative perplexity), what `dllm bench --quality --judge` takes; `warn`
    is told when the judge is undertrained."""
    judge = Judge(checkpoint)
    if judge.note and warn is not None:
        warn(judge.note)
    return judge.perplexity
