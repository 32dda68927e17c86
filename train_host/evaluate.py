"""Evaluation of a denoiser on a validation split: the NLL bound (ELBO), perplexity bound, masked accuracy."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from jetson_dllm.errors import DllmError
from train_host.autoregressive import ar_nll
from train_host.bd3 import bd3_nll_bound
from train_host.checkpoint import load_model
from train_host.data import CanvasDataset, load_manifest
from train_host.diffusion import masked_accuracy, nll_bound
from train_host.judge import Judge, judge_generations
from train_host.sources import Source

FIXED_RATIOS = (0.15, 0.5, 0.9)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: CanvasDataset,
    mask_id: int,
    n_canvases: int = 256,
    n_t: int = 8,
    batch_size: int = 32,
    ratios: tuple[float, ...] = FIXED_RATIOS,
    schedule: str = "loglinear",
    seed: int = 1234,
    device: str | torch.device = "cpu",
    bos_id: int | None = None,
    progress=None,
) -> dict[str, float]:
    """Metrics per text token (padding excluded) on the first `n_canvases` validation canvases.

    Deterministic for a seed, so numbers from different steps and runs compare. `progress(phase, done, total)`
    is called after every batch of canvases.
    Diffusion: `val_nll` is an upper bound on nats/token, `val_ppl` = exp(val_nll) bounds the perplexity,
    accuracies are of masked tokens. Autoregressive (cfg.causal; `bos_id` needed): the exact NLL and
    next-token accuracy over the same tokens.
    """
    if model.cfg.causal:
        return _evaluate_ar(model, dataset, n_canvases, batch_size, bos_id, device, progress)
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    n = min(n_canvases, len(dataset))
    nll = tokens = masked = correct = 0.0
    fixed = {r: [0, 0] for r in ratios}
    for start in range(0, n, batch_size):
        x = torch.from_numpy(dataset.batch(np.arange(start, min(n, start + batch_size)))).to(device)
        if model.cfg.block_size:  # block diffusion: its own bound; the fixed-ratio accuracies are MDLM's
            out = bd3_nll_bound(model, x, dataset.pad_id, mask_id, model.cfg.block_size, n_t=n_t, schedule=schedule, generator=g)
        else:
            out = nll_bound(model, x, dataset.pad_id, mask_id, n_t=n_t, schedule=schedule, generator=g)
        nll += out["nll"]
        tokens += out["tokens"]
        masked += out["masked"]
        correct += out["correct"]
        for r in ratios if not model.cfg.block_size else ():
            c, t = masked_accuracy(model, x, r, dataset.pad_id, mask_id, generator=g)
            fixed[r][0] += c
            fixed[r][1] += t
        if progress:
            progress("evaluate", min(n, start + batch_size), n)
    model.train(was_training)
    per_token = nll / max(tokens, 1)
    metrics = {
        "val_nll": per_token,
        "val_ppl": math.exp(min(per_token, 50.0)),
        "val_acc": correct / max(masked, 1),
        "val_tokens": int(tokens),
    }
    for r, (c, t) in fixed.items():
        if t:
            metrics[f"val_acc@{r:g}"] = c / t
    return metrics


@torch.no_grad()
def _evaluate_ar(model, dataset: CanvasDataset, n_canvases: int, batch_size: int, bos_id: int | None, device, progress=None) -> dict[str, float]:
    if bos_id is None:
        raise ValueError("evaluating an autoregressive model needs bos_id (the end-of-text id)")
    was_training = model.training
    model.eval()
    n = min(n_canvases, len(dataset))
    nll = tokens = correct = 0.0
    for start in range(0, n, batch_size):
        x = torch.from_numpy(dataset.batch(np.arange(start, min(n, start + batch_size)))).to(device)
        out = ar_nll(model, x, bos_id, dataset.pad_id)
        nll, tokens, correct = nll + out["nll"], tokens + out["tokens"], correct + out["correct"]
        if progress:
            progress("evaluate", min(n, start + batch_size), n)
    model.train(was_training)
    per_token = nll / max(tokens, 1)
    return {"val_nll": per_token, "val_ppl": math.exp(min(per_token, 50.0)), "val_acc": correct / max(tokens, 1), "val_tokens": int(tokens)}


def unigram_nll(train: CanvasDataset, val: CanvasDataset, max_tokens: int = 50_000_000) -> float:
    """NLL (nats/token) of the validation text under the training text's token frequencies (add-one smoothed):
    the score of a model that learned nothing but word frequencies. A diffusion bound or an AR NLL near it means
    the model is undertrained."""
    counts = np.bincount(np.asarray(train.tokens[:max_tokens]), minlength=int(train.tokens.max()) + 1).astype(np.float64) + 1.0
    val_tokens = np.asarray(val.tokens[:max_tokens])
    counts = np.pad(counts, (0, max(0, int(val_tokens.max()) + 1 - len(counts))), constant_values=1.0)
    return float(-np.mean(np.log(counts[val_tokens] / counts.sum())))


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path | None = None, canvases: int = 512, n_t: int = 8, seed: int = 1234,
                        generation: dict | None = None, text: str | Path | None = None, progress=None) -> dict:
    """`dllm eval`: a checkpoint's metrics on its data's validation split (or on every story of a `text` file,
    tokenized with the checkpoint's tokenizer), and with `generation` (the options of `judge_generations`) its
    samples judged. Returns the metrics with `checkpoint`, `causal` and what was scored."""
    if canvases < 1 or n_t < 1:
        raise DllmError(f"--canvases and --n-t must be positive, got {canvases} and {n_t}")
    if generation is not None and generation.get("samples", 1) < 1:
        raise DllmError(f"--samples must be positive, got {generation['samples']}")
    model, tokenizer, config = load_model(checkpoint)
    if text is not None:
        ds, scored = text_dataset(text, tokenizer, model.cfg.canvas_len), str(text)
        canvases = len(ds)  # all of it
    else:
        if data_dir is None or load_manifest(data_dir)["tokenizer_sha256"] != tokenizer.sha256:
            raise DllmError(f"{data_dir} was tokenized with another tokenizer than {config['path']}; evaluate on the data the model was trained with, or a text file with --text")
        ds, scored = CanvasDataset(data_dir, "val", model.cfg.canvas_len, tokenizer.pad_id), f"{data_dir} (val)"
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.inference_mode():
        metrics = evaluate(model, ds, model.cfg.mask_id, n_canvases=canvases, n_t=n_t, seed=seed, bos_id=tokenizer.eot_id, progress=progress)
    if generation is not None:
        generation = dict(generation)
        judge_path = generation.pop("judge", None)
        scorer = Judge(judge_path) if judge_path is not None else None
        metrics.update(judge_generations(checkpoint, scorer, seed=seed, progress=progress, **generation))
        if scorer is not None and scorer.tokenizer.sha256 == tokenizer.sha256 and text is None:  # the judge's exact NLL on the same text
            judge_ds = CanvasDataset(data_dir, "val", scorer.model.cfg.canvas_len, scorer.tokenizer.pad_id)
            with torch.inference_mode():
                metrics["judge_val_nll"] = evaluate(scorer.model, judge_ds, scorer.model.cfg.mask_id, n_canvases=canvases,
                                                    bos_id=scorer.tokenizer.eot_id)["val_nll"]
    return {"checkpoint": config["path"], "causal": model.cfg.causal, "scored": scored, **metrics}


def text_dataset(path: str | Path, tokenizer, canvas_len: int) -> CanvasDataset:
    """Every document of a text file (stories separated by <|endoftext|>, or one per line; .jsonl and .parquet
    too), tokenized with `tokenizer`, as canvases the way a data folder's split holds them."""
    docs = [d for d in Source(str(path)).documents()]
    if not docs:
        raise DllmError(f"{path} holds no text to evaluate")
    return CanvasDataset.from_documents(tokenizer.encode_batch(docs), tokenizer.eot_id, canvas_len, tokenizer.pad_id, str(path))
