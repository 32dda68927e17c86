"""Device verbs (they run on the Jetson too, without torch): `configs`, `inspect`, `build`, `bench`, `profile`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from jetson_dllm.bench import run_sweep
from jetson_dllm.cli.common import Bar, app, err, given_options, int_list, names, out, working
from jetson_dllm.config import SIZES
from jetson_dllm.engine import bundle_report
from jetson_dllm.engine_build import build_engines
from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import memory_rows
from jetson_dllm.speculative_bench import points_table, run_bench
from jetson_dllm.tables import bench_summary, bench_tables, bundle_tables, configs_table, profile_table


@app.command()
def configs(
    vocab_size: Annotated[int, typer.Option(help="vocabulary size to count the embedding with", min=16, max=65536)] = 8192,
    canvas_len: Annotated[int, typer.Option(help="canvas length (does not change the parameter count)", min=8, max=16384)] = 256,
) -> None:
    """Print the model sizes tiny -> xxlarge: parameters and weight size per precision.

    Example: dllm configs --vocab-size 8192
    """
    out.print(configs_table(vocab_size, canvas_len))
    out.print("int8: matmul weights in INT8, embedding and norms in FP16 (what `dllm export --int8` writes).")


@app.command()
def inspect(
    bundle_dir: Annotated[Path, typer.Argument(help="bundle folder")],
    json_out: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
) -> None:
    """What a bundle holds: model, precisions, file hashes, parity, calibration, and which engines fit this device.

    Example: dllm inspect runs/bundle
    """
    report = bundle_report(bundle_dir)
    if json_out:
        out.print_json(json.dumps({k: report[k] for k in ("bundle", "model", "precisions", "files", "engines", "canvas_lengths")}))
    else:
        for item in bundle_tables(report):
            out.print(item)
    if report["bad"]:
        raise DllmError(f"{len(report['bad'])} file(s) of {bundle_dir} are missing or altered: {', '.join(report['bad'])}; "
                        "copy the bundle again or re-export it")
    if report["graphs"]:  # a graph that contradicts the manifest (None: all agree; "": no onnxruntime here to look)
        raise DllmError(report["graphs"])


@app.command()
def build(
    bundle_dir: Annotated[Path, typer.Argument(help="bundle folder (copied from the host)")],
    precision: Annotated[str, typer.Option(help="fp16 | int8 | fp32")] = "fp16",
    canvas: Annotated[str, typer.Option(help="canvas lengths, comma-separated; one engine each (a block-diffusion bundle: not used, its two engines per batch span the whole cache)")] = "128",
    batch: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1",
    opt_level: Annotated[int, typer.Option(help="TensorRT builder optimization level 0-5 (higher: slower build, maybe faster engine)", min=0, max=5)] = 3,
) -> None:
    """Build TensorRT engines for a bundle on this device (engines are not portable: build where you run).

    Example: dllm build runs/bundle --precision fp16 --canvas 128,256 --batch 1
    """
    with Bar() as progress:
        engines = build_engines(bundle_dir, precision=precision, canvases=int_list(canvas, "--canvas"), batches=int_list(batch, "--batch"),
                                opt_level=opt_level, progress=progress)
    for e in engines:
        out.print(f"built {e['path'].name} ({e['path'].stat().st_size / 2**20:.1f} MiB) for {e['device']}, TensorRT {e['trt_version']}"
                  if e["built"] else f"{e['path'].name}: already built for this device")


def configs_of(text: str) -> list[str]:
    """--config tiny,small,... or all."""
    chosen = list(SIZES) if text.strip() == "all" else names(text)
    for n in chosen:
        if n not in SIZES:
            raise DllmError(f"unknown config {n!r}; choose from {', '.join(SIZES)} or all")
    return chosen


@app.command()
def bench(
    ctx: typer.Context,
    models: Annotated[Optional[list[Path]], typer.Argument(help="bundles (onnx, trt) or checkpoints (torch) to measure", show_default=False)] = None,
    config: Annotated[str, typer.Option(help="configs with random weights: tiny,small,... or all (latency does not depend on weights)")] = "",
    backend: Annotated[str, typer.Option(help="torch,onnx,trt")] = "onnx",
    precision: Annotated[str, typer.Option(help="fp32,fp16,int8,int8-dynamic (each backend takes what it supports)")] = "fp32",
    steps: Annotated[str, typer.Option(help="denoising steps to sweep")] = "8,16,32,64,128",
    canvas: Annotated[str, typer.Option(help="canvas lengths")] = "256",
    batch: Annotated[str, typer.Option(help="batch sizes")] = "1",
    strategy: Annotated[str, typer.Option(help="sampler strategies")] = "confidence",
    repeats: Annotated[int, typer.Option(help="measured generations per point (after warm-up)", min=1)] = 3,
    warmup: Annotated[int, typer.Option(help="unmeasured generations per point first", min=0)] = 1,
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = the physical cores this process may use (docs/running.md#threads)", min=0, max=1024)] = 0,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for bench.csv / .json / .md and latency_vs_steps.png")] = Path("runs/bench"),
    isolate: Annotated[bool, typer.Option("--isolate/--no-isolate", help="one worker process per model/backend/precision (clean memory numbers)")] = True,
    quality: Annotated[bool, typer.Option("--quality", help="add quality columns: generative perplexity (--judge), repetition, distinct-2")] = False,
    judge: Annotated[Optional[Path], typer.Option(help="--quality: autoregressive checkpoint that scores the samples")] = None,
    quality_samples: Annotated[int, typer.Option(help="--quality: samples per point", min=1)] = 8,
    draft: Annotated[Optional[Path], typer.Option(help="speculative decoding: bench the one AR parent given alone and with this drafter (docs/speculative.md)")] = None,
    draft_steps: Annotated[str, typer.Option(help="--draft: the drafter's calls a round to sweep")] = "1,2",
) -> None:
    """Latency vs steps, memory and power across configs, backends and precisions.

    Examples:
      dllm bench --config tiny,small --backend torch,onnx --precision fp32,int8 --steps 8,16,32,64,128
      dllm bench runs/bundle --backend trt --precision fp16,int8 --canvas 128,256      (on the Jetson)
    """
    t0 = time.time()
    if draft is not None or "draft_steps" in given_options(ctx):  # speculative decoding: the parent alone and with its drafter
        return out.print(points_table(*run_bench(models, draft, int_list(draft_steps, "--draft-steps"), int_list(canvas, "--canvas"),
                                                 given_options(ctx), backend, precision, threads, repeats, warmup, out_dir)))
    with working("measuring") as status:
        results, env, paths = run_sweep(
            [str(m) for m in (models or [])] + (configs_of(config) if config else []), backends=names(backend), precisions=names(precision),
            steps=int_list(steps, "--steps"), canvases=int_list(canvas, "--canvas"), batches=int_list(batch, "--batch"),
            strategies=names(strategy), repeats=repeats, warmup=warmup, threads=threads, out_dir=out_dir, isolate=isolate,
            quality=quality, judge=_judge(judge, quality), quality_samples=quality_samples,
            progress=lambda i, n, g: status.update(f"[{i + 1}/{n}] {g.model} {g.backend} {g.precision}" if g else "done"))
    for table in bench_tables(results, env, repeats, str(judge) if judge else None):
        out.print(table)
    out.print(bench_summary(results, repeats, time.time() - t0, paths))


def _judge(path: Path | None, quality: bool):
    """The judge of --quality as a callable: the one host piece a bench can use (it needs torch)."""
    if path is not None and not quality:
        raise DllmError("--judge scores samples for the quality columns: add --quality")
    if path is None:
        return None
    try:
        from train_host.judge import perplexity_fn
    except ImportError:
        raise DllmError("--judge needs torch (the judge is a PyTorch checkpoint): pip install 'jetson-dllm[train]'") from None
    return perplexity_fn(path, warn=lambda note: err.print(f"[yellow]warning: {note}[/]"))


@app.command()
def profile(
    bundle_dir: Annotated[Optional[Path], typer.Argument(help="bundle to profile (its config and precisions)", show_default=False)] = None,
    config: Annotated[str, typer.Option(help="configs instead of a bundle: tiny,small,... or all")] = "",
    precision: Annotated[str, typer.Option(help="precisions to consider")] = "fp32,fp16,int8",
    canvas: Annotated[int, typer.Option(help="canvas length", min=1, max=16384)] = 256,
    batch: Annotated[int, typer.Option(help="batch size", min=1, max=4096)] = 1,
    measure: Annotated[bool, typer.Option(help="also measure host RSS of the onnx backend here (bundle only)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the table as JSON")] = False,
    draft: Annotated[Optional[Path], typer.Option(help="a speculative drafter's bundle: its rows and both models together beside the parent's")] = None,
) -> None:
    """Where memory goes, per config and precision, and whether it fits an Orin Nano 8GB (with headroom).

    Examples:
      dllm profile --config all --canvas 256
      dllm profile runs/bundle --measure
    """
    rows = memory_rows(str(bundle_dir) if bundle_dir else None, configs_of(config or "all") if bundle_dir is None or config else None,
                       precisions=precision, canvas=canvas, batch=batch, measure=measure, draft=str(draft) if draft else None)
    if json_out:
        out.print_json(json.dumps(rows))
    else:
        out.print(profile_table(rows, batch, canvas))
