"""A conditional model's data: the pairs of a data folder as canvases (each rest) with their conditions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jetson_dllm.errors import DllmError
from train_host.data import CanvasDataset, load_manifest, verified
from train_host.pairs import PAIR_FILES, read_pairs


class PairDataset:
    """A conditional model's split: each pair's rest as one canvas (its first canvas-sized window: a longer rest goes
    on past the canvas, so that window holds no end-of-text) and its condition's ids, for `conditions`. A pair whose
    condition is longer than the encoder reads (`cond_len`) is left out (`skipped` counts them)."""

    def __init__(self, data_dir: str | Path, split: str, canvas_len: int, cond_len: int, tokenizer):
        data_dir = Path(data_dir)
        manifest = load_manifest(data_dir)
        if "pairs" not in manifest:
            raise DllmError(f"{data_dir} holds no (first sentence -> rest) pairs, which a conditional model trains on; "
                            f"prepare it with `dllm data SOURCES --pairs -o {data_dir}`")
        pairs = read_pairs(verified(data_dir, manifest, PAIR_FILES[split]))
        conditions = tokenizer.encode_batch([c for c, _ in pairs])
        keep = [i for i, c in enumerate(conditions) if len(c) <= cond_len]
        self.skipped = len(pairs) - len(keep)
        if not keep:
            raise DllmError(f"every {split} pair's condition is longer than --cond-len {cond_len} tokens; raise --cond-len")
        rests = tokenizer.encode_batch([pairs[i][1] for i in keep])
        docs = CanvasDataset.from_documents(rests, tokenizer.eot_id, canvas_len, tokenizer.pad_id, f"the {split} pairs of {data_dir}")
        windows = [-(-(len(r) + 1) // canvas_len) for r in rests]  # each rest's windows, its end-of-text included
        first = np.cumsum(windows) - np.asarray(windows)
        docs.starts, docs.lengths = docs.starts[first], docs.lengths[first]  # each rest's first window only
        self.docs, self.tokens, self.pad_id = docs, docs.tokens, docs.pad_id
        self.cond = np.zeros((len(keep), cond_len), dtype=np.int64)
        self.cond_lengths = np.asarray([len(conditions[i]) for i in keep], dtype=np.int64)
        for row, i in enumerate(keep):
            self.cond[row, : len(conditions[i])] = conditions[i]

    def __len__(self) -> int:
        return len(self.docs)

    def batch(self, indices):
        return self.docs.batch(indices)

    def conditions(self, indices, device="cpu"):
        """The conditions of `indices`: ids (B, cond_len) and lengths (B,), torch tensors on `device`."""
        idx = list(indices)
        return torch.from_numpy(self.cond[idx]).to(device), torch.from_numpy(self.cond_lengths[idx]).to(device)


def split_dataset(data_dir, split: str, cfg, tokenizer):
    """A split as a model of `cfg` trains on it: the pairs for a conditional model, the token shards otherwise."""
    if cfg.cond_len:
        return PairDataset(data_dir, split, cfg.canvas_len, cfg.cond_len, tokenizer)
    return CanvasDataset(data_dir, split, cfg.canvas_len, tokenizer.pad_id)
