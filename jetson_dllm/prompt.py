"""From prompt text to a canvas: prefix prompts, and infilling templates with placeholders.

    "Once upon a time"                      prefix: the rest of the canvas is generated
    "Once upon a time ____ happily ever after."
                                            a run of 3+ underscores is a gap of `gap` tokens; the text
                                            after the last gap is the end of the story
    "Tom had a [MASK][MASK] dog."           each [MASK] is exactly one token
    "Lily went to the park. ____"           a gap at the very end is open: `length` tokens
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from jetson_dllm.config import canvas_for
from jetson_dllm.errors import DllmError
from jetson_dllm.tokenizer import TextTokenizer

PLACEHOLDER = re.compile(r"_{3,}|(?:\[MASK\])+")


@dataclass
class Canvas:
    tokens: np.ndarray  # (T,) int32, masked positions hold the mask id
    fixed: np.ndarray  # (T,) bool, prompt tokens that never change
    infill: bool

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.tile(self.tokens, (n, 1)), np.tile(self.fixed, (n, 1))


def build_canvas(tokenizer: TextTokenizer, prompt: str, length: int, allowed: list[int], gap: int = 12, allow_empty: bool = False) -> Canvas:
    """The canvas for a prompt; its length is the smallest allowed shape that holds prompt + `length`
    (`length` 0: the longest allowed canvas)."""
    if length < 0:
        raise DllmError(f"--length must not be negative, got {length}")
    if gap <= 0:
        raise DllmError(f"--gap must be positive, got {gap}")
    if not prompt.strip() and not allow_empty:
        raise DllmError('the prompt is empty; give the start of a story, e.g. --prompt "Once upon a time"')
    if tokenizer.fewest_tokens(prompt) >= max(allowed):  # refused before tokenizing: no memory spent on it
        raise DllmError(f"the prompt is at least {tokenizer.fewest_tokens(prompt)} tokens ({len(prompt):,} characters); the longest "
                        f"canvas is {max(allowed)}, leaving no room to generate")
    mask = tokenizer.mask_id
    pieces = PLACEHOLDER.split(prompt)
    holes = PLACEHOLDER.findall(prompt)
    if not holes:
        ids = tokenizer.encode(prompt) if prompt else []
        if len(ids) >= max(allowed):
            raise DllmError(f"the prompt is {len(ids)} tokens; the longest canvas is {max(allowed)}, leaving no room to generate")
        n = canvas_for(len(ids) + length, allowed) if length else max(allowed)
        tokens = np.array(ids + [mask] * (n - len(ids)), dtype=np.int32)
        fixed = np.arange(n) < len(ids)
        return Canvas(tokens, fixed, infill=False)

    if not "".join(pieces).strip():
        raise DllmError("the prompt has only placeholders; put text around the gaps, or give no placeholder to generate freely")
    ids: list[int] = []
    fixed_list: list[bool] = []
    for i, text in enumerate(pieces):
        if i < len(holes):
            text = text.rstrip(" ")  # generated tokens carry their own leading space
        if text:
            piece = tokenizer.encode(text)
            ids += piece
            fixed_list += [True] * len(piece)
        if i < len(holes):
            hole = holes[i]
            open_end = i == len(holes) - 1 and not pieces[-1].strip()
            n = (length or max(allowed) - len(ids)) if open_end else (hole.count("[MASK]") or gap)
            if n <= 0:
                raise DllmError(f"no room left for the open gap; the longest canvas is {max(allowed)}")
            ids += [mask] * n
            fixed_list += [False] * n
    open_end = not pieces[-1].strip()
    if not open_end:
        ids.append(tokenizer.eot_id)  # the template's text is the end of the story
        fixed_list.append(True)
    if len(ids) > max(allowed):
        raise DllmError(f"the template needs {len(ids)} positions; the longest canvas is {max(allowed)}; shorten it or use smaller gaps")
    n = canvas_for(len(ids), allowed)
    filler = mask if open_end else tokenizer.pad_id
    tokens = np.array(ids + [filler] * (n - len(ids)), dtype=np.int32)
    fixed = np.array(fixed_list + [not open_end] * (n - len(ids)), dtype=bool)
    return Canvas(tokens, fixed, infill=True)


def request_canvas(tok: TextTokenizer, prompt: str, suffix: str | None, max_tokens: int, allowed: list[int]) -> Canvas:
    """The canvas of one prompt: `max_tokens` to generate after it, or (with `suffix`) a gap of `max_tokens`
    between prompt and suffix, filled by infilling."""
    if suffix:
        return build_canvas(tok, f"{prompt.rstrip()} ____ {suffix.lstrip()}", 0, allowed, gap=max_tokens, allow_empty=True)
    return build_canvas(tok, prompt, max_tokens, allowed, allow_empty=True)
