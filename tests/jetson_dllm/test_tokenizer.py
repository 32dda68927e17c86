import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jetson_dllm.errors import DllmError
from jetson_dllm.tokenizer import TextTokenizer
from train_host.corpus import stories
from train_host.data import train_tokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_tokenizer(stories(300), vocab_size=600)


def test_special_tokens(tok):
    assert {tok.pad_id, tok.eot_id, tok.mask_id} == {0, 1, 2}
    assert tok.vocab_size <= 600


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_of_any_text(tok, text):
    assert tok.tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_round_trip_of_stories(tok):
    for s in stories(20, seed=5):
        assert tok.decode(tok.encode(s)) == s


def test_decode_stops_at_the_end_and_skips_masks(tok):
    ids = tok.encode("Tom ran.") + [tok.eot_id] + tok.encode(" Never shown.")
    assert tok.decode(ids) == "Tom ran."
    assert tok.decode(tok.encode("A") + [tok.mask_id] + tok.encode(" cat")) == "A cat"


def test_save_load_and_hash(tok, tmp_path):
    tok.save(tmp_path / "t.json")
    again = TextTokenizer.from_file(tmp_path / "t.json")
    assert again.sha256 == tok.sha256 and again.encode("hello there") == tok.encode("hello there")


def test_foreign_or_broken_tokenizers_are_refused(tok, tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "plain.json"))
    with pytest.raises(DllmError, match="not a jetson-dllm tokenizer"):
        TextTokenizer.from_file(tmp_path / "plain.json")
    text = json.dumps(json.loads(tok.tok.to_str()))
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(DllmError, match="not a readable tokenizer"):
        TextTokenizer.from_file(tmp_path / "cut.json")
    with pytest.raises(DllmError, match="not found"):
        TextTokenizer.from_file(tmp_path / "missing.json")


def test_vocabulary_must_fit_uint16():
    with pytest.raises(DllmError, match="uint16"):
        train_tokenizer(["a b c"], vocab_size=70000)
