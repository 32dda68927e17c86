"""Continuous batching: one runner, one worker thread, and every request's generation loop stepping in shared
network calls.

Each request is its family's loop as a generator of graph calls (`families.*.serve_calls`): a canvas step (MDLM), a
block step, commit or commit step (block diffusion), a decode step (AR). The worker takes the least recently
served request's pending call and every other request's pending call of the same graph and width (and canvas
length), stacks their rows, runs the network once and hands each request its rows. A cached family's request owns rows of the runner's
cache pool (`slots`, allocated once at start with `open_slots(max_batch)`) from admission to its end; rows at
different positions share a call (each row's own `valid_len`). Requests join at any step (admitted before every
call) and leave when done, cancelled (a client gone, a stop sequence met) or timed out; their slots are free at once.
A long prompt is read block by block (or in verify calls of many tokens), one call each, interleaved with the others'
steps. The queue is bounded (a full queue is the caller's 429).

With a drafter (speculative decoding, jetson_dllm.speculative), a request's loop calls two models: each call names
its model (`Call.model`), calls share a network call only with calls of the same model, and a job's slots are the
same rows of both models' pools.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.families import family_of
from jetson_dllm.families.common import Served
from jetson_dllm.runners.calls import DRAFT, MAIN, Call, runner_of
from jetson_dllm.runners.graphs import GRAPHS
from jetson_dllm.sampler import SampleResult, Step


class QueueFull(Exception):
    """The server is at capacity; retry later."""


@dataclass
class Job:
    """One request: its rows, its loop, and where its events go."""

    served: Served
    rows: int
    emit: Callable[[str, object], None]  # ("step", (view, Step | None)) per step, ("done", tokens) or ("error", message) once
    timeout_s: float = 120.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # its first network call
    slots: np.ndarray | None = None  # its rows of the cache pool (cached families)
    pending: Call | None = None  # the call it waits to have run
    last_call: int = -1  # the worker's call count when it was last served (the least recently served goes next)


class Batcher:
    """The worker: admits jobs up to `max_batch` rows, and runs one network call per step for each group of pending
    calls that can share one."""

    def __init__(self, runner, max_batch: int = 16, max_queue: int = 64, batching: bool = True, observe=None, drafter=None):
        self.runner, self.max_batch, self.batching = runner, max_batch, batching
        self.runners = {MAIN: runner, **({DRAFT: drafter} if drafter is not None else {})}
        self.cached = family_of(runner.cfg).cached
        if self.cached:
            for each in self.runners.values():
                each.open_slots(max_batch)  # the cache pools, allocated once (a drafter's rows are the verifier's)
        self.free = list(range(max_batch))  # slots not owned by a job
        self.calls = 0
        self.legacy = getattr(runner, "legacy_positions", False)  # graphs with one valid length for all rows
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.active: list[Job] = []
        self.observe = observe or (lambda **kw: None)  # metrics: batch_rows, step_seconds, evaluations, graph, wait
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

    def slots_in_use(self) -> int:
        """Pool rows owned by requests (0 for a family without a cache: its jobs take no slots)."""
        return self.max_batch - len(self.free)

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
        limit = self.max_batch if self.batching else 1
        rows = sum(j.rows for j in self.active)
        while not self.waiting.empty() and (not self.active or (self.batching and rows < limit)):
            job = self.waiting.queue[0]
            if self.active and rows + job.rows > limit:
                return
            self.waiting.get_nowait()
            if job.cancelled.is_set():
                continue
            try:
                job.pending = next(job.served.calls)
            except StopIteration as done:  # nothing to generate
                job.emit("done", done.value.tokens)
                continue
            except Exception as e:
                job.emit("error", str(e))
                continue
            if self.cached:
                job.slots, self.free = np.array(self.free[: job.rows], np.int32), self.free[job.rows :]
            self.active.append(job)
            rows += job.rows

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for job in list(self.active):
            if job.cancelled.is_set():
                self._finish(job, "error", "cancelled")
            elif now - job.submitted > job.timeout_s:
                self._finish(job, "error", f"timed out after {job.timeout_s:g} s")

    def _key(self, call: Call) -> tuple:
        """Calls that can share one network call: the same graph on the same width (a canvas length, a block);
        graphs with one valid length for every row also need the same valid length."""
        return (call.model, call.graph, call.feeds["tokens"].shape[1], int(np.max(call.feeds["valid_len"])) if self.legacy and "valid_len" in call.feeds else 0,
                call.outputs)

    def _step(self) -> None:
        """One network call for the least recently served job's pending call and (when batching) every job's that can
        share it: no kind of call (a prompt's commit, a block step, a canvas of another length) waits behind another
        for more than one call per kind pending."""
        first = min(self.active, key=lambda j: j.last_call)  # the least recently served (admission order breaks ties)
        key = self._key(first.pending)
        group = [j for j in self.active if self._key(j.pending) == key] if self.batching else [first]
        self.calls += 1
        sizes = [len(j.pending.feeds["tokens"]) for j in group]  # a guided call has two rows per sample
        call = self._stack(first.pending.graph, group)
        rows = len(call.feeds["tokens"])
        t0 = time.perf_counter()
        out = runner_of(self.runners, call).run(call.graph, call.feeds, call.outputs)
        now = time.perf_counter()
        self.observe(batch_rows=rows, step_seconds=now - t0, evaluations=1, graph=call.graph if call.model == MAIN else f"{call.model}.{call.graph}",
                     waits=[time.monotonic() - j.submitted for j in group if j.started is None])
        start = 0
        for job, size in zip(group, sizes):
            job.started, job.last_call = job.started or now, self.calls
            part = slice(start, start + size)
            start += size
            mine = {name: value[part].copy() for name, value in out.items()}  # the runner reuses its buffers
            try:
                job.pending = job.served.calls.send(mine)
            except StopIteration as done:
                self._finish(job, "done", done.value.tokens)
            except Exception as e:
                self._finish(job, "error", str(e))

    def _stack(self, graph: str, group: list[Job]) -> Call:
        """The group's pending calls as one: rows stacked; a cached graph's each row's valid length and slot."""
        per_row = [name for name in group[0].pending.feeds if name not in ("valid_len", "slots")]  # tokens, soft inputs, t, x...
        feeds = {name: np.concatenate([j.pending.feeds[name] for j in group]) for name in per_row}
        if GRAPHS[graph].cache:
            feeds["valid_len"] = np.concatenate([np.broadcast_to(np.asarray(j.pending.feeds["valid_len"], np.int32), (j.rows,)) for j in group])
            feeds["slots"] = np.concatenate([j.slots for j in group])
        return Call(graph, feeds, group[0].pending.outputs, group[0].pending.model)

    def _finish(self, job: Job, kind: str, value) -> None:
        if job in self.active:
            self.active.remove(job)
            if job.slots is not None:
                self.free.extend(int(s) for s in job.slots)
                job.slots = None
        if kind != "done":
            job.served.calls.close()
        job.emit(kind, value)


__all__ = ["Batcher", "Job", "QueueFull", "SampleResult", "Step"]
