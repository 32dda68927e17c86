"""Launching training: here, or relaunched under torchrun with the TrainConfig as JSON (no flags re-parsed).

    torchrun --nproc_per_node N -m train_host.launch CONFIG.json [RESULT.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from jetson_dllm.errors import DllmError
from jetson_dllm.families import get_family
from jetson_dllm.generate import READABLE, UNDERTRAINED  # one rule for train and run
from train_host.train import train
from train_host.train_config import TrainConfig


def launch(tc: TrainConfig, nproc: int = 1, console=None) -> dict | None:
    """`dllm train`: train here, or with `nproc` > 1 relaunch under torchrun (one process per GPU, gloo on a
    CPU) with the config as JSON; rank 0 writes its result back as JSON. Returns rank 0's result; None on
    other ranks."""
    if nproc < 1:
        raise DllmError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1 or "WORLD_SIZE" in os.environ:
        result = train(tc, console=console)
        return result if int(os.environ.get("RANK", "0")) == 0 else None
    with tempfile.TemporaryDirectory(prefix="dllm-train-") as tmp:
        config, result = Path(tmp) / "train_config.json", Path(tmp) / "result.json"
        config.write_text(json.dumps(asdict(tc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "train_host.launch", str(config), str(result)]
        if console is not None:
            console.print(f"launching {nproc} processes: torchrun --nproc_per_node={nproc} -m train_host.launch CONFIG.json")
        code = subprocess.call(cmd)
        if not result.is_file():
            raise DllmError(f"the {nproc} training processes failed (exit {code}); see their messages above")
        return json.loads(result.read_text())




def summary(result: dict, tc: TrainConfig) -> str:
    """The line `dllm train` ends with."""
    if result["stop"] == "interrupted":
        return f"interrupted at step {result['step']}; checkpoint saved in {tc.out}. Continue with the same command and --resume."
    kind = ("val NLL", "next-token accuracy") if get_family(tc.objective).nll == "exact" else ("val NLL bound", "masked accuracy")
    nll = f"; {kind[0]} {result['val_nll']:.3f} nats/token, {kind[1]} {result['val_acc']:.3f}" if "val_nll" in result else ""
    if "val_loss" in result:  # no likelihood (SDD): its loss and the accuracy where the input hides the truth
        honest = ("accuracy with the truth hidden", "val_acc_hidden") if "val_acc_hidden" in result else ("accuracy at t = 1", "val_acc_t1")
        nll = f"; val denoising loss {result['val_loss']:.3f} nats/token, {honest[0]} {result[honest[1]]:.3f}"
    line = f"trained {result['step']} steps in {result['elapsed']:.0f}s ({result['stop']}){nll}; checkpoints in {tc.out}/checkpoints"
    baseline = result.get("unigram_nll")
    if baseline is not None and "val_nll" in result and result["val_nll"] > READABLE * baseline:
        more = max(tc.steps, 4 * result["step"])
        minutes = (more - result["step"]) * result["elapsed"] / max(result["step"], 1) / 60
        where = ("is not clearly below the" if result["val_nll"] > UNDERTRAINED * baseline
                 else f"is above about {READABLE * baseline:.2f}, where text starts to read like the data, against the")
        line += (f"\nthe model is undertrained: {kind[0]} {result['val_nll']:.2f} {where} {baseline:.2f} of knowing only word "
                 f"frequencies, so its text will not read like the data yet. Train longer: add --resume --steps {more} (without "
                 f"--time-budget; about {minutes:.0f} more minutes at this run's speed), or a longer --time-budget.")
    return line


def main(argv: list[str]) -> int:
    """The torchrun entry: train from CONFIG.json; rank 0 writes its result to RESULT.json."""
    from rich.console import Console

    try:
        result = train(TrainConfig.from_json(argv[0]), console=Console(stderr=True))
    except DllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0 and len(argv) > 1:
        Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node N -m train_host.launch CONFIG.json RESULT.json
    sys.exit(main(sys.argv[1:]))
