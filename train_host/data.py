"""Text in, token shards out: document readers, the BPE tokenizer, uint16 shards and the canvas dataset.

A prepared data folder holds `tokenizer.json`, `train.bin` / `val.bin` (uint16 token streams, every
document followed by end-of-text), `train.idx.npy` / `val.idx.npy` (int64 document offsets, n_docs + 1)
and `data.json` (the manifest).

How documents become canvases: one document per canvas, ending in end-of-text and then padding, so the
model learns where a story ends and a generation stops by itself instead of running into the next
story. A document longer than the canvas is cut into consecutive canvas-sized windows; only the last
window holds its end-of-text.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.files import atomic_folder, output_lock, sha256_file
from jetson_dllm.manifests import DataManifest, check_replaceable, member, read_manifest, write_manifest
from jetson_dllm.tokenizer import SPECIAL_TOKENS, TextTokenizer
from train_host.pairs import PAIR_FILES, PairWriter
from train_host.sources import Source

DATA_FORMAT = "jetson-dllm-data"
DATA_VERSION = 2  # 2: sealed data.json, checked schema, tokenizer and shard indexes hashed
MAX_UINT16_VOCAB = 65536


# --- reading documents -------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> TextTokenizer:
    """A byte-level BPE tokenizer (any text round-trips exactly) with pad, end-of-text and mask tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size > MAX_UINT16_VOCAB:
        raise DllmError(f"vocabulary size {vocab_size} does not fit uint16 token shards (at most {MAX_UINT16_VOCAB})")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DllmError(f"vocabulary size {vocab_size} is too small: byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return TextTokenizer(tok)


# --- writing shards -----------------------------------------------------------------------------------


class _ShardWriter:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb", buffering=1 << 20)
        self.offsets = [0]

    def add(self, ids: list[int], eot_id: int) -> None:
        arr = np.asarray(ids + [eot_id], dtype=np.uint16)
        self.f.write(arr.tobytes())
        self.offsets.append(self.offsets[-1] + arr.size)

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        np.save(self.path.with_suffix(".idx.npy"), np.asarray(self.offsets, dtype=np.int64))
        return {"docs": len(self.offsets) - 1, "tokens": int(self.offsets[-1])}


def prepare_data(
    sources: list[Source],
    out_dir: str | Path,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    tokenizer_docs: int = 200_000,
    tokenizer_path: str | Path | None = None,
    overwrite: bool = False,
    progress=None,
    pairs: bool = False,
) -> dict:
    """Train (or reuse) the tokenizer, then tokenize every document into train/val uint16 shards.

    Everything is written into a temporary folder beside `out_dir` and renamed into place at the end,
    so an interrupted run never leaves a half-written data folder. Returns the manifest.
    `progress`, if given, is called as progress(phase, done, total) with byte or document counts. With `pairs`, the
    (first sentence -> rest) pairs of the same split too (train_host.pairs).
    """
    out_dir = Path(out_dir)
    if not 0.0 < val_fraction < 0.5:
        raise DllmError(f"--val-fraction {val_fraction} must be in (0, 0.5)")
    check_replaceable(out_dir, "data.json", DATA_FORMAT, "data folder")  # never another kind of folder, --overwrite or not
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DllmError(f"{out_dir} already exists and is not empty; choose another --out or pass --overwrite")
    docs = _Tracked(sources, progress or (lambda *a: None))
    with output_lock(out_dir), atomic_folder(out_dir, replace=True) as tmp:
        if tokenizer_path and Path(tokenizer_path).is_dir():  # a checkpoint or run: its tokenizer with its recorded ids
            from train_host.checkpoint import read_config, resolve_checkpoint

            ckpt = resolve_checkpoint(tokenizer_path)
            tok = TextTokenizer.from_file(ckpt / "tokenizer.json", read_config(ckpt)["special_ids"])
        elif tokenizer_path:
            tok = TextTokenizer.from_file(tokenizer_path)
        else:
            tok = train_tokenizer(docs("tokenizer", tokenizer_docs), vocab_size)
        if tok.vocab_size > MAX_UINT16_VOCAB:
            raise DllmError(f"tokenizer has {tok.vocab_size} tokens, more than uint16 shards hold ({MAX_UINT16_VOCAB})")
        tok.save(tmp / "tokenizer.json")
        splits = write_shards(tmp, tok, docs("tokenize"), val_fraction, pairs)
        manifest = {
            "format": DATA_FORMAT,
            "version": DATA_VERSION,
            "vocab_size": tok.vocab_size,
            "special_ids": tok.special_ids,
            "tokenizer_sha256": tok.sha256,
            "splits": splits,
            "sources": [s.spec for s in sources],
            "skipped_empty_records": sum(s.skipped for s in sources),
            "val_fraction": val_fraction,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            # the shards themselves are checked by size (they may be GBs); what indexes them is hashed
            "files": {name: sha256_file(tmp / name) for name in ("tokenizer.json", "train.idx.npy", "val.idx.npy",
                                                                 *(PAIR_FILES.values() if pairs else ()))},
        }
        if pairs:
            manifest["pairs"] = {name: splits[name].pop("pairs") for name in ("train", "val")}
        write_manifest(tmp / "data.json", manifest)
    return manifest


class _Tracked:
    """The documents of all sources, reporting progress(phase, done, total) in bytes (or documents)."""

    def __init__(self, sources: list[Source], report):
        self.sources, self.report = sources, report
        self.total = sum(s.size or 0 for s in sources) or None

    def __call__(self, phase: str, limit: int | None = None) -> Iterator[str]:
        n, finished = 0, 0
        for s in self.sources:
            for doc in s.documents():
                yield doc
                n += 1
                if n % 256 == 0:
                    self.report(phase, finished + s.done, self.total)
                if limit is not None and n >= limit:
                    return
            finished += s.size or s.done
        self.report(phase, self.total or n, self.total)


def write_shards(folder: Path, tok: TextTokenizer, docs: Iterable[str], val_fraction: float, pairs: bool = False) -> dict:
    """Tokenize documents into train.bin / val.bin (+ .idx.npy offsets); every stride-th document is validation.
    With `pairs`, each split's (first sentence -> rest) pairs too (pairs.SPLIT.jsonl; a split's `pairs` counts)."""
    stride = max(2, round(1.0 / val_fraction))
    writers = {"train": _ShardWriter(folder / "train.bin"), "val": _ShardWriter(folder / "val.bin")}
    pair_writers = {name: PairWriter(folder / file) for name, file in PAIR_FILES.items()} if pairs else {}
    index = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal index
        for text, ids in zip(batch, tok.encode_batch(batch)):
            # Document 0, stride, 2*stride ... go to validation: deterministic, never empty.
            split = "val" if index % stride == 0 else "train"
            writers[split].add(ids, tok.eot_id)
            if pairs:
                pair_writers[split].add(text)
            index += 1
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) >= 1024:
            flush()
    flush()
    if index == 0:
        raise DllmError("no documents found in the data; check the files and --format")
    splits = {name: w.close() for name, w in writers.items()}
    if splits["train"]["docs"] == 0:
        raise DllmError(f"only {index} document(s): too few to split into train and validation")
    for name, w in pair_writers.items():
        splits[name]["pairs"] = w.close()
        if not splits[name]["pairs"]["pairs"]:
            raise DllmError(f"--pairs: no {name} document has a first sentence and more after it (of {splits[name]['docs']}); "
                            "pairs need documents of two sentences or more")
    return splits


