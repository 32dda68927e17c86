"""A conditional model's condition at run time (torch-free): the text checked and tokenized, and the encoder graph's
call (once per request; its memory then feeds every canvas call). A conditional model given no condition generates
from the empty one (length 0: what condition dropout trained it on)."""

from __future__ import annotations

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.prompt import PLACEHOLDER
from jetson_dllm.runners.calls import Call


def condition_ids(runner, text: str | None) -> list[int] | None:
    """The condition's ids for this runner's model: None for a model without a condition (a condition given to one
    is refused), [] when none is given; a condition longer than the encoder reads is refused."""
    cfg = runner.cfg
    if not cfg.cond_len:
        if text is not None:
            raise DllmError("--condition: this model was trained without a condition (it has no condition encoder); leave it out, "
                            "or train one with `dllm train --cond-len N` on `dllm data --pairs` data")
        return None
    if not text:
        return []
    if PLACEHOLDER.search(text):
        raise DllmError("the condition is plain text the encoder reads: a [MASK] or ____ gap means nothing there (gaps go in the "
                        "prompt, for a model that infills); leave it out", option="--condition")
    tok = runner.tokenizer
    if tok.fewest_tokens(text) > cfg.cond_len:  # refused from its length before it is tokenized
        raise DllmError(f"the condition is at least {tok.fewest_tokens(text)} tokens; this model's encoder reads at most {cfg.cond_len}")
    ids = tok.encode(text)
    if len(ids) > cfg.cond_len:
        raise DllmError(f"the condition is {len(ids)} tokens; this model's encoder reads at most {cfg.cond_len}: shorten it")
    return ids


def encoder_call(conditions: list[list[int]], cond_len: int) -> Call:
    """The encoder graph's call for these conditions (rows padded to cond_len; their lengths say where they end)."""
    tokens = np.zeros((len(conditions), cond_len), dtype=np.int32)
    for row, ids in enumerate(conditions):
        tokens[row, : len(ids)] = ids
    return Call("encoder", {"tokens": tokens, "condition_len": np.array([len(c) for c in conditions], dtype=np.int32)})


def check_guidance(condition: list[int] | None) -> None:
    """Guidance on a conditional model pulls toward its condition: there must be one."""
    if condition is not None and not condition:
        raise DllmError("--guidance on a conditional model needs a condition to guide toward (the unguided row drops it): "
                        "give --condition, or leave --guidance out", option="--guidance")
