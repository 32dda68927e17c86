"""`dllm export`: the one pipeline from a checkpoint to a bundle. It checks the options every family shares, then
hands the model to its family's exporter (train_host/families: the canvas graph, the block graphs, the decode
graph), which writes the graphs, their FP16 and INT8 versions and a parity report of each against PyTorch."""

from __future__ import annotations

from pathlib import Path

from calibration.quantize import Int8Options
from jetson_dllm.bundle import Bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.precisions import PRECISIONS
from jetson_dllm.runners.torch_runner import DEFAULT_TOPK, MAX_TOPK
from train_host.checkpoint import load_model
from train_host.families import ExportOptions


def _check_data(data_dir: str, tokenizer, family, int8: bool) -> None:
    """--data must be the model's own (its tokenizer) and must be used: for calibration, or for the canvas graph's
    parity canvases; given to a cached family's export without --int8 it would be read by nothing."""
    from train_host.data import load_manifest

    if load_manifest(data_dir)["tokenizer_sha256"] != tokenizer.sha256:
        raise DllmError(f"{data_dir} was tokenized with another tokenizer than the model's; give the data it was trained on")
    if not int8 and "canvas" not in family.graphs:
        raise DllmError(f"--data is read only by --int8 calibration for the {family.title} (its parity runs on its own "
                        "inputs); add --int8 or leave --data out")


def export_bundle(
    checkpoint: str | Path,
    out_dir: str | Path,
    precisions: tuple[str, ...] = ("fp32", "fp16"),
    topk: int = DEFAULT_TOPK,
    data_dir: str | None = None,
    parity_canvases: int = 16,
    overwrite: bool = False,
    int8: Int8Options | None = None,
    progress=None,
    calibration_given: frozenset[str] = frozenset(),
) -> Bundle:
    """Export a checkpoint to a bundle; fails (writing nothing) if FP32 parity with PyTorch is broken.
    `calibration_given`: the INT8 calibration options the user gave (a family whose INT8 calibrates nothing refuses
    them)."""
    say = progress or (lambda msg: None)
    unknown = set(precisions) - {p.name for p in PRECISIONS.values() if p.exported}
    if unknown:
        raise DllmError(f"unknown precision {sorted(unknown)}; choose from fp32, fp16, int8")
    if parity_canvases < 1:
        raise DllmError(f"--parity-canvases must be positive, got {parity_canvases}")
    int8 = int8 or Int8Options()
    model, tokenizer, ckpt = load_model(checkpoint)
    cfg = model.cfg
    if "int8" in precisions:
        int8.validate(cfg.canvas_len)
    if not 1 <= topk <= min(MAX_TOPK, cfg.vocab_size - 1):  # every family's sampling head, before anything is exported
        raise DllmError(f"--topk must be in 1..{min(MAX_TOPK, cfg.vocab_size - 1)} (TensorRT's TopK takes K < 3840, and fewer than the vocabulary), got {topk}")
    family = family_of(cfg)
    if "int8" in precisions and not family.int8:
        raise DllmError(f"the {family.title} exports FP32 and FP16 graphs only; drop --int8")
    if "int8" in precisions and family.int8 == "dynamic" and (calibration_given or data_dir is not None):
        given = f"--{sorted(calibration_given)[0].replace('_', '-')}" if calibration_given else "--data"
        raise DllmError(f"the {family.title}'s INT8 is dynamic (INT8 weights, activations quantized as the graph runs on "
                        f"onnxruntime's CPU provider): nothing is calibrated, so {given} would be read by nothing; drop it")
    if data_dir is not None:
        _check_data(data_dir, tokenizer, family, "int8" in precisions)
    if "int8" in precisions and int8.extra_file:  # read before minutes of export, not after
        from calibration.data import load_recorded

        if family.mixture:
            raise DllmError(f"--calib-file holds canvases without the clean text the {family.title}'s calibration noises "
                            "into candidates; calibrate it on --data (its validation split) instead")
        load_recorded(int8.extra_file, tokenizer.sha256, cfg.vocab_size, cfg.canvas_len)
    options = ExportOptions(tuple(precisions), topk, data_dir, parity_canvases, overwrite, int8, say)
    return family.host_module().export(model, tokenizer, ckpt, out_dir, options)


def check_int8_budget(calibration: dict | None, options: Int8Options) -> None:
    """After an export: an INT8 model over its accuracy budget is an error unless it was accepted."""
    c = calibration
    if c and not c["within_budget"] and not options.allow_over_budget:
        raise DllmError(f"INT8 loses {c['accuracy_drop_points']:.2f} points of masked-token accuracy, over the {options.budget:g}-point budget, "
                        f"even with {len(c['excluded'])} layers kept in FP32; the best INT8 model is in the bundle: accept it with "
                        "--allow-over-budget, or raise --int8-budget")
