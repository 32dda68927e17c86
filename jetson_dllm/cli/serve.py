"""`dllm serve`: the model behind an OpenAI-compatible HTTP API and a live canvas page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from jetson_dllm.cli.common import app, err, given_options


@app.command()
def serve(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="bundle (onnx, trt) or training run / checkpoint (torch)")],
    backend: Annotated[str, typer.Option(help="auto | onnx | trt | torch (auto: onnx for a bundle, torch for a checkpoint)")] = "auto",
    precision: Annotated[str, typer.Option(help="bundle precision: fp32 | fp16 | int8 | int8-dynamic")] = "fp32",
    host: Annotated[str, typer.Option(help="address to bind; 127.0.0.1 keeps it on this machine")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="require Authorization: Bearer KEY (or set DLLM_API_KEY)", envvar="DLLM_API_KEY")] = None,
    max_batch: Annotated[int, typer.Option(help="rows in one network call, the cache slots of a BD3/AR model, and the cap on n", min=1, max=256)] = 16,
    max_queue: Annotated[int, typer.Option(help="requests that may wait; more get 429 with Retry-After", min=1, max=10000)] = 64,
    batching: Annotated[bool, typer.Option("--batching/--no-batching", help="requests share network calls (off: one request per call)")] = True,
    max_body: Annotated[int, typer.Option(help="largest request body, bytes", min=1024)] = 1 << 20,
    timeout: Annotated[float, typer.Option(help="per-request limit, seconds", min=1)] = 120.0,
    model_name: Annotated[Optional[str], typer.Option(help="the model's name in the API (default: the folder's name)")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = the physical cores this process may use (docs/running.md#threads)", min=0, max=1024)] = 0,
    draft: Annotated[Optional[Path], typer.Option(help="speculative decoding: a block-diffusion drafter with this AR parent's tokenizer proposes, the parent verifies (one sample per request)")] = None,
    draft_steps: Annotated[int, typer.Option(help="--draft: the drafter's denoising calls a round (1..its block)", min=1, max=16384)] = 1,
) -> None:
    """Serve any model (MDLM, block diffusion, AR) over an OpenAI-compatible API (completions, chat, streaming, suffix
    infilling where the family can) with continuous batching and a live page at /.

    Examples:
      dllm serve runs/bundle                                   (http://127.0.0.1:8000, the page at /)
      dllm serve runs/bundle --backend trt --precision fp16    (on the Jetson)
      curl http://127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d '{"prompt": "Once upon a time", "max_tokens": 48}'
    """
    from jetson_dllm.serve import serve as run_server

    run_server(model, backend=backend, precision=precision, host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
               batching=batching, max_body=max_body, timeout_s=timeout, model_name=model_name, threads=threads, draft=draft,
               draft_steps=draft_steps if "draft_steps" in given_options(ctx) else None,
               announce=lambda: err.print(f"serving {model} at http://{host}:{port} (page at /, API at /v1); Ctrl-C or SIGTERM drains and stops"))
