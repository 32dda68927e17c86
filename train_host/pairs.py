"""(first sentence -> rest of the story) pairs: what conditional generation is trained and measured on.

`dllm data --pairs` writes them beside the token shards, with the same document split: `pairs.train.jsonl` and
`pairs.val.jsonl`, one JSON object per line, {"condition": the first sentence, "text": the rest}. A document whose
first sentence has nothing after it (or that has no sentence end at all) gives no pair; how many were skipped is in
data.json. The first sentence ends at the first `.`, `!` or `?` (closing quotes and brackets included) followed by
whitespace: "Mr. Smith" splits early, a known limit of the rule, rare in stories.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jetson_dllm.errors import DllmError

SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
PAIR_FILES = {"train": "pairs.train.jsonl", "val": "pairs.val.jsonl"}


def split_pair(text: str) -> tuple[str, str] | None:
    """(first sentence, rest) of a document, both stripped and non-empty, or None."""
    text = text.strip()
    end = SENTENCE_END.search(text)
    if end is None:
        return None
    condition, rest = text[: end.end()].strip(), text[end.end() :].strip()
    return (condition, rest) if condition and rest else None


class PairWriter:
    """The pairs of one split, written as their documents are."""

    def __init__(self, path: Path):
        self.f = open(path, "w", encoding="utf-8")
        self.pairs = self.skipped = 0

    def add(self, text: str) -> None:
        pair = split_pair(text)
        if pair is None:
            self.skipped += 1
            return
        self.f.write(json.dumps({"condition": pair[0], "text": pair[1]}, ensure_ascii=False) + "\n")
        self.pairs += 1

    def close(self) -> dict:
        self.f.close()
        return {"pairs": self.pairs, "skipped": self.skipped}


def read_pairs(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """The (condition, text) pairs of a pairs file (`dllm data --pairs`), up to `limit`; a file that is not one, or
    holds none, is refused with the line that is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / PAIR_FILES["val"]
    if not path.is_file():
        raise DllmError(f"{path} does not exist; make pairs with `dllm data SOURCES --pairs -o DIR`")
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                row = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DllmError(f"{path} line {n} is not UTF-8 JSON; a pairs file holds one {{\"condition\": ..., \"text\": ...}} per line") from None
            if row is None:
                continue
            if not (isinstance(row, dict) and isinstance(row.get("condition"), str) and isinstance(row.get("text"), str)
                    and row["condition"].strip() and row["text"].strip()):
                raise DllmError(f"{path} line {n} is not a pair: each line needs a non-empty \"condition\" and \"text\"")
            out.append((row["condition"], row["text"]))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DllmError(f"{path} holds no pairs; make them with `dllm data SOURCES --pairs -o DIR`")
    return out

