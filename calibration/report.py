"""Accuracy of a graph against the FP32 reference on masked canvases, by noise level (numpy only)."""

from __future__ import annotations

import numpy as np

# Noise levels of the INT8 report: mask-ratio buckets over (0, 1].
BUCKETS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0))


def masked_views(canvases: np.ndarray, ratios, mask_id: int, pad_id: int, seed: int = 0):
    """(label, masked canvases, positions to score) per ratio; a ratio is a number or a (low, high] bucket
    from which each canvas draws its own ratio. Padding is never masked or scored."""
    rng = np.random.default_rng(seed)
    for r in ratios:
        if isinstance(r, tuple):
            low, high = r
            per_canvas = high - (high - low) * rng.random((canvases.shape[0], 1))  # in (low, high]
            label = f"{low:g}-{high:g}"
        else:
            per_canvas, label = r, f"{r:g}"
        masked = (rng.random(canvases.shape) < per_canvas) & (canvases != pad_id)
        yield label, np.where(masked, mask_id, canvases).astype(np.int32), masked


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    if not len(targets):
        return 0.0
    logits = logits.astype(np.float64)
    top = logits.max(-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    return float(np.mean(lse - logits[np.arange(len(targets)), targets]))


def compare_logits(ref: np.ndarray, got: np.ndarray, targets: np.ndarray, score: np.ndarray, mask_id: int) -> dict:
    """Agreement of `got` with `ref` logits and accuracy at the scored positions; the mask column (never a
    prediction) is left out."""
    keep = np.ones(ref.shape[-1], dtype=bool)
    keep[mask_id] = False
    r, g, t = ref[score][:, keep], got[score][:, keep], targets[score]
    t = t - (t > mask_id)  # the target's index once the mask column is gone
    empty = r.size == 0
    return {
        "max_abs_logit_diff": 0.0 if empty else float(np.abs(r - g).max()),
        "top1_agreement": 1.0 if empty else float((r.argmax(-1) == g.argmax(-1)).mean()),
        "nll_ref": _nll(r, t),
        "nll": _nll(g, t),
        "accuracy_ref": 0.0 if empty else float((r.argmax(-1) == t).mean()),
        "accuracy": 0.0 if empty else float((g.argmax(-1) == t).mean()),
        "positions": int(score.sum()),
    }


def accuracy_report(run_ref, runs: dict, canvases: np.ndarray, mask_id: int, pad_id: int, levels=BUCKETS, seed: int = 0, batch: int = 16) -> dict:
    """For each noise level: every graph in `runs` (name -> tokens -> logits) against `run_ref` (FP32)."""
    report = {name: {} for name in runs}
    for label, z, score in masked_views(canvases, levels, mask_id, pad_id, seed):
        ref = np.concatenate([run_ref(z[i : i + batch]) for i in range(0, len(z), batch)])
        for name, run in runs.items():
            got = ref if run is run_ref else np.concatenate([run(z[i : i + batch]) for i in range(0, len(z), batch)])
            report[name][label] = compare_logits(ref, got, canvases, score, mask_id)
    return report


def mean_accuracy_drop(rows: dict) -> float:
    """FP32 accuracy minus this graph's, averaged over noise levels, in points (percent)."""
    return 100.0 * float(np.mean([r["accuracy_ref"] - r["accuracy"] for r in rows.values()]))


def calibration_table(calibration: dict):
    """The INT8 report as a rich table: per noise level, accuracy and NLL of FP32 / FP16 / INT8."""
    from rich.table import Table

    levels = calibration["report"]
    title = (f"INT8 ({calibration['method']}, {calibration['quantized']} of {calibration['quantizable']} matmuls, "
             f"{len(calibration['excluded'])} kept in FP32) on {calibration['eval_canvases']} held-out canvases: "
             f"accuracy drop {calibration['accuracy_drop_points']:.2f} points, budget {calibration['budget_points']:g}"
             + ("" if calibration["within_budget"] else "  [red]OVER BUDGET[/]"))
    table = Table(title=title)
    for col in ("mask ratio", "acc fp32", "acc fp16", "acc int8", "int8 - fp32", "NLL fp32", "NLL fp16", "NLL int8", "top-1 agree int8/fp32"):
        table.add_column(col, justify="right")
    for label in levels["int8"]:
        f32, f16, i8 = levels["int8"][label], levels.get("fp16", {}).get(label), levels["int8"][label]
        table.add_row(label, f"{f32['accuracy_ref']:.4f}", f"{f16['accuracy']:.4f}" if f16 else "-", f"{i8['accuracy']:.4f}",
                      f"{100 * (i8['accuracy'] - f32['accuracy_ref']):+.2f} pt", f"{f32['nll_ref']:.4f}",
                      f"{f16['nll']:.4f}" if f16 else "-", f"{i8['nll']:.4f}", f"{i8['top1_agreement']:.4f}")
    return table
