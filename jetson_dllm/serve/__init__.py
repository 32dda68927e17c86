"""`dllm serve`: the model behind an OpenAI-compatible API, with batched denoising and a live canvas page."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.profiler import check_fits, memory_plan


def serve(model: str | Path, backend: str = "auto", precision: str = "fp32", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, max_queue: int = 64, batching: bool = True, max_body: int = 1 << 20,
          timeout_s: float = 120.0, model_name: str | None = None, threads: int = 0, log_level: str = "warning", announce=None,
          draft: str | Path | None = None, draft_steps: int | None = None) -> None:
    """Open the model (and the drafter, `draft`: speculative decoding), build the app and run it with uvicorn until
    SIGINT/SIGTERM (in-flight requests drain); `announce()` is called once the packages are there and the model is
    open, just before serving. `draft_steps`: the drafter's calls a round (None: not given, 1)."""
    try:
        import uvicorn

        from jetson_dllm.serve.app import create_app
    except ImportError:
        raise DllmError("dllm serve needs fastapi, uvicorn and prometheus-client: pip install 'jetson-dllm[serve]'") from None
    from jetson_dllm.generate import open_model

    if draft is None and draft_steps is not None:
        raise DllmError("--draft-steps is for speculative decoding: give the drafter with --draft")
    draft_steps = draft_steps or 1
    runner = open_model(model, backend=backend, precision=precision, threads=threads)
    drafter = None
    try:
        check_pool(runner.cfg, runner.precision, max_batch)
        if draft is not None:
            drafter = open_model(draft, backend=backend, precision=precision, threads=threads)
            check_pool(drafter.cfg, drafter.precision, max_batch)
        app = create_app(runner, model_name or Path(model).name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                         batching=batching, max_body=max_body, timeout_s=timeout_s, drafter=drafter, draft_steps=draft_steps)
    except BaseException:
        runner.close()
        if drafter is not None:
            drafter.close()
        raise
    # uvicorn drains on SIGTERM, then raises the signal again for whoever handled it before: that is us, and a
    # drained server exits 0 (not "killed by SIGTERM").
    if announce is not None:
        announce()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(timeout_s))
    finally:
        signal.signal(signal.SIGTERM, previous)
        runner.close()
        if drafter is not None:
            drafter.close()


def check_pool(cfg, precision: str, max_batch: int) -> None:
    """A cached family's server allocates `max_batch` rows of cache at start (its slots): refuse, before allocating,
    a pool that this machine's memory cannot hold beside the model."""
    if not family_of(cfg).cached:
        return
    plan = memory_plan(cfg, precision, max_batch, cfg.canvas_len, device=False)
    check_fits(plan["kv_cache"] + plan["activations"] + plan["io"],
               f"a cache pool of --max-batch {max_batch} rows of {cfg.canvas_len} positions", "serve with a smaller --max-batch")
