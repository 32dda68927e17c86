"""The INT8 accuracy report: noise levels and the accuracy drop against FP32 (the comparison loop is jetson_dllm.parity)."""

from __future__ import annotations

import numpy as np

# Noise levels of the INT8 report: mask-ratio buckets over (0, 1].
BUCKETS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def mean_accuracy_drop(rows: dict) -> float:
    """FP32 accuracy minus this graph's, averaged over noise levels, in points (percent)."""
    return 100.0 * float(np.mean([r["accuracy_ref"] - r["accuracy"] for r in rows.values()]))
