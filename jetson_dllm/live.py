"""The live view of `dllm run`: the canvas denoising step by step in the terminal (rich)."""

from __future__ import annotations

import contextlib

import numpy as np
from rich.console import Group
from rich.live import Live
from rich.text import Text

from jetson_dllm.sampler import Step
from jetson_dllm.tokenizer import TextTokenizer


class LiveCanvas:
    """An on_step callback that redraws every sample: masked positions dimmed, new commits highlighted."""

    def __init__(self, console, tokenizer: TextTokenizer, steps: int, fps: float = 20.0):
        self.tok, self.steps = tokenizer, steps
        self.live = Live(console=console, refresh_per_second=fps, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def __call__(self, canvas: np.ndarray, step: Step) -> None:
        weight = step.weight
        rows = [self.render_row(canvas[b], step.committed[b], None if weight is None else weight[b]) for b in range(canvas.shape[0])]
        head = Text(f"step {step.index}/{self.steps}  " + ("network run" if step.evaluated else "cached")
                    + ("  (each position's top candidate; dim: weight under 0.3, bold: over 0.7)" if weight is not None else ""), style="bold")
        self.live.update(Group(head, *rows))

    def render_row(self, tokens: np.ndarray, new: np.ndarray, weight: np.ndarray | None = None) -> Text:
        """One sample's text; `weight` (SDD): each position's top candidate's probability, shown as its shade."""
        text = Text()
        tok = self.tok
        weights = weight if weight is not None else np.full(len(tokens), np.nan)
        for t, fresh, w in zip(tokens, new, weights):
            t = int(t)
            if t == tok.mask_id:
                text.append("▒", style="dim")
            elif t == tok.pad_id:
                continue
            elif t == tok.eot_id:
                text.append(" ⏎", style="dim cyan")
            else:
                shade = "" if np.isnan(w) else "dim" if w < 0.3 else "bold" if w > 0.7 else ""
                text.append(tok.piece(t), style=("bold black on yellow" if fresh else "") + (" " + shade if shade else ""))
        return text


def live_view(console, status_console, tokenizer: TextTokenizer, steps: int, enabled: bool):
    """The live canvas as a context manager yielding the on_step callback; when not `enabled`, a one-line step
    counter on `status_console` if that is a terminal (so a piped run still shows it is working), else nothing."""
    if enabled:
        return LiveCanvas(console, tokenizer, steps)
    if status_console.is_terminal:
        return StepStatus(status_console, steps)
    return contextlib.nullcontext()


class StepStatus:
    """An on_step callback that shows `step i/N` as a spinner line (stderr), for runs without the live canvas."""

    def __init__(self, console, steps: int):
        self.status, self.steps = console.status(f"denoising: step 0/{steps}"), steps

    def __enter__(self):
        self.status.__enter__()
        return self

    def __exit__(self, *exc):
        return self.status.__exit__(*exc)

    def __call__(self, canvas: np.ndarray, step: Step) -> None:
        self.status.update(f"denoising: step {step.index}/{self.steps}")
