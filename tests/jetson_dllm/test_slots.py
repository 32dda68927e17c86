"""Per-request cache slots and per-row positions: requests of a cached family (block diffusion, AR) at different
positions share network calls through the batcher, and each gets exactly what it gets alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.calls import drive
from jetson_dllm.runners.loaders import open_runner
from jetson_dllm.sampler import SamplerConfig

PROMPTS = ["Once upon a time", "", "Tom and Sue went to the park to play with the big red ball and"]


class _Counted:
    """A runner that counts its network calls."""

    def __init__(self, runner):
        self.runner, self.calls, self.positions = runner, 0, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def run(self, graph, feeds, outputs=None):
        self.calls += 1
        if "valid_len" in feeds:
            self.positions.append(sorted(set(np.atleast_1d(feeds["valid_len"]).tolist())))
        return self.runner.run(graph, feeds, outputs)


def _alone(runner, prompt: str, max_tokens: int, n: int, sampler: SamplerConfig) -> tuple[np.ndarray, int]:
    """The request's tokens generated on its own, and its network calls."""
    module = __import__(f"jetson_dllm.families.{runner.cfg.family}", fromlist=["serve_calls"])
    served, counted = module.serve_calls(runner, prompt, None, max_tokens, n, sampler), _Counted(runner)
    return drive(counted, served.calls).tokens, counted.calls


def _batched(runner, requests: list[tuple[str, int, int]], sampler: SamplerConfig, max_batch: int = 8):
    """Every request through one batcher at once: (tokens per request, (graph, rows) of each network call, slots left
    in use, calls before the others joined); the first is generating when the others join, and some call must have
    had rows at different positions."""
    from jetson_dllm.serve.batcher import Batcher, Job

    module = __import__(f"jetson_dllm.families.{runner.cfg.family}", fromlist=["serve_calls"])
    calls, runner = [], _Counted(runner)
    batcher = Batcher(runner, max_batch=max_batch, observe=lambda **kw: calls.append((kw["graph"], kw["batch_rows"])))
    done, events = {}, threading.Event()

    def emit(i):
        def on(kind, value):
            if kind in ("done", "error"):
                done[i] = value
                if len(done) == len(requests):
                    events.set()
        return on

    jobs = [Job(module.serve_calls(runner, prompt, None, max_tokens, n, sampler), n, emit(i)) for i, (prompt, max_tokens, n) in enumerate(requests)]
    batcher.submit(jobs[0])
    batcher.start()
    deadline = time.monotonic() + 60
    while len(calls) < 3 and time.monotonic() < deadline:  # the others join while the first is generating
        time.sleep(0.001)
    joined = len(calls)
    for job in jobs[1:]:
        batcher.submit(job)
    assert events.wait(120), "the batcher did not finish"
    batcher.stop(drain_s=1)
    assert any(len(p) > 1 for p in runner.positions)  # rows at different positions in one call
    return [done[i] for i in range(len(requests))], calls, batcher.slots_in_use(), joined


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_block_diffusion_requests_at_different_positions_share_calls_and_match_alone(backend, bd3_run, bd3_bundle):
    path = bd3_run if backend == "torch" else bd3_bundle
    sampler = SamplerConfig(steps=4, temperature=0.0, seed=3)
    requests = [(PROMPTS[0], 24, 1), (PROMPTS[1], 40, 2), (PROMPTS[2], 16, 1)]
    with open_runner(backend, path, threads=1) as runner:
        got, calls, in_use, joined = _batched(runner, requests, sampler)
    with open_runner(backend, path, threads=1) as runner:
        for (prompt, max_tokens, n), tokens in zip(requests, got):
            assert isinstance(tokens, np.ndarray), tokens  # not an error
            np.testing.assert_array_equal(tokens, _alone(runner, prompt, max_tokens, n, sampler)[0])
    steps = [rows for graph, rows in calls if graph in ("block_step", "commit_step")]
    assert max(steps) >= 3  # rows of several requests in one call
    assert {"commit", "block_step"} <= {graph for graph, _ in calls}
    assert in_use == 0  # every slot back


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_autoregressive_requests_share_decode_calls_and_match_alone(backend, ar_run, ar_bundle):
    path = ar_run if backend == "torch" else ar_bundle
    sampler = SamplerConfig(temperature=0.0, seed=1)
    requests = [(PROMPTS[0], 24, 1), (PROMPTS[2], 12, 1), (PROMPTS[1], 20, 2)]  # long enough that all three overlap after their prefills
    with open_runner(backend, path, threads=1) as runner:
        got, calls, in_use, joined = _batched(runner, requests, sampler)
    counts = []
    with open_runner(backend, path, threads=1) as runner:
        for (prompt, max_tokens, n), tokens in zip(requests, got):
            alone, count = _alone(runner, prompt, max_tokens, n, sampler)
            np.testing.assert_array_equal(tokens, alone)
            counts.append(count)
    assert max(rows for _, rows in calls) == 4 and in_use == 0
    # every decode call after the others joined shared by whoever was still generating: no more than the longest
    # alone (plus the call that may have been running as they joined), and a joining request's prompt read in one
    # verify call of its own width (a prefill stacks only with prefills of the same width)
    assert sum(1 for graph, _ in calls if graph == "verify") == len(requests)
    assert len(calls) <= joined + 1 + max(counts) + len(requests) - 1 < sum(counts)