# --- reading shards -----------------------------------------------------------------------------------


def load_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / "data.json"
    if not path.is_file():
        raise DllmError(f"{data_dir} is not a prepared data folder (no data.json); make one with `dllm data`")
    return read_manifest(path, DATA_FORMAT, DATA_VERSION, "data folder", "prepare the data again with `dllm data`", DataManifest)


def verified(data_dir: Path, manifest: dict, name: str) -> Path:
    """A file the data manifest hashes, inside the folder and unaltered."""
    path = member(data_dir, name, "data manifest")
    expected = manifest["files"].get(name)
    if expected is None or not path.is_file() or sha256_file(path) != expected:
        raise DllmError(f"{path} is missing or altered (sha256 mismatch with data.json); prepare the data again with `dllm data`")
    return path


class CanvasDataset:
    """Fixed-length canvases (one document, or one window of a long one, then padding) from a split."""

    def __init__(self, data_dir: str | Path, split: str, canvas_len: int, pad_id: int):
        data_dir = Path(data_dir)
        manifest = load_manifest(data_dir)
        if split not in ("train", "val"):
            raise DllmError(f"unknown split {split!r}")
        bin_path, idx_path = data_dir / f"{split}.bin", verified(data_dir, manifest, f"{split}.idx.npy")
        if not bin_path.is_file():
            raise DllmError(f"{data_dir} has no {split} split; prepare it again with `dllm data`")
        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (ValueError, OSError):
            raise DllmError(f"{idx_path} is not a shard index; prepare the data again with `dllm data`") from None
        if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) < 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise DllmError(f"{idx_path} is not a shard index (1-D int64 offsets from 0, increasing); prepare the data again")
        n_tokens = int(offsets[-1])
        if bin_path.stat().st_size != 2 * n_tokens:
            raise DllmError(f"{bin_path} is truncated or altered ({bin_path.stat().st_size} bytes, expected {2 * n_tokens}); prepare the data again")
        if n_tokens == 0:
            raise DllmError(f"the {split} split of {data_dir} is empty; prepare the data from more documents (or a larger --val-fraction)")
        tokens = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(n_tokens,))
        top = int(tokens.max())  # one pass (about a second per GB): a shard id past the vocabulary is garbage to train on
        if top >= manifest["vocab_size"]:
            raise DllmError(f"{bin_path} holds token id {top}, outside the vocabulary ({manifest['vocab_size']}); prepare the data again with `dllm data`")
        self._index(tokens, offsets, canvas_len, pad_id, f"the {split} split of {data_dir}")

    @classmethod
    def from_documents(cls, docs: list[list[int]], eot_id: int, canvas_len: int, pad_id: int, what: str) -> CanvasDataset:
        """Canvases of documents tokenized here (each followed by end-of-text), as a split of a data folder holds them."""
        ds = cls.__new__(cls)
        tokens = np.asarray([t for d in docs for t in (*d, eot_id)], dtype=np.uint16)
        offsets = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])]).astype(np.int64)
        ds._index(tokens, offsets, canvas_len, pad_id, what)
        return ds

    def _index(self, tokens: np.ndarray, offsets: np.ndarray, canvas_len: int, pad_id: int, what: str) -> None:
        self.tokens = tokens
        self.canvas_len, self.pad_id = canvas_len, pad_id
        lengths = np.diff(offsets)
        n_windows = -(-lengths // canvas_len)  # ceil
        doc_of_window = np.repeat(np.arange(len(lengths)), n_windows)
        first_window = np.cumsum(n_windows) - n_windows
        k = np.arange(int(n_windows.sum())) - np.repeat(first_window, n_windows)
        self.starts = offsets[:-1][doc_of_window] + k * canvas_len
        self.lengths = np.minimum(canvas_len, lengths[doc_of_window] - k * canvas_len)
        if len(self.starts) == 0:
            raise DllmError(f"{what} is empty")

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """Canvases (len(indices), canvas_len) int64."""
        out = np.full((len(indices), self.canvas_len), self.pad_id, dtype=np.int64)
        for row, i in enumerate(indices):
            s, n = int(self.starts[i]), int(self.lengths[i])
            out[row, :n] = self.tokens[s : s + n]
        return out


def batch_indices(n_items: int, batch_size: int, samples_seen: int, seed: int) -> np.ndarray:
    """Dataset indices of the batch that starts after `samples_seen` samples.

    Each epoch is a fresh permutation drawn from (seed, epoch), so the order is a pure function of the
    data position: a resumed run sees exactly the batches the uninterrupted run would have.
    """
    g = samples_seen + np.arange(batch_size)
    epochs, pos = g // n_items, g % n_items
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _permutation(n_items, seed, int(epoch))[pos[sel]]
    return out


@functools.lru_cache(maxsize=2)
def _permutation(n_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_items)
