"""Processes and devices for training: torchrun's ranks, the device and autocast dtype, and stopping on a signal."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from jetson_dllm.errors import DllmError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DllmError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    if name != "cpu":
        raise DllmError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if device.type == "cpu":
        if name in ("bf16", "fp16"):
            raise DllmError(f"--dtype {name} is for GPUs; on the CPU training runs in fp32")
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    return threading.current_thread() is threading.main_thread()
