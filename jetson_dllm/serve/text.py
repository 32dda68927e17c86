"""From a request to canvases, and from canvases back to OpenAI-shaped text: what is generated, what is final."""

from __future__ import annotations

import numpy as np

from jetson_dllm.prompt import Canvas, build_canvas
from jetson_dllm.tokenizer import TextTokenizer


def request_canvas(tok: TextTokenizer, prompt: str, suffix: str | None, max_tokens: int, allowed: list[int]) -> Canvas:
    """The canvas of one prompt: `max_tokens` to generate after it, or (with `suffix`) a gap of `max_tokens`
    between prompt and suffix, filled by infilling."""
    if suffix:
        return build_canvas(tok, f"{prompt.rstrip()} ____ {suffix.lstrip()}", 0, allowed, gap=max_tokens, allow_empty=True)
    return build_canvas(tok, prompt, max_tokens, allowed, allow_empty=True)


def generated(row: np.ndarray, fixed: np.ndarray, tok: TextTokenizer, final: bool, max_tokens: int) -> tuple[str, bool]:
    """(text, ended) of the positions a request generates (at most `max_tokens`; a canvas is rounded up to a shape
    the model takes): all of them when `final`, else the committed prefix up to the first masked position (what
    streaming may send: it will not change). `ended` when an end-of-text came."""
    ids = row[~fixed][:max_tokens]
    if not final:
        masked = np.flatnonzero(ids == tok.mask_id)
        ids = ids[: masked[0]] if masked.size else ids
    ends = np.flatnonzero((ids == tok.eot_id) | (ids == tok.pad_id))
    ended = bool(ends.size)
    if ended:
        ids = ids[: ends[0]]
    return tok.decode([int(t) for t in ids]), ended


def cut_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    """The text up to the first stop sequence, and whether one was found."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def canvas_view(row: np.ndarray, new: np.ndarray, tok: TextTokenizer) -> dict:
    """A row of the canvas for the page: each position's text piece (None while masked) and which just changed."""
    pieces = [None if t == tok.mask_id else ("" if t == tok.pad_id else ("⏎" if t == tok.eot_id else tok.piece(int(t)))) for t in row]
    return {"pieces": pieces, "new": np.flatnonzero(new).tolist()}
