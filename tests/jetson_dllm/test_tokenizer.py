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


def test_the_fewest_tokens_bound_never_exceeds_the_real_count(data_dir):
    """What lets a prompt be refused before tokenizing must be a true lower bound, whatever the text."""
    from jetson_dllm.tokenizer import TextTokenizer

    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    texts = ["Once upon a time " * 400, "a" * 5000, "é" * 3000, "日本語のテキスト" * 500, "\n\n" * 2000, " " * 4000, "x"]
    for text in texts:
        assert tok.fewest_tokens(text) <= len(tok.encode(text)), text[:20]
    assert tok.fewest_tokens("Once upon a time " * 400) > 100  # and useful: the order of magnitude


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=400))
def test_the_bound_holds_for_any_text(data_dir, text):
    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    assert tok.fewest_tokens(text * 20) <= len(tok.encode(text * 20))
