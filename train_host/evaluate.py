"""Evaluation of a denoiser on a validation split: the NLL bound (ELBO), perplexity bound, masked accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.threads import resolve as resolve_threads
from train_host.checkpoint import load_model
from train_host.conditioning import batch_condition, with_condition
from train_host.data import CanvasDataset, load_manifest
from train_host.diffusion import masked_accuracy
from train_host.families import EvalContext
from train_host.judge import Judge, judge_generations
from train_host.pair_data import split_dataset
from train_host.self_cond import conditioned
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
    accuracies are of masked tokens. Autoregressive (the `ar` family; `bos_id` needed): the exact NLL and
    next-token accuracy over the same tokens.
    """
    family = family_of(model.cfg).host_module()
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ev = EvalContext(dataset.pad_id, mask_id, bos_id, n_t, schedule, g)
    n = min(n_canvases, len(dataset))
    nll = tokens = masked = correct = 0.0
    extra: dict[str, list[int]] = {}  # a family's own accuracies: name -> (correct, total)
    fixed = {r: [0, 0] for r in (ratios if family.FIXED_RATIO_ACCURACY else ())}
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        x = torch.from_numpy(dataset.batch(rows)).to(device)
        bound = with_condition(model, batch_condition(dataset, rows, device, 0.0, None))  # a conditional model's pairs
        out = family.nll_batch(bound, x, ev)
        nll += out["nll"] if "nll" in out else out["loss"]  # SDD: a denoising loss, no likelihood
        for name, (c, t) in out.get("extra", {}).items():
            extra[name] = [a + b for a, b in zip(extra.get(name, (0, 0)), (c, t))]
        tokens += out["tokens"]
        masked += out["masked"]
        correct += out["correct"]
        for r in fixed:
            c, t = masked_accuracy(conditioned(bound, model.cfg.soft_k), x, r, dataset.pad_id, mask_id, generator=g)
            fixed[r][0] += c
            fixed[r][1] += t
        if progress:
            progress("evaluate", min(n, start + batch_size), n)
    model.train(was_training)
    per_token = nll / max(tokens, 1)
    if family_of(model.cfg).nll:
        metrics = {"val_nll": per_token, "val_ppl": math.exp(min(per_token, 50.0))}
    else:  # no likelihood: the loss is not an NLL and goes in no NLL column
        metrics = {"val_loss": per_token}
    metrics |= {"val_acc": correct / max(masked, 1), "val_tokens": int(tokens)}
    metrics |= {name: c / max(t, 1) for name, (c, t) in extra.items()}
    for r, (c, t) in fixed.items():
        if t:
            metrics[f"val_acc@{r:g}"] = c / t
    return metrics


def unigram_nll(train: CanvasDataset, val: CanvasDataset, max_tokens: int = 50_000_000) -> float:
    """NLL (nats/token) of the validation text under the training text's token frequencies (add-one smoothed):
    the score of a model that learned nothing but word frequencies. A diffusion bound or an AR NLL near it means
    the model is undertrained."""
    counts = np.bincount(np.asarray(train.tokens[:max_tokens]), minlength=int(train.tokens.max()) + 1).astype(np.float64) + 1.0
    val_tokens = np.asarray(val.tokens[:max_tokens])
    counts = np.pad(counts, (0, max(0, int(val_tokens.max()) + 1 - len(counts))), constant_values=1.0)
    return float(-np.mean(np.log(counts[val_tokens] / counts.sum())))


def evaluate_checkpoint(checkpoint: str | Path, data_dir: str | Path | None = None, canvases: int = 512, n_t: int = 8, seed: int = 1234,
                        generation: dict | None = None, text: str | Path | None = None, progress=None, threads: int = 0) -> dict:
    """`dllm eval`: a checkpoint's metrics on its data's validation split (or on every story of a `text` file,
    tokenized with the checkpoint's tokenizer), and with `generation` (the options of `judge_generations`) its
    samples judged. Returns the metrics with `checkpoint`, `family`, `nll_kind` (bound or exact) and what was scored."""
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
        ds, scored = split_dataset(data_dir, "val", model.cfg, tokenizer), f"{data_dir} (val)"
    torch.set_num_threads(resolve_threads(threads))
    with torch.inference_mode():
        metrics = evaluate(model, ds, model.cfg.mask_id, n_canvases=canvases, n_t=n_t, seed=seed, bos_id=tokenizer.bos_id, progress=progress)
    if generation is not None:
        generation = dict(generation)
        judge_path = generation.pop("judge", None)
        scorer = Judge(judge_path) if judge_path is not None else None
        metrics.update(judge_generations(checkpoint, scorer, seed=seed, progress=progress, **generation))
        if scorer is not None and scorer.tokenizer.sha256 == tokenizer.sha256 and text is None:  # the judge's exact NLL on the same text
            judge_ds = CanvasDataset(data_dir, "val", scorer.model.cfg.canvas_len, scorer.tokenizer.pad_id)
            with torch.inference_mode():
                metrics["judge_val_nll"] = evaluate(scorer.model, judge_ds, scorer.model.cfg.mask_id, n_canvases=canvases,
                                                    bos_id=scorer.tokenizer.bos_id)["val_nll"]
    family = family_of(model.cfg)
    return {"checkpoint": config["path"], "family": family.name, "nll_kind": family.nll, "scored": scored, **metrics}


def text_dataset(path: str | Path, tokenizer, canvas_len: int) -> CanvasDataset:
    """Every document of a text file (stories separated by <|endoftext|>, or one per line; .jsonl and .parquet
    too), tokenized with `tokenizer`, as canvases the way a data folder's split holds them."""
    docs = [d for d in Source(str(path)).documents()]
    if not docs:
        raise DllmError(f"{path} holds no text to evaluate")
    return CanvasDataset.from_documents(tokenizer.encode_batch(docs), tokenizer.eot_id, canvas_len, tokenizer.pad_id, str(path))
