"""Comparing runners: masked canvases at chosen noise levels, and one loop that scores every runner's logits
against a reference's (export parity, the INT8 accuracy report, the parity test); for the cached graphs, one loop
that sends the same calls to every runner, each over its own cache. numpy only."""

from __future__ import annotations

import numpy as np


def mask_at_ratios(canvases: np.ndarray, ratios, mask_id: int, pad_id: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask each position with probability `ratios` (a number, or one per canvas shaped (n, 1)); padding stays.
    Returns (masked canvases int32, the masked positions)."""
    masked = (rng.random(canvases.shape) < ratios) & (canvases != pad_id)
    return np.where(masked, mask_id, canvases).astype(np.int32), masked


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
        z, masked = mask_at_ratios(canvases, per_canvas, mask_id, pad_id, rng)
        yield label, z, masked


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    if not len(targets):
        return 0.0
    logits = logits.astype(np.float64)
    top = logits.max(-1)
    lse = np.log(np.exp(logits - top[:, None]).sum(-1)) + top
    return float(np.mean(lse - logits[np.arange(len(targets)), targets]))


def compare_logits(ref: np.ndarray, got: np.ndarray, targets: np.ndarray, score: np.ndarray, mask_id: int) -> dict:
    """Agreement of `got` with `ref` logits and accuracy at the scored positions; the mask column (never a
    prediction) is left out. A non-finite value makes every agreement fail (NaN never passes a gate)."""
    keep = np.ones(ref.shape[-1], dtype=bool)
    keep[mask_id] = False
    r, g, t = ref[score][:, keep], got[score][:, keep], targets[score]
    t = t - (t > mask_id)  # the target's index once the mask column is gone
    empty = r.size == 0
    finite = bool(np.isfinite(g).all())
    return {
        "max_abs_logit_diff": 0.0 if empty else (float(np.abs(r - g).max()) if finite else float("inf")),
        "top1_agreement": 1.0 if empty else (float((r.argmax(-1) == g.argmax(-1)).mean()) if finite else 0.0),
        "nll_ref": _nll(r, t),
        "nll": _nll(g, t) if finite else float("inf"),
        "accuracy_ref": 0.0 if empty else float((r.argmax(-1) == t).mean()),
        "accuracy": 0.0 if empty else (float((g.argmax(-1) == t).mean()) if finite else 0.0),
        "positions": int(score.sum()),
    }


def previous_prediction(reference, tokens: np.ndarray, k: int, mask_id: int, batch: int = 16,
                        memory: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A self-conditioned model's soft inputs for canvases, as its sampler feeds them: `reference`'s own top-k (ids,
    probabilities) on the canvases without soft inputs, at the masked positions (zero elsewhere); `memory`: a
    conditional model's encoded conditions, per canvas."""
    ids, probs = [], []
    for i in range(0, len(tokens), batch):
        out = reference.run("canvas", {"tokens": tokens[i : i + batch], **{n: v[i : i + batch] for n, v in (memory or {}).items()}})
        ids.append(out["topk_ids"][..., :k].astype(np.int32))
        probs.append(np.exp(out["topk_logprobs"][..., :k]).astype(np.float32))
    masked = (tokens == mask_id)[..., None]
    return {"soft_ids": np.where(masked, np.concatenate(ids), 0).astype(np.int32),
            "soft_probs": np.where(masked, np.concatenate(probs), 0.0).astype(np.float32)}


def extra_feeds(reference, clean: np.ndarray, z: np.ndarray, mask_id: int, pad_id: int, seed: int = 0, batch: int = 16) -> dict | None:
    """What a graph takes beside the masked canvases `z`: a sparse-distribution model's candidates and noise level (its
    family's `probe_feeds`), a self-conditioned model's previous prediction, or nothing."""
    from jetson_dllm.families import family_of

    cfg = reference.cfg
    probe = getattr(family_of(cfg).runtime_module(), "probe_feeds", None)
    if probe is not None:
        return probe(reference, clean, z, mask_id, pad_id, cfg, seed)
    memory = encoded_conditions(reference, clean, pad_id) if getattr(cfg, "cond_len", 0) else {}
    soft = previous_prediction(reference, z, cfg.soft_k, mask_id, batch, memory) if getattr(cfg, "soft_k", 0) else {}
    return {**soft, **memory} or None


def encoded_conditions(reference, clean: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """A conditional model's encodings for probe canvases (`probe_conditions`), through `reference`'s encoder graph:
    the cross-attention is measured read and unread."""
    out = reference.run("encoder", probe_conditions(clean, pad_id, reference.cfg.cond_len))
    return {name: np.array(out[name], copy=True) for name in ("memory", "memory_bias")}


def probe_conditions(clean: np.ndarray, pad_id: int, cond_len: int) -> dict[str, np.ndarray]:
    """The encoder graph's feeds for probe canvases: about half of them (by their text: the same canvas always gets
    the same) under a condition of their own first tokens (up to half the encoder's length), the others empty."""
    tokens = np.zeros((len(clean), cond_len), dtype=np.int32)
    lengths = np.zeros(len(clean), dtype=np.int32)
    for row, canvas in enumerate(clean):
        text = canvas[canvas != pad_id][: max(1, cond_len // 2)]
        if int(canvas.sum()) % 2:
            tokens[row, : len(text)], lengths[row] = text, len(text)
    return {"tokens": tokens, "condition_len": lengths}


def logits_of(runner, tokens: np.ndarray, batch: int = 16, soft: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The full head's logits of a runner, `batch` canvases per call (with `soft` inputs, their rows alongside)."""
    def feeds(i):
        return {"tokens": tokens[i : i + batch], **{name: value[i : i + batch] for name, value in (soft or {}).items()}}

    return np.concatenate([runner.run("canvas", feeds(i), outputs=("logits",))["logits"] for i in range(0, len(tokens), batch)])


def compare_runners(reference, runners: dict, canvases: np.ndarray, levels, mask_id: int, pad_id: int,
                    seed: int = 0, batch: int = 16) -> dict:
    """Every runner in `runners` (name -> Runner) against `reference`, per noise level: name -> level -> row.

    The one parity loop of the project: the same masked canvases go through every runner; a self-conditioned
    model's (soft inputs) with the reference's own previous prediction (`previous_prediction`), as it samples."""
    report = {name: {} for name in runners}
    for label, z, score in masked_views(canvases, levels, mask_id, pad_id, seed):
        soft = extra_feeds(reference, canvases, z, mask_id, pad_id, seed, batch)
        ref = logits_of(reference, z, batch, soft)
        for name, runner in runners.items():
            got = ref if runner is reference else logits_of(runner, z, batch, soft)
            report[name][label] = compare_logits(ref, got, canvases, score, mask_id)
    return report


def summarize(rows: dict) -> dict:
    """One runner's rows over the levels: the worst logit difference, the mean top-1 agreement and NLL change."""
    return {
        "max_abs_logit_diff": max(v["max_abs_logit_diff"] for v in rows.values()),
        "top1_agreement": float(np.mean([v["top1_agreement"] for v in rows.values()])),
        "nll_diff": float(np.mean([v["nll"] - v["nll_ref"] for v in rows.values()])),
        "by_mask_ratio": rows,
    }


def compare_calls(reference, runners: dict, calls) -> dict:
    """The cached graphs' parity: the same sequence of graph calls (which fill each runner's own cache as they go)
    through `reference` and every runner in `runners` (name -> Runner). Per runner, over the calls that return a
    top-K: the worst |log-probability difference| of the sorted top-K, the top-1 agreement, the number of such calls,
    and the same per graph. A non-finite output fails every gate."""
    stats = {name: {} for name in runners}
    for call in calls:
        ref = {k: np.array(v, copy=True) for k, v in reference.run(call.graph, call.feeds).items()}
        for name, runner in runners.items():
            got = runner.run(call.graph, call.feeds)
            if "topk_logprobs" not in ref:
                continue
            diff = np.abs(got["topk_logprobs"] - ref["topk_logprobs"])
            worst = float(diff.max()) if np.isfinite(got["topk_logprobs"]).all() else float("inf")
            agree = float((got["topk_ids"][..., 0] == ref["topk_ids"][..., 0]).mean()) if np.isfinite(worst) else 0.0
            row = stats[name].setdefault(call.graph, [0.0, 0.0, 0])
            row[0], row[1], row[2] = max(row[0], worst), row[1] + agree, row[2] + 1
    report = {}
    for name, by_graph in stats.items():
        graphs = {g: {"max_abs_logprob_diff": w, "top1_agreement": a / n, "calls": n} for g, (w, a, n) in by_graph.items()}
        n = sum(r["calls"] for r in graphs.values())
        report[name] = {"max_abs_logprob_diff": max((r["max_abs_logprob_diff"] for r in graphs.values()), default=0.0),
                        "top1_agreement": sum(r["top1_agreement"] * r["calls"] for r in graphs.values()) / max(n, 1),
                        "calls": n, "by_graph": graphs}
    return report
