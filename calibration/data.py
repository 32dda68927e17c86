"""Calibration data that matches what the engine sees: validation canvases masked at every noise level.

The denoiser never runs on clean text; it runs on canvases from almost unmasked to fully masked. So the
calibration canvases are validation canvases masked at ratios stratified over (0, 1] (canvas i of n draws
its ratio from the i-th of n equal strata), optionally joined by canvases recorded from real sampler runs
(`dllm run --save-canvases`). The reader is a plain iterable of {input name: array}.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.parity import mask_at_ratios

MIN_CANVASES = 8


def stratified_masking(canvases: np.ndarray, mask_id: int, pad_id: int, seed: int = 0) -> np.ndarray:
    """Mask canvas i at a ratio drawn from ((i)/n, (i+1)/n]; padding stays. (n, T) int32."""
    rng = np.random.default_rng(seed)
    n = canvases.shape[0]
    order = rng.permutation(n)  # which canvas gets which stratum
    ratios = (order + 1 - rng.random(n)) / n  # in (i/n, (i+1)/n]
    return mask_at_ratios(canvases, ratios[:, None], mask_id, pad_id, rng)[0]


def load_recorded(path: str | Path, tokenizer_sha256: str, vocab_size: int, canvas_len: int) -> np.ndarray:
    """Canvases saved by `dllm run --save-canvases` (.npz with `tokens` and `tokenizer_sha256`)."""
    path = Path(path)
    if not path.is_file():
        raise DllmError(f"calibration file {path} not found")
    try:
        data = np.load(path, allow_pickle=False)
        tokens, sha = data["tokens"], str(data["tokenizer_sha256"])
    except (ValueError, KeyError, IndexError, OSError):
        raise DllmError(f"{path} is not a calibration file (an .npz with tokens and tokenizer_sha256, from dllm run --save-canvases)") from None
    if sha != tokenizer_sha256:
        raise DllmError(f"{path} was recorded with another tokenizer than this model's; record canvases with this model")
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise DllmError(f"{path}: tokens must be integer canvases shaped (n, canvas), got {tokens.dtype} {tokens.shape}")
    if tokens.shape[1] > canvas_len:
        raise DllmError(f"{path}: canvases of {tokens.shape[1]} tokens are longer than the model takes ({canvas_len})")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise DllmError(f"{path}: token ids outside the vocabulary (0..{vocab_size - 1}); not this model's canvases")
    return tokens.astype(np.int32)


class FeedReader:
    """onnxruntime's CalibrationDataReader (get_next / rewind) over any iterable of feeds (a subclass's __iter__)."""

    _it: Iterator | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self)
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


class CalibrationReader(FeedReader):
    """Iterable of {"tokens": (1, T) int32} (with `soft`, a self-conditioned model's: each canvas's soft inputs, the
    model's own previous prediction, alongside); also an onnxruntime CalibrationDataReader (get_next/rewind)."""

    def __init__(self, canvases: list[np.ndarray] | np.ndarray, soft=None):
        self.canvases = [np.asarray(c, dtype=np.int32).reshape(1, -1) for c in canvases]
        self.soft = soft  # (tokens (1, T)) -> {"soft_ids", "soft_probs"}, or None
        if len(self.canvases) < MIN_CANVASES:
            raise DllmError(f"only {len(self.canvases)} calibration canvases; at least {MIN_CANVASES} are needed "
                            "(raise --calib-canvases, or give --data with a larger validation split)")

    def __len__(self) -> int:
        return len(self.canvases)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for c in self.canvases:
            yield {"tokens": c, **(self.soft(c) if self.soft else {})}
