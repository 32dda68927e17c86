"""The autoregressive baseline, host side: next-token loss, the exact NLL, and the decode graph's export."""

from __future__ import annotations

from train_host.autoregressive import ar_loss, ar_nll
from train_host.families import EvalContext, ExportOptions

FIXED_RATIO_ACCURACY = False


def train_loss(model, x, run, t, noise, generator):
    return ar_loss(model, x, run.tokenizer.bos_id, run.tokenizer.pad_id)


def nll_batch(model, x, ev: EvalContext) -> dict:
    if ev.bos_id is None:
        raise ValueError("evaluating an autoregressive model needs bos_id (the end-of-text id)")
    return ar_nll(model, x, ev.bos_id, ev.pad_id)


def eval_extra(run) -> dict:
    return {}


def export(model, tokenizer, ckpt: dict, out_dir, options: ExportOptions):
    from train_host.ar_export import export_ar_bundle

    return export_ar_bundle(model, tokenizer, ckpt, out_dir, options.topk, options.overwrite, options.say, options.precisions)
