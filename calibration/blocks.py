"""INT8 for block diffusion's two graphs: calibration that matches what they see, the same quantizer and rules as
the canvas graph, and an accuracy report per noise level.

The block step never runs on a whole canvas: it runs on one noised block over a cache of the clean blocks before
it. So a calibration feed is a validation canvas cut at a block position j (drawn over the blocks that hold text),
its first j blocks committed into a cache by the FP32 commit graph, and block j masked at a ratio stratified over
(0, 1] across the feeds: every noise level and every cache length is covered. The commit graph is calibrated on the
clean blocks at the same positions. A cache per feed is megabytes, so feeds are computed as the calibrator asks for
them, never held together.

The accuracy that decides which layers stay FP32 is the block step's masked-token accuracy at each noise level,
with the cache built by the commit graph of the same precision (errors in the cache count), against FP32.

A conditional model's graphs also take its condition's encoding: every feed and report call gets each canvas's own
(a condition cut from its text, about half empty, through the FP32 encoder), so the cross-attention is calibrated
read and unread.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from calibration.data import MIN_CANVASES, FeedReader
from calibration.dynamic import quiet
from calibration.quantize import Int8Options, qdq_problems, quantizable_nodes, quantize, search_exclusions
from calibration.report import BUCKETS, mean_accuracy_drop
from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families.common import soft_feeds, still_masked
from jetson_dllm.parity import encoded_conditions, mask_at_ratios
from jetson_dllm.runners.graphs import SAMPLING_OUTPUTS
from jetson_dllm.runners.onnx_runner import onnx_runner_from_graphs


def block_runner(step_path: Path, commit_path: Path, cfg: ModelConfig, encoder: Path | None = None):
    """A (block step, commit) pair of graph files on the onnxruntime runner, which owns the cache they fill; a
    conditional model's reference also runs its `encoder`."""
    return onnx_runner_from_graphs({"block_step": step_path, "commit": commit_path, **({"encoder": encoder} if encoder else {})}, cfg)


