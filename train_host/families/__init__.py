"""The host side of each model family (jetson_dllm.families names the module): its training loss, its NLL (a bound
or exact) on a batch, the extra evaluation numbers it keeps, and its export. One module per family, one interface:

    train_loss(model, x, run, t, noise, generator) -> (loss, stats)   the objective on a training batch
    nll_batch(model, x, ev: EvalContext) -> {nll, tokens, masked, correct}
    FIXED_RATIO_ACCURACY: bool      masked accuracy at fixed mask ratios is meaningful for it
    eval_extra(run) -> dict         numbers saved with each evaluation (block diffusion: its noise range)
    export(model, tokenizer, ckpt, out_dir, options: ExportOptions) -> Bundle
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EvalContext:
    """What a family's NLL needs besides the model and the batch."""

    pad_id: int
    mask_id: int
    bos_id: int | None
    n_t: int
    schedule: str
    generator: Any  # torch.Generator


@dataclass
class ExportOptions:
    """`dllm export`'s options as every family's exporter takes them."""

    precisions: tuple[str, ...]
    topk: int
    data_dir: str | None
    parity_canvases: int
    overwrite: bool
    int8: Any  # calibration.quantize.Int8Options
    say: Any  # progress callback (message) -> None
