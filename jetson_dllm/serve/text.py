"""From canvases and views back to OpenAI-shaped text: what is generated, what is final, what may be streamed."""

from __future__ import annotations

import numpy as np

from jetson_dllm.tokenizer import TextTokenizer


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


def safe_to_send(text: str, stop: str | list[str] | None) -> str:
    """The text less any tail that could be the start of a stop sequence (the next chunk may complete it, and then
    none of it may have been sent)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    hold = max((k for s in stops if s for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold]


def canvas_view(row: np.ndarray, new: np.ndarray, tok: TextTokenizer) -> dict:
    """A row of the canvas for the page: each position's text piece (None while masked) and which just changed."""
    pieces = [None if t == tok.mask_id else ("" if t == tok.pad_id else ("⏎" if t == tok.eot_id else tok.piece(int(t)))) for t in row]
    return {"pieces": pieces, "new": np.flatnonzero(new).tolist()}