def encodings(reference, canvases: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """A conditional model's encoding per canvas (conditions cut from the canvases' own text, about half empty:
    `parity.probe_conditions`), through the reference's encoder; {} for a model without a condition."""
    return encoded_conditions(reference, canvases, pad_id) if reference.cfg.cond_len else {}


def _rows(memory: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    return {name: value[rows] for name, value in memory.items()}


def _at(start: int, rows: int = 1) -> np.ndarray:
    """Every row's valid length (the graphs take one per row)."""
    return np.full(rows, start, np.int32)


def text_blocks(canvas: np.ndarray, block: int, pad_id: int) -> int:
    """How many blocks of a canvas hold text (at least one)."""
    return max(1, -(-int((canvas != pad_id).sum()) // block))


class BlockFeeds(FeedReader):
    """onnxruntime's CalibrationDataReader (get_next / rewind) over block-step or commit feeds, made on demand."""

    def __init__(self, canvases: np.ndarray, reference, mask_id: int, pad_id: int, which: str, seed: int = 0):
        if len(canvases) < MIN_CANVASES:
            raise DllmError(f"only {len(canvases)} calibration canvases; at least {MIN_CANVASES} are needed "
                            "(raise --calib-canvases, or give --data with a larger validation split)")
        rng = np.random.default_rng(seed)
        n, b = len(canvases), reference.cfg.block_size
        ratios = (rng.permutation(n) + 1 - rng.random(n)) / n  # canvas i's ratio in the i-th of n strata of (0, 1]
        self.items = [(canvases[i], int(rng.integers(text_blocks(canvases[i], b, pad_id))), float(ratios[i])) for i in range(n)]
        self.reference, self.mask_id, self.pad_id, self.which, self.seed = reference, mask_id, pad_id, which, seed
        self.memory = encodings(reference, canvases, pad_id)  # a conditional model's: each canvas's own condition

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        ref, b = self.reference, self.reference.cfg.block_size
        rng = np.random.default_rng(self.seed + 1)
        for row, (canvas, j, ratio) in enumerate(self.items):
            memory = _rows(self.memory, slice(row, row + 1))
            for i in range(j):  # the prefix into the runner's own cache (past position j*b it holds earlier feeds', masked)
                ref.run("commit", {"tokens": canvas[None, i * b : (i + 1) * b], "valid_len": _at(i * b), **memory})
            block = canvas[None, j * b : (j + 1) * b].astype(np.int32)
            if self.which == "step":
                block = mask_at_ratios(block, ratio, self.mask_id, self.pad_id, rng)[0]
            k, v = ref.cache_arrays(1)
            soft = previous_step(ref, block, j * b, self.mask_id, memory) if self.which == "step" else {}
            yield {"tokens": block, "k_cache": k.copy(), "v_cache": v.copy(), "valid_len": _at(j * b), **soft, **memory}


def previous_step(runner, z: np.ndarray, start: int, mask_id: int, memory: dict | None = None) -> dict[str, np.ndarray]:
    """A self-conditioned model's soft inputs for noised blocks `z` (n, b) at `start`: the runner's own top-k on them
    without soft inputs, at the masked positions (what its sampler feeds the next step); {} for other models.
    `memory`: a conditional model's encodings of the rows."""
    k = runner.cfg.soft_k
    if not k:
        return {}
    out = runner.run("block_step", {"tokens": z, "valid_len": _at(start, len(z)), **(memory or {})})
    return still_masked(soft_feeds(out["topk_logprobs"], out["topk_ids"], k), z == mask_id)


def _heads(out: dict) -> tuple[np.ndarray, np.ndarray]:
    """Copies of a call's top-K log-probabilities and ids (the runner reuses its buffers)."""
    return tuple(np.array(out[o], copy=True) for o in SAMPLING_OUTPUTS)


def block_report(reference, others: dict, canvases: np.ndarray, mask_id: int, pad_id: int,
                 seed: int = 0) -> dict[str, dict[str, dict]]:
    """Per runner (a graph pair) and noise bucket: masked-token top-1 accuracy against the reference's, their top-1
    agreement and the largest log-probability difference. Every text block of every canvas, each runner filling its
    own cache."""
    b, n = reference.cfg.block_size, len(canvases)
    pairs = {"ref": reference, **others}
    memory = encodings(reference, canvases, pad_id)  # a conditional model's: each canvas's own condition, for every runner
    tally = {name: {f"{lo:g}-{hi:g}": np.zeros(5) for lo, hi in BUCKETS} for name in others}  # hits, ref hits, agree, n, worst
    rng = np.random.default_rng(seed)
    for j in range(max(text_blocks(c, b, pad_id) for c in canvases)):
        clean = canvases[:, j * b : (j + 1) * b]
        for lo, hi in BUCKETS:
            z, masked = mask_at_ratios(clean, hi - (hi - lo) * rng.random((n, 1)), mask_id, pad_id, rng)
            soft = previous_step(reference, z, j * b, mask_id, memory)  # a self-conditioned model: the reference's own prediction
            outs = {name: _heads(g.run("block_step", {"tokens": z, "valid_len": _at(j * b, n), **soft, **memory})) for name, g in pairs.items()}
            want = clean[masked]
            ref_lp, ref_ids = outs["ref"]
            for name in others:
                lp, ids = outs[name]
                row = tally[name][f"{lo:g}-{hi:g}"]
                row[:4] += [(ids[..., 0][masked] == want).sum(), (ref_ids[..., 0][masked] == want).sum(),
                            (ids[..., 0][masked] == ref_ids[..., 0][masked]).sum(), masked.sum()]
                same = ids == ref_ids  # log-probabilities compare where the two heads name the same token
                row[4] = max(row[4], float(np.abs(lp - ref_lp)[same].max(initial=0.0)))
        for g in pairs.values():
            g.run("commit", {"tokens": clean.astype(np.int32), "valid_len": _at(j * b, n), **memory})
    return {name: {label: {"accuracy": t[0] / max(t[3], 1), "accuracy_ref": t[1] / max(t[3], 1), "top1_agreement": t[2] / max(t[3], 1),
                           "positions": int(t[3]), "max_abs_logprob_diff": float(t[4])} for label, t in rows.items()}
            for name, rows in tally.items()}


def _prepared(folder: Path, work: Path) -> dict[str, Path]:
    """onnxruntime's pre-processing of both FP32 graphs (shape inference, basic portable optimizations)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = {}
    with quiet():
        for name in ("block_step", "commit"):
            pre[name] = work / f"{name}.pre.onnx"
            quant_pre_process(str(folder / f"{name}.fp32.onnx"), str(pre[name]), skip_optimization=False, skip_symbolic_shape=True)
    return pre


def _check_qdq(*paths: Path) -> None:
    import onnx

    for path in paths:
        onnx.checker.check_model(str(path), full_check=True)
        problems = qdq_problems(onnx.load(str(path)))
        if problems:
            raise DllmError(f"the INT8 graph {path.name} breaks TensorRT's Q/DQ rules: {problems[0]}")


def quantize_block_graphs(folder: Path, cfg: ModelConfig, canvases: np.ndarray, mask_id: int, pad_id: int, source: str,
                          options: Int8Options, progress=None) -> dict:
    """Write block_step.int8.onnx and commit.int8.onnx beside the FP32 graphs in `folder`; returns the report.

    `canvases`: clean validation canvases, the first `options.n_canvases` calibrate, the rest measure the drop.
    The commit graph is quantized whole; the block step keeps in FP32 the layers the search finds (the canvas
    graph's `search_exclusions`, against the same budget)."""
    say = progress or (lambda msg: None)
    options.validate(cfg.canvas_len)
    t0 = time.time()
    calib, held_out = canvases[: options.n_canvases], canvases[options.n_canvases :]
    overlap = len(held_out) == 0
    held_out = held_out if len(held_out) else calib
    work = folder / ".int8-work"
    work.mkdir(exist_ok=True)
    try:
        search, nodes, report = _quantize_both(folder, work, cfg, calib, held_out, mask_id, pad_id, options, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    drop = mean_accuracy_drop(report["int8"])
    return {
        "method": options.method, "quantizer": "onnxruntime.quantization.quantize_static (QDQ, symmetric, per-channel weights)",
        "source": source, "calibration_canvases": len(calib), "calibration": "one block per canvas, at a random text block, noise stratified over (0, 1]",
        "eval_canvases": int(len(held_out)), "calibration_overlaps_eval": overlap, "quantizable": len(nodes),
        "quantized": len(nodes) - len(search["excluded"]), "excluded": search["excluded"], "sensitivity_points": search["sensitivity"],
        "trajectory": search["trajectory"], "accuracy_drop_points": drop, "search_drop_points": search["drop"],
        "budget_points": options.budget, "within_budget": bool(drop <= options.budget), "allow_over_budget": options.allow_over_budget,
        "seconds": round(time.time() - t0, 1), "report": report,
    }


def _quantize_both(folder: Path, work: Path, cfg: ModelConfig, calib: np.ndarray, held_out: np.ndarray, mask_id: int, pad_id: int,
                   options: Int8Options, say) -> tuple[dict, list[str], dict]:
    """Quantize the commit graph whole and the block step with the exclusion search; (search, nodes, final report)."""
    import onnx

    encoder = folder / "encoder.onnx" if cfg.cond_len else None  # a conditional model's (FP32): the probes' encodings
    reference = block_runner(folder / "block_step.fp32.onnx", folder / "commit.fp32.onnx", cfg, encoder)
    pre = _prepared(folder, work)
    nodes = quantizable_nodes(onnx.load(str(pre["block_step"])))
    say(f"INT8: calibrating the commit graph ({len(calib)} clean blocks over cached prefixes)")
    commit_path = folder / "commit.int8.onnx"
    quantize(pre["commit"], commit_path, BlockFeeds(calib, reference, mask_id, pad_id, "commit", options.seed),
             options.method, [], work / "commit-ranges.json")
    step_feeds = BlockFeeds(calib, reference, mask_id, pad_id, "step", options.seed)

    def drop_of(exclude: list[str], tag: str) -> float:
        path = work / f"{tag}.onnx"
        quantize(pre["block_step"], path, step_feeds, options.method, exclude, work / "step-ranges.json")
        with block_runner(path, commit_path, cfg) as candidate:
            rows = block_report(reference, {"q": candidate}, held_out, mask_id, pad_id, options.seed + 1)
        return mean_accuracy_drop(rows["q"])

    say(f"INT8: calibrating the block step ({len(calib)} noised blocks, noise levels stratified) and quantizing {len(nodes)} matmuls")
    search = search_exclusions(nodes, drop_of, options.budget, progress=say)
    step_path = folder / "block_step.int8.onnx"
    quantize(pre["block_step"], step_path, step_feeds, options.method, search["excluded"], work / "step-ranges.json")
    _check_qdq(step_path, commit_path)
    with block_runner(step_path, commit_path, cfg) as int8:
        report = block_report(reference, {"int8": int8}, held_out, mask_id, pad_id, options.seed + 2)
    reference.close()
    return search, nodes, report
