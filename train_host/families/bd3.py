"""Block diffusion (BD3-LM), host side: the vectorised block loss over a clipped noise range, its NLL bound, and the
block-step, commit and commit-step graphs' export."""

from __future__ import annotations

from train_host.bd3 import bd3_loss, bd3_nll_bound
from train_host.families import EvalContext, ExportOptions
from train_host.self_cond import conditioned

FIXED_RATIO_ACCURACY = False  # its bound's own accuracy; the fixed-ratio accuracies are MDLM's


def train_loss(model, x, run, t, noise, generator):
    """BD3-LM's loss; an adapted model's (the token shift) scores text only, as its parent's next-token loss did."""
    shifted = run.cfg.shift
    return bd3_loss(conditioned(model, run.cfg.soft_k, run.tc.self_cond_rate, generator), x, run.cfg.mask_id, run.cfg.block_size, run.tc.schedule, *run.t_range, generator,
                    shift_bos=run.tokenizer.bos_id if shifted else None, complementary=run.tc.complementary,
                    unscored=run.tokenizer.pad_id if shifted else None, teacher=run.teacher, distill=run.tc.distill)


def nll_batch(model, x, ev: EvalContext) -> dict:
    if model.cfg.shift and ev.bos_id is None:
        raise ValueError("evaluating a shifted block-diffusion model needs bos_id (its start token)")
    return bd3_nll_bound(conditioned(model, model.cfg.soft_k), x, ev.pad_id, ev.mask_id, model.cfg.block_size, n_t=ev.n_t, schedule=ev.schedule, generator=ev.generator,
                         shift_bos=ev.bos_id if model.cfg.shift else None)


def eval_extra(run) -> dict:
    return {"t_min": run.t_range[0], "t_max": run.t_range[1]}  # the range training drew from


def export(model, tokenizer, ckpt: dict, out_dir, options: ExportOptions):
    from train_host.bd3_export import export_bd3_bundle
    from train_host.onnx_tools import validation_canvases

    calib = None
    if "int8" in options.precisions:
        def calib(n):
            return validation_canvases(tokenizer, model.cfg.canvas_len, n, options.data_dir)
    return export_bd3_bundle(model, tokenizer, ckpt, out_dir, options.topk, options.overwrite, options.say, options.precisions,
                             calib, options.int8)
