"""CPU threads for torch and onnxruntime: how many, and how the idle ones wait.

On a machine with other work running, the libraries' defaults can collapse: torch's OpenMP threads spin at every
barrier waiting for a sibling the kernel has descheduled, and one forward pass of a small model took 1.2 s instead
of 33 ms (benchmarks/threads.py; docs/running.md#threads). What `dllm` does by default:

- OpenMP's idle threads spin briefly, then sleep: libgomp's `GOMP_SPINCOUNT=3000` (its default spins 300,000
  times), set by `dllm` before torch loads, unless the user set it or `OMP_WAIT_POLICY`. Measured against sleeping
  at once (`OMP_WAIT_POLICY=PASSIVE`): as fast as the library's default on an idle machine (passive costs 16 % there),
  no collapse beside busy processes; onnxruntime's own spinning is off (`session.intra_op.allow_spinning = 0`) unless
  `OMP_WAIT_POLICY=ACTIVE` asks for it;
- the thread count (`--threads 0`, the default) is the physical cores this process may use (shared among the
  processes of a multi-process run): with short spins, two threads beside two busy processes on two cores beat one
  on training (2,048 against 1,500 tokens/s) and on onnxruntime (51 against 69 ms), and lose a little on a torch
  forward (86 against 78 ms).

An explicit `--threads N` is taken as given; an explicit `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` too.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


QUIET = {"GOMP_SPINCOUNT": "3000"}  # what `quiet_waiting` sets (benchmarks/threads.py compares the alternatives)


def quiet_waiting() -> None:
    """Make OpenMP's idle threads sleep after a short spin, unless the user chose (OMP_WAIT_POLICY or libgomp's
    GOMP_SPINCOUNT set); a no-op once torch has loaded."""
    if WAIT_POLICY not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ.update(QUIET)


def spinning() -> bool:
    """Whether idle threads should spin: only when the user asked for it (OMP_WAIT_POLICY=ACTIVE)."""
    return os.environ.get(WAIT_POLICY, "").strip().upper() == "ACTIVE"


def usable_cores() -> int:
    """Physical cores this process may run on (its CPU affinity, then hyper-threads halved as psutil counts them)."""
    logical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = logical
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(allowed, physical * allowed // logical if logical else allowed))


def auto_threads(processes: int = 1) -> int:
    """Threads per process for `--threads 0`: the usable cores shared by `processes`, at least one.

    Not fewer when the machine is busy: one thread lost more than it won there (benchmarks/threads.py), and the load
    average would lag by a minute (our own last run counts)."""
    return max(1, usable_cores() // max(1, processes))


def resolve(threads: int, processes: int = 1) -> int:
    """The thread count to use: the user's, or `auto_threads`."""
    return threads if threads > 0 else auto_threads(processes)