def test_a_pool_call_writes_only_its_own_rows(bd3_bundle):
    """Slots name rows of the pool; a call on two of four rows leaves the others' caches as they were."""
    with open_runner("onnx", bd3_bundle, threads=1) as runner:
        runner.open_slots(4)
        b = runner.cfg.block_size
        tokens = np.full((2, b), 5, np.int32)
        runner.run("commit", {"tokens": tokens, "valid_len": np.array([0, 0], np.int32), "slots": np.array([3, 1], np.int32)})
        k = runner.pool.k
        assert np.abs(k[:, [1, 3], :, :b]).sum() > 0 and np.abs(k[:, [0, 2]]).sum() == 0 and np.abs(k[:, :, :, b:]).sum() == 0
        runner.run("commit", {"tokens": tokens, "valid_len": np.array([b, 0], np.int32), "slots": np.array([3, 0], np.int32)})
        assert np.abs(k[:, 3, :, b : 2 * b]).sum() > 0 and np.abs(k[:, 0, :, :b]).sum() > 0 and np.abs(k[:, 1, :, b:]).sum() == 0
        for bad, match in (({"slots": np.array([1, 1], np.int32)}, "distinct"), ({"slots": np.array([0, 4], np.int32)}, "rows of the pool"),
                           ({"valid_len": np.array([0, 1, 2], np.int32)}, "one per row")):
            with pytest.raises(DllmError, match=match):
                runner.run("commit", {"tokens": tokens, "valid_len": np.array([0, 0], np.int32), "slots": np.array([0, 1], np.int32), **bad})


def test_a_cancelled_request_frees_its_slots_at_the_next_step(bd3_bundle):
    from jetson_dllm.families import bd3
    from jetson_dllm.serve.batcher import Batcher, Job

    with open_runner("onnx", bd3_bundle, threads=1) as runner:
        batcher = Batcher(runner, max_batch=4)
        seen, ended, held = [], threading.Event(), []

        def on(kind, value):  # in the worker: at the first denoising step (1 of the block's 16) the client leaves
            seen.append(kind)
            if kind == "step" and not held:
                held.append(batcher.slots_in_use())
                job.cancelled.set()
            if kind != "step":
                ended.set()

        served = bd3.serve_calls(runner, "", None, 40, 3, SamplerConfig(steps=16, allow_end=False), on_step=lambda view, step: on("step", view))
        job = Job(served, 3, on)
        batcher.submit(job)
        batcher.start()
        assert ended.wait(30) and seen[-1] == "error" and held == [3]
        assert batcher.slots_in_use() == 0 and not batcher.active
        batcher.stop(drain_s=1)


def test_serve_refuses_a_cache_pool_this_machine_cannot_hold():
    """A cached family's server allocates --max-batch rows of the whole context at start: refused before allocating
    when the plan says it does not fit (a 2,048-token, 24-layer model at 256 rows: tens of GiB of keys and values)."""
    from jetson_dllm.config import ModelConfig
    from jetson_dllm.errors import DllmError
    from jetson_dllm.serve import check_pool

    big = ModelConfig(d_model=1024, n_head=16, n_layer=24, vocab_size=8192, canvas_len=2048, mask_id=2, family="bd3", block_size=16)
    with pytest.raises(DllmError, match="a cache pool of --max-batch 256 rows.*serve with a smaller --max-batch"):
        check_pool(big, "fp32", 256)
    check_pool(big, "fp32", 1)  # one row fits
    check_pool(ModelConfig(d_model=64, n_head=2, n_layer=2, vocab_size=512, canvas_len=64, mask_id=2), "fp32", 256)  # no cache: nothing to hold


def test_a_stream_holds_back_what_could_start_a_stop_sequence():
    from jetson_dllm.serve.text import safe_to_send

    assert safe_to_send("Hello wor", ["world"]) == "Hello "  # the next chunk may complete it
    assert safe_to_send("Hello wor", "x") == "Hello wor" and safe_to_send("abc", None) == "abc"
    assert safe_to_send("The end", ["end.", "e"]) == "The "  # the longest possible start wins
