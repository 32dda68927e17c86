import numpy as np
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.prompt import build_canvas
from train_host.corpus import stories
from train_host.data import train_tokenizer

ALLOWED = [32, 64, 128]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(stories(200), vocab_size=500)


def test_prefix_prompt(tok):
    c = build_canvas(tok, "Once upon a time", 20, ALLOWED)
    ids = tok.encode("Once upon a time")
    assert c.tokens.size == 32 and not c.infill
    assert c.tokens[: len(ids)].tolist() == ids and c.fixed[: len(ids)].all()
    assert (c.tokens[len(ids) :] == tok.mask_id).all() and not c.fixed[len(ids) :].any()
    assert build_canvas(tok, "Once upon a time", 40, ALLOWED).tokens.size == 64  # rounded up to an allowed shape
    assert build_canvas(tok, "Once upon a time", 0, ALLOWED).tokens.size == 128  # 0: the longest canvas


def test_infilling_template(tok):
    c = build_canvas(tok, "Once upon a time ____ happily ever after.", 0, ALLOWED, gap=10)
    head, tail = tok.encode("Once upon a time"), tok.encode(" happily ever after.")
    n = len(head)
    assert c.infill and c.tokens[:n].tolist() == head  # the space before a gap goes to the generated token
    assert (c.tokens[n : n + 10] == tok.mask_id).all() and not c.fixed[n : n + 10].any()
    assert c.tokens[n + 10 : n + 10 + len(tail)].tolist() == tail
    end = n + 10 + len(tail)
    assert c.tokens[end] == tok.eot_id and (c.tokens[end + 1 :] == tok.pad_id).all() and c.fixed[n + 10 :].all()


def test_mask_tokens_and_open_end(tok):
    c = build_canvas(tok, "Tom had a [MASK][MASK] dog.", 0, ALLOWED)
    assert (c.tokens == tok.mask_id).sum() == 2
    open_end = build_canvas(tok, "Lily went to the park. ____", 30, ALLOWED)
    n = len(tok.encode("Lily went to the park."))
    assert (open_end.tokens[n : n + 30] == tok.mask_id).all() and not open_end.fixed[n:].any()
    assert tok.eot_id not in open_end.tokens.tolist()


@pytest.mark.parametrize("prompt, length, match", [
    ("", 10, "empty"), ("   ", 10, "empty"), ("____ [MASK]", 10, "only placeholders"),
    ("word " * 200, 10, "longest canvas"), ("hi", 500, "do not fit"), ("hi", -1, "--length"),
])
def test_bad_prompts(tok, prompt, length, match):
    with pytest.raises(DllmError, match=match):
        build_canvas(tok, prompt, length, ALLOWED)


def test_batch_tiles_the_canvas(tok):
    tokens, fixed = build_canvas(tok, "Ben ran", 5, ALLOWED).batch(3)
    assert tokens.shape == fixed.shape == (3, 32) and (tokens == tokens[0]).all() and np.array_equal(fixed[1], fixed[2])
