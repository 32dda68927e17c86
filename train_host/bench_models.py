"""Random-weight models for `dllm bench --config`: a checkpoint and an exported bundle per config, cached.

Latency does not depend on the weights, so a sweep over configs needs no training. This is the host side
of the sweep (it needs torch); the runtime's bench runs it in a process of its own:

    python -m train_host.bench_models checkpoint|bundle CONFIG CANVAS_LEN PRECISIONS

prints the path of the checkpoint or bundle on its last line (`error: ...` on stderr if it cannot).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from calibration.quantize import Int8Options
from jetson_dllm.bundle import load_bundle
from jetson_dllm.config import BENCH_VOCAB, ModelConfig
from jetson_dllm.errors import DllmError
from train_host.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from train_host.corpus import stories
from train_host.data import train_tokenizer
from train_host.export import export_bundle
from train_host.networks import build_model

CACHE = Path(os.environ.get("JETSON_DLLM_CACHE", Path.home() / ".cache" / "jetson-dllm"))


def random_model_dir(name: str, canvas_len: int) -> Path:
    """A checkpoint with random weights for a named config, cached."""
    run = CACHE / "random" / f"{name}-v{BENCH_VOCAB}-c{canvas_len}"
    try:
        if list_checkpoints(run) and load_checkpoint(run):
            return run
    except DllmError:  # written by an older jetson-dllm, or damaged: our own cache, so make it again
        shutil.rmtree(run)
    tokenizer = train_tokenizer(stories(2000), vocab_size=BENCH_VOCAB)  # the built-in corpus gives ~1.2k tokens
    cfg = ModelConfig.from_name(name, vocab_size=BENCH_VOCAB, canvas_len=canvas_len, mask_id=tokenizer.mask_id)
    torch.manual_seed(0)
    save_checkpoint(run, 0, build_model(cfg), cfg, tokenizer, {"note": "random weights for benchmarks"})
    return run


def bundle_for(name: str, precisions: tuple[str, ...], canvas_len: int) -> Path:
    """The bundle of a config name with at least `precisions`, exported once from random weights, cached."""
    path = CACHE / "bundles" / f"{name}-v{BENCH_VOCAB}-c{canvas_len}"
    try:
        if all(p in load_bundle(path, verify=False).precisions for p in precisions):
            return path
    except DllmError:  # not there yet, or from an older jetson-dllm: export it (again)
        pass
    export_bundle(random_model_dir(name, canvas_len), path, precisions=precisions, parity_canvases=4, overwrite=True,
                  int8=Int8Options(n_canvases=16, eval_canvases=8, budget=100.0))
    return path


def main(argv: list[str]) -> int:
    try:
        if len(argv) != 4 or argv[0] not in ("checkpoint", "bundle"):
            raise DllmError("usage: python -m train_host.bench_models checkpoint|bundle CONFIG CANVAS_LEN PRECISIONS")
        kind, name, canvas_len, precisions = argv[0], argv[1], int(argv[2]), tuple(argv[3].split(","))
        ModelConfig.from_name(name)  # an unknown config name is refused here
        print(random_model_dir(name, canvas_len) if kind == "checkpoint" else bundle_for(name, precisions, canvas_len))
    except (DllmError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
