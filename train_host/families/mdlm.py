"""Masked diffusion (MDLM), host side: the 1/t-weighted masked loss, its NLL bound, and the canvas graph's export;
with soft inputs, self-conditioned (train_host.self_cond)."""

from __future__ import annotations

from train_host import diffusion
from train_host.families import EvalContext, ExportOptions
from train_host.self_cond import conditioned

FIXED_RATIO_ACCURACY = True


def train_loss(model, x, run, t, noise, generator):
    """MDLM's loss; a self-conditioned model's (soft inputs) through `SelfConditioned` at the run's rate."""
    predict = conditioned(model, run.cfg.soft_k, run.tc.self_cond_rate, generator)
    return diffusion.mdlm_loss(predict, x, t, run.cfg.mask_id, run.tc.schedule, noise=noise)


def nll_batch(model, x, ev: EvalContext) -> dict:
    return diffusion.nll_bound(conditioned(model, model.cfg.soft_k), x, ev.pad_id, ev.mask_id, n_t=ev.n_t, schedule=ev.schedule,
                               generator=ev.generator)


def eval_extra(run) -> dict:
    return {}


def export(model, tokenizer, ckpt: dict, out_dir, options: ExportOptions):
    from train_host.canvas_export import export_canvas_bundle


    return export_canvas_bundle(model, tokenizer, ckpt, out_dir, options)
