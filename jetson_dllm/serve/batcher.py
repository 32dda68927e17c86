"""Batched denoising: one runner, one worker thread, and every request's sampler stepping in the same network calls.

Each request is a sampler generator (`sampler.sample_steps`): it yields the canvas it needs evaluated and is sent
the top-K outputs back. The worker stacks the pending canvases of the same length on the batch axis, runs the
network once, and hands each request its rows; a request with `n` samples is `n` rows. Requests keep their own
prompt, seed, strategy, step budget and stopping point, join between steps and leave when done. The queue is
bounded (a full queue is the caller's 429); a cancelled or timed-out request frees its rows at the next step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.runners import ENTROPY
from jetson_dllm.sampler import SamplerConfig, SampleResult, SpecialIds, Step, sample_steps


class QueueFull(Exception):
    """The server is at capacity; retry later."""


@dataclass
class Job:
    """One request: its rows, its sampler settings, and where its events go."""

    tokens: np.ndarray  # (n, T) int32
    fixed: np.ndarray  # (n, T) bool
    cfg: SamplerConfig
    special: SpecialIds
    emit: Callable[[str, object], None]  # ("step", (canvas, Step)) per step, ("done", SampleResult) or ("error", message) once
    timeout_s: float = 120.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    steps: object = None  # the sampler generator, once admitted
    pending: np.ndarray | None = None  # the canvas it waits to have evaluated

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]


class Batcher:
    """The worker: admits jobs up to `max_batch` rows, and runs one network call per step for each canvas length."""

    def __init__(self, runner, max_batch: int = 16, max_queue: int = 64, batching: bool = True, observe=None):
        self.runner, self.max_batch, self.batching = runner, max_batch, batching
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.active: list[Job] = []
        self.observe = observe or (lambda **kw: None)  # metrics: batch_rows, step_seconds, evaluations
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dllm-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if job.rows > self.max_batch:
            raise ValueError(f"n={job.rows} is more rows than --max-batch {self.max_batch}")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def depth(self) -> int:
        return self.waiting.qsize()

    def stop(self, drain_s: float = 30.0) -> None:
        """Finish what is admitted or waiting (up to `drain_s`), then stop the worker."""
        deadline = time.monotonic() + drain_s
        while (self.active or not self.waiting.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=5)

    # --- the worker -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._admit()
            self._drop_cancelled()
            if not self.active:
                time.sleep(0.002)
                continue
            try:
                self._step()
            except Exception as e:  # a runner failure ends the jobs in the call, never the server
                for job in list(self.active):
                    self._finish(job, "error", f"the model failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")

    def _admit(self) -> None:
        rows = sum(j.rows for j in self.active)
        limit = self.max_batch if self.batching else 1
        while not self.waiting.empty() and (not self.active or (self.batching and rows < limit)):
            job = self.waiting.queue[0]
            if self.active and rows + job.rows > limit:
                return
            self.waiting.get_nowait()
            if job.cancelled.is_set():
                continue
            job.steps = sample_steps(job.tokens, job.fixed, job.special, job.cfg, on_step=lambda c, s, j=job: j.emit("step", (c.copy(), s)))  # the sampler goes on changing c
            try:
                job.pending = next(job.steps)
            except StopIteration as done:  # nothing to generate
                job.emit("done", done.value)
                continue
            except Exception as e:
                job.emit("error", str(e))
                continue
            self.active.append(job)
            rows += job.rows

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for job in list(self.active):
            if job.cancelled.is_set():
                self._finish(job, "error", "cancelled")
            elif now - job.submitted > job.timeout_s:
                self._finish(job, "error", f"timed out after {job.timeout_s:g} s")

    def _step(self) -> None:
        """One network call for the oldest job's canvas length (and every job of that length, when batching)."""
        length = self.active[0].pending.shape[1]
        group = [j for j in self.active if j.pending.shape[1] == length] if self.batching else self.active[:1]
        stacked = np.concatenate([j.pending for j in group])
        t0 = time.perf_counter()
        out = self.runner.run("canvas", {"tokens": stacked})
        self.observe(batch_rows=len(stacked), step_seconds=time.perf_counter() - t0, evaluations=1)
        start = 0
        for job in group:
            rows = slice(start, start + job.rows)
            start += job.rows
            entropy = out.get(ENTROPY)
            outputs = (out["topk_logprobs"][rows].copy(), out["topk_ids"][rows].copy(),  # the runner reuses its buffers
                       None if entropy is None else entropy[rows].copy())
            try:
                job.pending = job.steps.send(outputs)
            except StopIteration as done:
                self._finish(job, "done", done.value)
            except Exception as e:
                self._finish(job, "error", str(e))

    def _finish(self, job: Job, kind: str, value) -> None:
        if job in self.active:
            self.active.remove(job)
        if kind != "done" and job.steps is not None:
            job.steps.close()
        job.emit(kind, value)


__all__ = ["Batcher", "Job", "QueueFull", "SampleResult", "Step"]
