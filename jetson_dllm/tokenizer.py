"""The tokenizer the whole toolkit shares: a byte-level BPE `tokenizer.json` (HF tokenizers) with our special tokens,
or an imported model's own tokenizer, whose special ids (its end-of-text and start tokens, and the padding and mask
tokens added on import) the checkpoint or bundle records."""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer

from jetson_dllm.errors import DllmError

PAD, EOT, MASK = "<|pad|>", "<|endoftext|>", "<|mask|>"
SPECIAL_TOKENS = (PAD, EOT, MASK)


def _text(text) -> str:
    """Text the tokenizer can take: a str of valid Unicode (a lone surrogate, e.g. from a mis-decoded byte, is not)."""
    if not isinstance(text, str):
        raise DllmError(f"text to tokenize must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DllmError(f"the text holds a character that is not valid Unicode ({text[e.start]!r} at offset {e.start}); "
                        "send UTF-8 text", option="--prompt") from None
    return text


CHAT_TEMPLATE = "chat_template.jinja"  # beside tokenizer.json, as Hugging Face keeps it


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of padding, end-of-text and mask (and the start token, which is the
    end-of-text for our own tokenizers, as stories are separated by it).

    `special_ids` (what a checkpoint or bundle records): the ids to use, checked against the tokenizer (its padding
    and mask are always ours; an imported tokenizer's end-of-text and start token are its own); without them, our own
    special tokens are looked up by name (a tokenizer `dllm data` made)."""

    def __init__(self, tok: Tokenizer, source: str = "<memory>", special_ids: dict | None = None, chat_template: str | None = None):
        self.tok = tok
        self.chat_template = chat_template  # an imported instruct model's own (Jinja), kept as chat_template.jinja beside it
        if special_ids is None:
            ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
            missing = [t for t, i in ids.items() if i is None]
            if missing:
                raise DllmError(f"{source} is not a jetson-dllm tokenizer: it lacks {', '.join(missing)}; make one with `dllm data`")
            self.pad_id, self.eot_id, self.mask_id = ids[PAD], ids[EOT], ids[MASK]
            self.bos_id = self.eot_id
            return
        size = tok.get_vocab_size()
        keys = ("pad", "eot", "mask", *(("bos",) if "bos" in special_ids else ()))
        if not all(isinstance(special_ids.get(k), int) and 0 <= special_ids[k] < size for k in keys):
            raise DllmError(f"{source}: special ids {special_ids} do not fit the tokenizer (vocabulary {size})")
        if tok.id_to_token(special_ids["mask"]) != MASK or tok.id_to_token(special_ids["pad"]) != PAD:
            raise DllmError(f"{source}: the recorded mask and padding ids are not the tokenizer's {MASK} and {PAD}")
        self.pad_id, self.eot_id, self.mask_id = special_ids["pad"], special_ids["eot"], special_ids["mask"]
        self.bos_id = int(special_ids.get("bos", self.eot_id))

    @classmethod
    def from_file(cls, path: str | Path, special_ids: dict | None = None) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise DllmError(f"tokenizer {path} not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DllmError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0][:80]})") from None
        template = path.with_name(CHAT_TEMPLATE)
        return cls(tok, str(path), special_ids, template.read_text(encoding="utf-8") if template.is_file() else None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def special_ids(self) -> dict[str, int]:
        ids = {"pad": self.pad_id, "eot": self.eot_id, "mask": self.mask_id}
        return ids if self.bos_id == self.eot_id else {**ids, "bos": self.bos_id}

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    @cached_property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest token (a byte-level token's characters are its bytes)."""
        return max((len(t) for t in self.tok.get_vocab()), default=1)

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens `text` becomes, without tokenizing it: a token covers at most `longest_token`
        characters (halved again for any normalizer). What lets a prompt far too long be refused before it is
        tokenized (a 900 KB prompt tokenized to be refused left a server 90 MB larger)."""
        return len(text) // (2 * self.longest_token)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch([_text(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of a canvas: stops at the first end-of-text or padding, skips any mask left in it."""
        out = []
        for i in ids:
            i = int(i)
            if i in (self.eot_id, self.pad_id):
                break
            if i != self.mask_id:
                out.append(i)
        return self.tok.decode(out, skip_special_tokens=False)

    @cached_property
    def _pieces(self) -> dict[int, str]:
        return {}

    def piece(self, token_id: int) -> str:
        """Display text of one token (for the live view); bytes of a split character show as U+FFFD."""
        token_id = int(token_id)
        cache = self._pieces
        if token_id not in cache:
            cache[token_id] = self.tok.decode([token_id], skip_special_tokens=False)
        return cache[token_id]

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))
        if self.chat_template:
            Path(path).with_name(CHAT_TEMPLATE).write_text(self.chat_template, encoding="utf-8")
