"""Where documents come from: local files (TinyStories-style text, lines, JSONL, parquet), the built-in corpus,
or a Hugging Face data set; streamed, with progress in bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from jetson_dllm.errors import DllmError
from jetson_dllm.tokenizer import EOT
from train_host.corpus import story

FORMATS = ("auto", "tinystories", "lines", "jsonl", "parquet")


class Source:
    """One place documents come from: a local file, the built-in corpus, or a Hugging Face data set.

    `documents()` streams stripped, non-empty texts; `done` and `size` report progress in bytes (or
    documents, for sources without a byte size).
    """

    def __init__(self, spec: str, fmt: str = "auto", text_field: str = "text", builtin_stories: int = 20000, seed: int = 0):
        if fmt not in FORMATS:
            raise DllmError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        self.spec, self.text_field, self.seed = spec, text_field, seed
        self.done = 0
        self.skipped = 0  # records whose text field was empty (null, NaN): skipped and counted, never tokenized
        if spec == "builtin":
            self.kind, self.size = "builtin", builtin_stories
        elif spec.startswith("hf:"):
            self.kind, self.size = "hf", None
        else:
            path = Path(spec)
            if not path.is_file():
                raise DllmError(f"data file {spec} not found")
            self.kind = fmt if fmt != "auto" else detect_format(path)
            self.size = path.stat().st_size
            if self.size == 0:
                raise DllmError(f"data file {spec} is empty")

    def documents(self) -> Iterator[str]:
        self.done, self.skipped = 0, 0
        reader = {
            "builtin": self._builtin,
            "hf": self._hf,
            "tinystories": self._tinystories,
            "lines": self._lines,
            "jsonl": self._jsonl,
            "parquet": self._parquet,
        }[self.kind]
        for number, doc in enumerate(reader(), 1):
            doc = self._text(doc, f"record {number}")
            if doc:
                yield doc

    def _text(self, value, where: str) -> str | None:
        """A record's text: a string; a missing one (null, NaN) is skipped and counted; anything else (a number, an
        object, a list) is refused with where it is, never tokenized as its printed form."""
        if isinstance(value, str):
            return value.strip()
        if value is None or (isinstance(value, float) and value != value):
            self.skipped += 1
            return None
        raise DllmError(f"{self.spec} {where}: the {self.text_field!r} field holds {type(value).__name__} "
                        f"{str(value)[:40]!r}, not text; fix the file or name another field with --text-field")

    def _builtin(self) -> Iterator[str]:
        for i in range(self.size):
            self.done = i + 1
            yield story(i, self.seed)

    def _raw_lines(self) -> Iterator[tuple[int, str]]:
        with open(self.spec, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DllmError(f"{self.spec} line {number} is not UTF-8; convert the file (e.g. with iconv) and try again") from None
                self.done = f.tell()
                yield number, line

    def _tinystories(self) -> Iterator[str]:
        # Stories separated by <|endoftext|>, usually on a line of its own; the 2 GB file streams line by line.
        buf: list[str] = []
        for _, line in self._raw_lines():
            while EOT in line:
                head, line = line.split(EOT, 1)
                buf.append(head)
                yield "".join(buf)
                buf = []
            buf.append(line)
        yield "".join(buf)

    def _lines(self) -> Iterator[str]:
        for _, line in self._raw_lines():
            yield line

    def _jsonl(self) -> Iterator[str]:
        for number, line in self._raw_lines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:  # not JSON; a 5,000-digit number; nesting deeper than Python reads
                why = "is not JSON" if isinstance(e, json.JSONDecodeError) else f"cannot be read ({type(e).__name__}: {str(e)[:60]})"
                raise DllmError(f"{self.spec} line {number} {why}; JSONL needs one JSON object per line") from None
            if not isinstance(record, dict) or self.text_field not in record:
                raise DllmError(f"{self.spec} line {number} has no {self.text_field!r} field; name the text field with --text-field")
            text = self._text(record[self.text_field], f"line {number}")
            if text:
                yield text

    def _parquet(self) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DllmError("reading parquet needs pyarrow: pip install 'jetson-dllm[data]'") from None
        try:
            pf = pq.ParquetFile(self.spec)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise DllmError(f"{self.spec} is not a readable parquet file ({e})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise DllmError(f"{self.spec} has no {self.text_field!r} column (it has {pf.schema_arrow.names}); use --text-field")
        read = 0
        for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
            read += batch.nbytes
            self.done = min(self.size, read)
            yield from batch.column(0).to_pylist()

    def _hf(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise DllmError(f"{self.spec} needs the Hugging Face datasets library: pip install datasets") from None
        name = self.spec[3:]
        try:
            ds = datasets.load_dataset(name, split="train", streaming=True)
            for i, row in enumerate(ds):
                self.done = i + 1
                yield row[self.text_field]
        except (ConnectionError, OSError) as e:
            raise DllmError(f"could not stream {name} from the Hugging Face hub ({str(e)[:80]}); check the network or use a local file") from None
        except KeyError:
            raise DllmError(f"{name} has no {self.text_field!r} field; use --text-field") from None


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".txt", ".text", ""):
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        return "tinystories" if EOT.encode() in head else "lines"
    raise DllmError(f"{path}: unknown data format {suffix!r}; use .txt, .jsonl or .parquet, or say --format")


def documents(sources: Iterable[Source]) -> Iterator[str]:
    for source in sources:
        yield from source.documents()


# --- the tokenizer -------------------------------------------------------------------------------------
