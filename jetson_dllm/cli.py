"""The `dllm` command: each verb parses its options, calls one library function, and prints the result.

Heavy libraries (torch, onnxruntime, tensorrt, pycuda) are imported inside the verbs that need them, so
`dllm --help` works on a Jetson without torch.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from jetson_dllm.backends import SAMPLING_OUTPUTS
from jetson_dllm.errors import DllmError

app = typer.Typer(
    name="dllm",
    help="Train masked-diffusion language models on a desktop and run them fast on a Jetson.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
# Results go to stdout, progress and notes to stderr; piped output gets room for wide tables.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "5m", "1h30m"."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise DllmError(f"cannot read the duration {text!r}; write it like 90s, 20m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DllmError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise DllmError(f"{what} must be positive integers, got {text!r}")
    return values


# --- configs ------------------------------------------------------------------------------------------


@app.command()
def configs(
    vocab_size: Annotated[int, typer.Option(help="vocabulary size to count the embedding with")] = 8192,
    canvas_len: Annotated[int, typer.Option(help="canvas length (does not change the parameter count)")] = 256,
) -> None:
    """Print the model sizes tiny -> xxlarge: parameters and weight size per precision.

    Example: dllm configs --vocab-size 8192
    """
    from rich.table import Table

    from jetson_dllm.config import SIZES, ModelConfig

    table = Table(title=f"model configs (vocabulary {vocab_size:,}, tied embedding)")
    for col in ("config", "d_model", "heads", "layers", "d_ff", "params", "non-embedding", "fp32", "fp16", "int8"):
        table.add_column(col, justify="right" if col != "config" else "left")
    for name in SIZES:
        cfg = ModelConfig.from_name(name, vocab_size=vocab_size, canvas_len=canvas_len)
        mib = {p: f"{cfg.weight_bytes(p) / 2**20:,.1f} MiB" for p in ("fp32", "fp16", "int8")}
        table.add_row(name, str(cfg.d_model), str(cfg.n_head), str(cfg.n_layer), str(cfg.d_ff),
                      f"{cfg.num_params() / 1e6:.2f} M", f"{cfg.num_params(include_embedding=False) / 1e6:.2f} M",
                      mib["fp32"], mib["fp16"], mib["int8"])
    out.print(table)
    out.print("int8: matmul weights in INT8, embedding and norms in FP16 (what `dllm export --int8` writes).")


# --- data ---------------------------------------------------------------------------------------------


@app.command()
def data(
    sources: Annotated[Optional[list[str]], typer.Argument(help="text files (.txt, .jsonl, .parquet), hf:NAME, or nothing for the built-in corpus", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder to write the tokenizer and token shards to")] = Path("runs/data"),
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size, special tokens included")] = 8192,
    fmt: Annotated[str, typer.Option("--format", help="auto | tinystories | lines | jsonl | parquet")] = "auto",
    text_field: Annotated[str, typer.Option(help="field holding the text in JSONL / parquet / HF data")] = "text",
    val_fraction: Annotated[float, typer.Option(help="share of documents held out for validation")] = 0.01,
    builtin_stories: Annotated[int, typer.Option(help="stories to generate for the built-in corpus")] = 20000,
    seed: Annotated[int, typer.Option(help="seed of the built-in corpus")] = 0,
    tokenizer_docs: Annotated[int, typer.Option(help="documents the tokenizer is trained on")] = 200_000,
    tokenizer: Annotated[Optional[Path], typer.Option(help="reuse this tokenizer.json instead of training one")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing data folder")] = False,
) -> None:
    """Prepare training data: train a byte-level BPE tokenizer and write uint16 token shards.

    Examples:
      dllm data -o runs/data                                   (built-in stories, no download)
      dllm data TinyStories-train.txt -o runs/ts               (stories separated by <|endoftext|>)
      dllm data hf:roneneldan/TinyStories -o runs/ts           (needs `datasets` and the network)
    """
    from train_host.data import Source, prepare_data

    specs = sources or ["builtin"]
    srcs = [Source(s, fmt=fmt, text_field=text_field, builtin_stories=builtin_stories, seed=seed) for s in specs]
    with _bar("data") as progress:
        manifest = prepare_data(srcs, out_dir, vocab_size=vocab_size, val_fraction=val_fraction,
                                tokenizer_docs=tokenizer_docs, tokenizer_path=tokenizer, overwrite=overwrite, progress=progress)
    sp = manifest["splits"]
    out.print(f"wrote {out_dir}: vocabulary {manifest['vocab_size']:,}; train {sp['train']['docs']:,} docs / "
              f"{sp['train']['tokens']:,} tokens; val {sp['val']['docs']:,} docs / {sp['val']['tokens']:,} tokens")


class _bar:
    """A rich progress bar fed by progress(phase, done, total) callbacks; silent when not a terminal."""

    def __init__(self, name: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), console=err, disable=not err.is_terminal)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def __call__(self, phase: str, done: float, total: float | None) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


# --- train --------------------------------------------------------------------------------------------


@app.command()
def train(
    data_dir: Annotated[Path, typer.Option("--data", help="folder written by `dllm data`")] = Path("runs/data"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="run folder: checkpoints, metrics, curves")] = Path("runs/tiny"),
    config: Annotated[str, typer.Option(help="tiny | small | medium | large | xlarge | xxlarge")] = "tiny",
    objective: Annotated[str, typer.Option(help="mdlm (masked diffusion) | ar (the autoregressive baseline, same network with a causal mask)")] = "mdlm",
    canvas_len: Annotated[int, typer.Option(help="canvas length (tokens per training example)")] = 128,
    batch_size: Annotated[int, typer.Option(help="canvases per optimizer step, all processes together")] = 32,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    steps: Annotated[int, typer.Option(help="optimizer steps (the cosine schedule spans them)")] = 1000,
    time_budget: Annotated[str, typer.Option(help="stop after this long, e.g. 5m or 1h30m; the schedule follows the clock")] = "0",
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 1e-3,
    min_lr_ratio: Annotated[float, typer.Option(help="the cosine decays to lr x this")] = 0.1,
    warmup: Annotated[int, typer.Option(help="warmup steps")] = 50,
    weight_decay: Annotated[float, typer.Option()] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="gradient norm clip; 0 = off")] = 1.0,
    schedule: Annotated[str, typer.Option(help="noise schedule: loglinear | cosine")] = "loglinear",
    ema: Annotated[float, typer.Option(help="EMA decay of the weights, e.g. 0.999; 0 = off")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="evaluate and checkpoint every N steps")] = 100,
    eval_canvases: Annotated[int, typer.Option(help="validation canvases per evaluation")] = 128,
    keep_last: Annotated[int, typer.Option(help="checkpoints kept besides the best")] = 3,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast on GPU; CPU is fp32)")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads per process; 0 = cores / processes")] = 0,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model")] = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue the run in --out from its last checkpoint")] = False,
    pause_after: Annotated[int, typer.Option(help="stop with a checkpoint after N steps of this invocation (continue with --resume)")] = 0,
    nproc: Annotated[int, typer.Option(help="processes (GPUs) on this machine, launched through torchrun")] = 1,
    d_model: Annotated[int, typer.Option(help="override the config's width (custom size)", hidden=True)] = 0,
    n_layer: Annotated[int, typer.Option(hidden=True)] = 0,
    n_head: Annotated[int, typer.Option(hidden=True)] = 0,
    log_every: Annotated[int, typer.Option(hidden=True)] = 10,
) -> None:
    """Train a masked-diffusion LM (MDLM objective) on prepared data; resumable, with progress and curves.

    Examples:
      dllm train --data runs/data --out runs/tiny --steps 300
      dllm train --data runs/ts --out runs/ts-tiny --time-budget 20m
      dllm train --out runs/ts-tiny --resume ...                (same flags: continues exactly)
      dllm train --nproc 2 ...                                  (torchrun DDP; or torchrun -m train_host.train)
    """
    from train_host.train import TrainConfig
    from train_host.train import train as train_run

    tc = TrainConfig(
        data=str(data_dir), out=str(out_dir), config=config, objective=objective, d_model=d_model, n_layer=n_layer, n_head=n_head,
        canvas_len=canvas_len, batch_size=batch_size, grad_accum=grad_accum, steps=steps,
        time_budget=parse_duration(time_budget), lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
        schedule=schedule, ema=ema, eval_every=eval_every, eval_canvases=eval_canvases, keep_last=keep_last,
        log_every=log_every, seed=seed, device=device, dtype=dtype, threads=threads, compile=compile, resume=resume,
        pause_after=pause_after,
    )
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_torchrun(nproc, tc)
        return
    result = train_run(tc, console=err)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result["stop"] == "interrupted":
        out.print(f"interrupted at step {result['step']}; checkpoint saved in {out_dir}. Continue with the same command and --resume.")
        raise typer.Exit(130 if result.get("signal") == 2 else 143)
    kind = ("val NLL", "next-token accuracy") if objective == "ar" else ("val NLL bound", "masked accuracy")
    nll = f"; {kind[0]} {result['val_nll']:.3f} nats/token, {kind[1]} {result['val_acc']:.3f}" if "val_nll" in result else ""
    out.print(f"trained {result['step']} steps in {result['elapsed']:.0f}s ({result['stop']}){nll}; checkpoints in {out_dir}/checkpoints")


def _relaunch_torchrun(nproc: int, tc) -> None:
    """Run the same training under torchrun: one process per GPU (or gloo processes on a CPU)."""
    import dataclasses
    import subprocess

    args = []
    for f in dataclasses.fields(tc):
        value = getattr(tc, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "train_host.train", *args]
    err.print(f"launching {nproc} processes: torchrun --nproc_per_node={nproc} -m train_host.train ...")
    raise typer.Exit(subprocess.call(cmd))


# --- eval ---------------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="run folder (its best checkpoint) or a checkpoints/step_* folder")],
    data_dir: Annotated[Path, typer.Option("--data", help="prepared data folder with a val split")] = Path("runs/data"),
    canvases: Annotated[int, typer.Option(help="validation canvases to score")] = 512,
    n_t: Annotated[int, typer.Option(help="noise levels per canvas in the ELBO estimate")] = 8,
    seed: Annotated[int, typer.Option()] = 1234,
    generate: Annotated[bool, typer.Option("--generate", help="also generate samples and judge them")] = False,
    judge: Annotated[Optional[Path], typer.Option(help="autoregressive checkpoint that scores generated text (generative perplexity)")] = None,
    samples: Annotated[int, typer.Option(help="--generate: samples (in batches of 8)")] = 16,
    prompt: Annotated[str, typer.Option(help="--generate: the prompt")] = "Once upon a time",
    steps: Annotated[int, typer.Option(help="--generate: denoising steps")] = 64,
    strategy: Annotated[str, typer.Option(help="--generate: sampler strategy")] = "confidence",
    temperature: Annotated[float, typer.Option(help="--generate: sampling temperature")] = 0.8,
    json_out: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
) -> None:
    """Score a checkpoint: NLL (a bound for diffusion, exact for the AR baseline), perplexity, accuracy;
    with --generate, judge its samples (generative perplexity under --judge, repetition, distinct-n).

    Examples:
      dllm eval runs/tiny --data runs/data
      dllm eval runs/ts-tiny --data runs/ts --generate --judge runs/ts-ar
    """
    import json

    import torch

    from train_host.checkpoint import load_model
    from train_host.data import CanvasDataset, load_manifest
    from train_host.evaluate import evaluate

    if judge is not None and not generate:
        raise DllmError("--judge scores generated text: add --generate")
    model, tokenizer, config = load_model(checkpoint)
    manifest = load_manifest(data_dir)
    if manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise DllmError(f"{data_dir} was tokenized with another tokenizer than {config['path']}; evaluate on the data the model was trained with")
    torch.set_num_threads(os.cpu_count() or 1)
    ds = CanvasDataset(data_dir, "val", model.cfg.canvas_len, tokenizer.pad_id)
    with err.status(f"scoring {min(canvases, len(ds))} validation canvases"), torch.inference_mode():
        metrics = evaluate(model, ds, model.cfg.mask_id, n_canvases=canvases, n_t=n_t, seed=seed, bos_id=tokenizer.eot_id)
    if generate:
        with err.status(f"generating {samples} samples and judging them"):
            metrics.update(_judged_samples(checkpoint, judge, data_dir, canvases, samples, prompt, steps, strategy, temperature, seed))
    if json_out:
        out.print_json(json.dumps({"checkpoint": config["path"], **metrics}))
        return
    from rich.table import Table

    table = Table(title=f"{config['path']} on {data_dir} (val, {metrics['val_tokens']:,} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if model.cfg.causal:
        table.add_row("NLL (nats/token, exact)", f"{metrics['val_nll']:.4f}")
        table.add_row("perplexity", f"{metrics['val_ppl']:.2f}")
        table.add_row("next-token accuracy", f"{metrics['val_acc']:.4f}")
    else:
        table.add_row("NLL bound (nats/token)", f"{metrics['val_nll']:.4f}")
        table.add_row("perplexity bound", f"{metrics['val_ppl']:.2f}")
        table.add_row("masked-token accuracy (ELBO noise levels)", f"{metrics['val_acc']:.4f}")
    for key in sorted(k for k in metrics if k.startswith("val_acc@")):
        table.add_row(f"masked-token accuracy at mask ratio {key.split('@')[1]}", f"{metrics[key]:.4f}")
    labels = {"judge_val_nll": "judge's exact NLL on the same validation text", "gen_ppl": "generative perplexity (judge)",
              "repetition": "repetition (repeated word 4-grams)", "distinct1": "distinct-1", "distinct2": "distinct-2",
              "gen_ms": "generation time per batch of 8 (ms)"}
    for key, label in labels.items():
        if key in metrics:
            table.add_row(label, f"{metrics[key]:.4f}" if key != "gen_ms" else f"{metrics[key]:.0f}")
    out.print(table)
    if "example" in metrics:
        out.print(f"example: {metrics['example']}", markup=False)


def _judged_samples(checkpoint, judge_path, data_dir, canvases, samples, prompt, steps, strategy, temperature, seed) -> dict:
    """Generate from a checkpoint and judge the text (and the judge's own NLL on the validation data)."""
    import time

    import torch

    from jetson_dllm.backends import open_backend
    from jetson_dllm.generate import generate
    from jetson_dllm.sampler import SamplerConfig
    from train_host.autoregressive import ar_generate
    from train_host.data import CanvasDataset, load_manifest
    from train_host.evaluate import evaluate
    from train_host.judge import Judge, sample_quality

    if samples < 1:
        raise DllmError(f"--samples must be positive, got {samples}")
    be = open_backend("torch", str(checkpoint))
    tok = be.tokenizer
    prompt_ids = tok.encode(prompt)
    texts, seconds = [], []
    for i in range(0, samples, 8):
        n = min(8, samples - i)
        t0 = time.perf_counter()
        if be.cfg.causal:
            result = ar_generate(be.model, prompt_ids, be.cfg.canvas_len - len(prompt_ids), tok.eot_id, tok.eot_id,
                                 tok.pad_id, num_samples=n, temperature=temperature, seed=seed + i)
            texts += [tok.decode(r) for r in result.tokens]
        else:
            cfg = SamplerConfig(steps=steps, strategy=strategy, temperature=temperature, seed=seed + i)
            texts += generate(be, tok, prompt, num_samples=n, sampler=cfg).texts
        seconds.append(time.perf_counter() - t0)
    extra = {"gen_ms": 1e3 * sum(seconds) / len(seconds), "example": texts[0][:300]}
    judge = Judge(judge_path) if judge_path is not None else None
    extra.update(sample_quality(texts, judge))
    if judge is not None and load_manifest(data_dir)["tokenizer_sha256"] == judge.tokenizer.sha256:
        ds = CanvasDataset(data_dir, "val", judge.model.cfg.canvas_len, judge.tokenizer.pad_id)
        with torch.inference_mode():
            extra["judge_val_nll"] = evaluate(judge.model, ds, judge.model.cfg.mask_id, n_canvases=canvases, bos_id=judge.tokenizer.eot_id)["val_nll"]
    return extra


# --- run ----------------------------------------------------------------------------------------------


def read_prompt(prompt: str) -> str:
    """The prompt itself, or standard input when it is "-"."""
    if prompt != "-":
        return prompt
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError as e:
        raise DllmError(f"the prompt on standard input is not UTF-8 (bad byte at offset {e.start}); convert it first") from None


@app.command()
def run(
    model: Annotated[Path, typer.Argument(help="training run / checkpoint (torch backend) or bundle (onnx, trt)")] = Path("runs/tiny"),
    prompt: Annotated[str, typer.Option("--prompt", "-p", help='start of the text, or a template with ____ gaps / [MASK] tokens; "-" reads stdin')] = "Once upon a time",
    backend: Annotated[str, typer.Option(help="auto | torch | onnx | trt (auto: torch for a checkpoint, onnx for a bundle)")] = "auto",
    precision: Annotated[str, typer.Option(help="bundle precision: fp32 | fp16 | int8 | int8-dynamic")] = "fp32",
    steps: Annotated[int, typer.Option(help="denoising steps (network evaluations at most)")] = 64,
    length: Annotated[int, typer.Option(help="tokens to generate, rounded up to an allowed canvas; 0 = the longest canvas")] = 0,
    strategy: Annotated[str, typer.Option(help="confidence | margin | entropy | threshold | ancestral")] = "confidence",
    block: Annotated[int, typer.Option(help="semi-autoregressive block length; 0 = whole canvas")] = 0,
    threshold: Annotated[float, typer.Option(help="confidence threshold of --strategy threshold, in (0, 1]")] = 0.9,
    temperature: Annotated[float, typer.Option(help="0 = greedy (repeats itself on small models; see the README's sampler results)")] = 0.8,
    top_k: Annotated[int, typer.Option(help="sample among the k best tokens; 0 = all of the head")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass, in (0, 1]")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="samples generated together as one batch")] = 1,
    deadline_ms: Annotated[float, typer.Option(help="stop refining after this long and commit the best tokens; 0 = none")] = 0.0,
    defer_twins: Annotated[bool, typer.Option("--defer-twins/--no-defer-twins", help="neighbours picked in one step with the same token: commit one, re-predict the other (against 'play play'; see the README's sampler results)")] = True,
    gap: Annotated[int, typer.Option(help="tokens per ____ gap in an infilling template")] = 12,
    device: Annotated[str, typer.Option(help="torch backend device: cpu | cuda")] = "cpu",
    providers: Annotated[str, typer.Option(help="onnx backend providers, comma-separated (e.g. CUDAExecutionProvider)")] = "",
    json_out: Annotated[bool, typer.Option("--json", help="print text, tokens, steps, evaluations and timings as JSON")] = False,
    live: Annotated[Optional[bool], typer.Option("--live/--no-live", help="show the denoising (default: when stdout is a terminal)")] = None,
    save_canvases: Annotated[Optional[Path], typer.Option(help="save every canvas the network ran on (.npz) for INT8 calibration (dllm export --calib-file)")] = None,
) -> None:
    """Generate text with the diffusion sampler, showing the canvas denoise step by step.

    Infilling: a run of 3+ underscores is a gap of --gap tokens, each [MASK] one token, e.g.
      dllm run runs/tiny -p "Once upon a time ____ happily ever after."
    Examples:
      dllm run runs/tiny -p "Lily went to the park" --steps 32
      dllm run bundle/ --backend onnx --precision int8 -n 4 --temperature 0
      echo "Tom had a dog" | dllm run runs/tiny -p - --json
    """
    import json

    from jetson_dllm.backends import open_backend
    from jetson_dllm.generate import generate
    from jetson_dllm.sampler import SamplerConfig

    text = read_prompt(prompt)
    sampler = SamplerConfig(steps=steps, strategy=strategy, threshold=threshold, block=block, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, deadline_ms=deadline_ms, defer_twins=defer_twins)
    sampler.validate()
    kind = backend if backend != "auto" else ("onnx" if (model / "manifest.json").is_file() else "torch")
    options = {"device": device} if kind == "torch" else ({"providers": providers} if kind == "onnx" and providers else {})
    be = open_backend(kind, str(model), precision=precision, **options)
    tokenizer = be.tokenizer
    seen: list = []
    if save_canvases is not None:
        be = _Recording(be, seen)
    if getattr(be, "cfg", None) is not None and be.cfg.causal:
        _run_autoregressive(be, text, length, num_samples, sampler, json_out)
        return
    show_live = (out.is_terminal and not json_out) if live is None else live
    if show_live:
        from jetson_dllm.live import LiveCanvas

        with LiveCanvas(out, tokenizer, steps) as view:
            gen = generate(be, tokenizer, text, length=length, num_samples=num_samples, sampler=sampler, gap=gap, on_step=view)
    else:
        gen = generate(be, tokenizer, text, length=length, num_samples=num_samples, sampler=sampler, gap=gap)
    if save_canvases is not None:
        import numpy as np

        np.savez_compressed(save_canvases, tokens=np.concatenate(seen), tokenizer_sha256=tokenizer.sha256)
        err.print(f"saved {sum(len(c) for c in seen)} canvases to {save_canvases}")
    if json_out:
        out.print_json(json.dumps(gen.to_json()))
        return
    r = gen.result
    for i, t in enumerate(gen.texts):
        if num_samples > 1:
            out.print(f"[bold]--- sample {i + 1}[/]" if out.is_terminal else f"--- sample {i + 1}")
        out.print(t, markup=False)
    err.print(f"[dim]{gen.backend}: {r.steps} steps, {r.evaluations} network evaluations, canvas {gen.canvas.tokens.size}, "
              f"{r.total_s * 1e3:.0f} ms ({r.network_s * 1e3:.0f} ms network)" + (", deadline hit" if r.deadline_hit else "") + "[/]")


def _run_autoregressive(be, text: str, length: int, num_samples: int, sampler, json_out: bool) -> None:
    """`dllm run` on the autoregressive baseline: token by token with a KV cache."""
    import json

    from jetson_dllm.prompt import PLACEHOLDER
    from train_host.autoregressive import ar_generate

    if PLACEHOLDER.search(text):
        raise DllmError("an autoregressive model cannot fill gaps; use a diffusion checkpoint for infilling")
    tok = be.tokenizer
    prompt = tok.encode(text)
    max_new = length or be.cfg.canvas_len - len(prompt)
    result = ar_generate(be.model, prompt, max_new, tok.eot_id, tok.eot_id, tok.pad_id, num_samples=num_samples,
                         temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p, seed=sampler.seed)
    texts = [tok.decode(row) for row in result.tokens]
    if json_out:
        out.print_json(json.dumps({"texts": texts, "tokens": result.tokens.tolist(), "backend": "torch-ar", "new_tokens": result.new_tokens,
                                   "evaluations": result.new_tokens, "total_ms": result.seconds * 1e3}))
        return
    for i, t in enumerate(texts):
        if num_samples > 1:
            out.print(f"--- sample {i + 1}")
        out.print(t, markup=False)
    err.print(f"[dim]autoregressive: {result.new_tokens} tokens with a KV cache in {result.seconds * 1e3:.0f} ms[/]")


class _Recording:
    """A backend wrapper that keeps a copy of every canvas the network runs on."""

    def __init__(self, backend, seen: list):
        self.backend, self.seen = backend, seen

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, feeds, outputs=SAMPLING_OUTPUTS):
        self.seen.append(feeds["tokens"].copy())
        return self.backend.run(feeds, outputs)


# --- export, inspect ----------------------------------------------------------------------------------


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="run folder (its best checkpoint) or a checkpoints/step_* folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to write")] = Path("runs/bundle"),
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="also write the FP16 graph (RMSNorm, softmax, residuals in FP32)")] = True,
    int8: Annotated[bool, typer.Option("--int8", help="also calibrate and write the INT8 Q/DQ graph")] = False,
    topk: Annotated[int, typer.Option(help="K of the sampling head (top-K log-probabilities computed in the graph)")] = 64,
    data_dir: Annotated[Optional[Path], typer.Option("--data", help="the model's data folder: validation canvases for parity and calibration")] = None,
    parity_canvases: Annotated[int, typer.Option(help="validation canvases in the parity report")] = 16,
    calib_canvases: Annotated[int, typer.Option(help="INT8: calibration canvases (masked at ratios over (0, 1])")] = 64,
    calib_canvas_len: Annotated[int, typer.Option(help="INT8: calibration canvas length; 0 = the model's canvas")] = 0,
    calib_method: Annotated[str, typer.Option(help="INT8: minmax | entropy | percentile")] = "minmax",
    int8_budget: Annotated[float, typer.Option(help="INT8: allowed loss of masked-token accuracy, in points")] = 1.0,
    allow_over_budget: Annotated[bool, typer.Option(help="INT8: keep the best model even if no exclusion set meets the budget")] = False,
    calib_file: Annotated[Optional[Path], typer.Option(help="INT8: extra calibration canvases (.npy int32 [n, canvas], e.g. recorded from sampler runs)")] = None,
    seed: Annotated[int, typer.Option(help="INT8: calibration seed")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
) -> None:
    """Export a checkpoint to a bundle: ONNX (FP32, FP16, INT8 Q/DQ), tokenizer, manifest, parity report.

    Examples:
      dllm export runs/tiny -o runs/bundle                      (FP32 + FP16)
      dllm export runs/tiny -o runs/bundle --int8 --data runs/data
    """
    from train_host.export import export_bundle

    precisions = ("fp32",) + (("fp16",) if fp16 or int8 else ()) + (("int8",) if int8 else ())
    int8_options = {"n_canvases": calib_canvases, "canvas_len": calib_canvas_len, "method": calib_method, "budget": int8_budget,
                    "allow_over_budget": allow_over_budget, "extra_file": str(calib_file) if calib_file else None, "seed": seed}
    with err.status("exporting") as status:
        bundle = export_bundle(checkpoint, out_dir, precisions=precisions, topk=topk, data_dir=str(data_dir) if data_dir else None,
                               parity_canvases=parity_canvases, overwrite=overwrite, int8_options=int8_options,
                               progress=lambda msg: status.update(msg))
    out.print(parity_table(bundle.manifest))
    calibration = bundle.manifest.get("calibration")
    if calibration:
        from calibration.report import calibration_table

        out.print(calibration_table(calibration))
    out.print(f"wrote {out_dir} ({', '.join(bundle.precisions)}); copy it to the Jetson and build: dllm build {out_dir} --precision fp16")
    if calibration and not calibration["within_budget"] and not allow_over_budget:
        raise DllmError(f"INT8 loses {calibration['accuracy_drop_points']:.2f} points of masked-token accuracy, over the "
                        f"{int8_budget:g}-point budget, even with {len(calibration['excluded'])} layers kept in FP32; the best INT8 "
                        "model is in the bundle: accept it with --allow-over-budget, or raise --int8-budget")


def parity_table(manifest: dict):
    from rich.table import Table

    parity = manifest["parity"]
    table = Table(title=f"parity with PyTorch on {parity['source']} (masked positions)")
    for col in ("precision", "mask ratio", "max |logit diff|", "top-1 agreement", "NLL torch", "NLL onnx", "masked acc"):
        table.add_column(col, justify="right")
    for precision in manifest["precisions"]:
        for ratio, row in parity[precision]["by_mask_ratio"].items():
            table.add_row(precision, ratio, f"{row['max_abs_logit_diff']:.2e}", f"{row['top1_agreement']:.4f}",
                          f"{row['nll_ref']:.4f}", f"{row['nll']:.4f}", f"{row['accuracy']:.4f}")
    return table


@app.command()
def inspect(
    bundle_dir: Annotated[Path, typer.Argument(help="bundle folder")],
    json_out: Annotated[bool, typer.Option("--json", help="print the findings as JSON")] = False,
) -> None:
    """What a bundle holds: model, precisions, file hashes, parity, calibration, and which engines fit this device.

    Example: dllm inspect runs/bundle
    """
    import json

    from rich.table import Table

    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.engine import engine_status

    bundle = load_bundle(bundle_dir, verify=False)
    m, cfg = bundle.manifest, bundle.config
    hashes = bundle.verify()
    engines = engine_status(bundle)
    if json_out:
        out.print_json(json.dumps({"bundle": str(bundle_dir), "model": m["model"], "precisions": bundle.precisions,
                                   "files": hashes, "engines": engines, "canvas_lengths": bundle.canvas_lengths}))
    else:
        out.print(f"[bold]{bundle_dir}[/]: {cfg.name} model, {cfg.num_params() / 1e6:.2f} M parameters, vocabulary {cfg.vocab_size:,}, "
                  f"canvas up to {cfg.canvas_len} (shapes {', '.join(map(str, bundle.canvas_lengths))}), sampling head K={bundle.topk}, "
                  f"opset {m['opset']}, format v{m['version']}")
        table = Table(title="files")
        for col in ("file", "bytes", "sha256"):
            table.add_column(col)
        for name, state in hashes.items():
            path = bundle.path / name
            table.add_row(name, f"{path.stat().st_size:,}" if path.is_file() else "-",
                          "[green]ok[/]" if state == "ok" else f"[red]{state}[/]")
        out.print(table)
        if "parity" in m:
            out.print(parity_table(m))
        if "calibration" in m:
            from calibration.report import calibration_table

            out.print(calibration_table(m["calibration"]))
        etable = Table(title=f"engines in {bundle.engines_dir}")
        for col in ("engine", "precision", "batch x canvas", "built with", "fits this device"):
            etable.add_column(col)
        for e in engines:
            etable.add_row(e["file"], e.get("precision", "?"), f"{e.get('batch', '?')} x {e.get('canvas', '?')}",
                           f"TensorRT {e.get('trt_version', '?')} on {e.get('device_name', '?')}", e["verdict"])
        out.print(etable if engines else "no engines yet: build them on the Jetson with `dllm build`")
    bad = [n for n, s in hashes.items() if s != "ok"]
    if bad:
        raise DllmError(f"{len(bad)} file(s) of {bundle_dir} are missing or altered: {', '.join(bad)}; copy the bundle again or re-export it")


# --- build (on the Jetson) ----------------------------------------------------------------------------


@app.command()
def build(
    bundle_dir: Annotated[Path, typer.Argument(help="bundle folder (copied from the host)")],
    precision: Annotated[str, typer.Option(help="fp16 | int8 | fp32")] = "fp16",
    canvas: Annotated[str, typer.Option(help="canvas lengths, comma-separated; one engine each")] = "128",
    batch: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1",
    opt_level: Annotated[int, typer.Option(help="TensorRT builder optimization level 0-5 (higher: slower build, maybe faster engine)")] = 3,
) -> None:
    """Build TensorRT engines for a bundle on this device (engines are not portable: build where you run).

    Example: dllm build runs/bundle --precision fp16 --canvas 128,256 --batch 1
    """
    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.engine import build_engine, builder_settings, detect_device, engine_path, engine_spec

    bundle = load_bundle(bundle_dir)
    device = detect_device()
    shapes = [(b, c) for b in int_list(batch, "--batch") for c in int_list(canvas, "--canvas")]
    settings = builder_settings(precision, device.total_memory, len(bundle.manifest.get("fp32_nodes", [])), opt_level)
    specs = [engine_spec(bundle, precision, b, c) for b, c in shapes]  # validates every shape before any build
    for spec in specs:
        path = engine_path(bundle, spec, device, settings)
        if path.is_file():
            out.print(f"{path.name}: already built for this device")
            continue
        with _bar("build") as progress:
            path = build_engine(bundle, spec, device, settings, progress=progress)
        out.print(f"built {path.name} ({path.stat().st_size / 2**20:.1f} MiB) for {device.name}, TensorRT {device.trt_version}")


# --- bench, profile -----------------------------------------------------------------------------------


def _configs(text: str) -> list[str]:
    from jetson_dllm.config import SIZES

    names = list(SIZES) if text.strip() == "all" else [c.strip() for c in text.split(",") if c.strip()]
    for n in names:
        if n not in SIZES:
            raise DllmError(f"unknown config {n!r}; choose from {', '.join(SIZES)} or all")
    return names


@app.command()
def bench(
    models: Annotated[Optional[list[Path]], typer.Argument(help="bundles (onnx, trt) or checkpoints (torch) to measure", show_default=False)] = None,
    config: Annotated[str, typer.Option(help="configs with random weights: tiny,small,... or all (latency does not depend on weights)")] = "",
    backend: Annotated[str, typer.Option(help="torch,onnx,trt")] = "onnx",
    precision: Annotated[str, typer.Option(help="fp32,fp16,int8,int8-dynamic (each backend takes what it supports)")] = "fp32",
    steps: Annotated[str, typer.Option(help="denoising steps to sweep")] = "8,16,32,64,128",
    canvas: Annotated[str, typer.Option(help="canvas lengths")] = "256",
    batch: Annotated[str, typer.Option(help="batch sizes")] = "1",
    strategy: Annotated[str, typer.Option(help="sampler strategies")] = "confidence",
    repeats: Annotated[int, typer.Option(help="measured generations per point (after warm-up)")] = 3,
    warmup: Annotated[int, typer.Option(help="unmeasured generations per point first")] = 1,
    threads: Annotated[int, typer.Option(help="CPU threads for torch / onnxruntime; 0 = physical cores")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for bench.csv / .json / .md and latency_vs_steps.png")] = Path("runs/bench"),
    isolate: Annotated[bool, typer.Option("--isolate/--no-isolate", help="one worker process per model/backend/precision (clean memory numbers)")] = True,
    quality: Annotated[bool, typer.Option("--quality", help="add quality columns: generative perplexity (--judge), repetition, distinct-2")] = False,
    judge: Annotated[Optional[Path], typer.Option(help="--quality: autoregressive checkpoint that scores the samples")] = None,
    quality_samples: Annotated[int, typer.Option(help="--quality: samples per point")] = 8,
) -> None:
    """Latency vs steps, memory and power across configs, backends and precisions.

    Examples:
      dllm bench --config tiny,small --backend torch,onnx --precision fp32,int8 --steps 8,16,32,64,128
      dllm bench runs/bundle --backend trt --precision fp16,int8 --canvas 128,256      (on the Jetson)
    """
    from rich.table import Table

    from jetson_dllm import bench as bench_lib
    from jetson_dllm.profiler import read_meminfo

    names = [str(m) for m in (models or [])] + (_configs(config) if config else [])
    if not names:
        raise DllmError("nothing to measure: give bundles / checkpoints, or --config tiny,small,... (or all)")
    groups = bench_lib.plan(names, [b.strip() for b in backend.split(",")], [p.strip() for p in precision.split(",")],
                            int_list(steps, "--steps"), int_list(canvas, "--canvas"), int_list(batch, "--batch"),
                            [s.strip() for s in strategy.split(",")], repeats=repeats, warmup=warmup, threads=threads)
    if judge is not None and not quality:
        raise DllmError("--judge scores samples for the quality columns: add --quality")
    for g in groups:
        g.quality, g.judge, g.quality_samples = quality, str(judge) if judge else None, quality_samples
    bench_lib.check_memory(groups, read_meminfo().get("MemAvailable", 0))
    bench_lib.check_writable(out_dir)
    env = bench_lib.environment()
    t0 = __import__("time").time()
    with err.status("measuring") as status:
        results = bench_lib.run_groups(groups, isolate=isolate, progress=lambda i, n, g: status.update(
            f"[{i + 1}/{n}] {g.model} {g.backend} {g.precision}" if g else "done"))
    paths = bench_lib.write_outputs(results, env, out_dir)
    header, rows = bench_lib.headline(results)
    table = Table(title=f"latency vs steps (whole generation, median of {repeats}) on {env['cpu']}" + (f", {env['gpu']}" if env["gpu"] else ""))
    for col in header:
        table.add_column(col, justify="right" if col not in ("model", "backend", "precision") else "left")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    if quality:
        qtable = Table(title="quality vs steps" + (f" (judge: {judge})" if judge else ""))
        for col in ("model", "backend", "precision", "strategy", "steps", "evaluations", "generation ms", "gen. perplexity", "repetition", "distinct-2"):
            qtable.add_column(col, justify="left" if col in ("model", "backend", "precision", "strategy") else "right")
        for r in results:
            qtable.add_row(r.model, r.backend, r.precision, r.strategy, str(r.steps), f"{r.evaluations:.0f}", f"{r.generation_ms:,.0f}",
                           "-" if r.gen_ppl is None else f"{r.gen_ppl:.1f}", f"{r.repetition:.3f}", f"{r.distinct2:.3f}")
        out.print(qtable)
    worst = max(results, key=lambda r: r.generation_ms_spread)
    spread = (f"largest spread between repeats {100 * worst.generation_ms_spread:.1f}% ({worst.model} {worst.backend} "
              f"{worst.precision}, {worst.steps} steps)" if repeats > 1 else "one repeat per point, so no spread measured")
    out.print(f"{len(results)} points in {__import__('time').time() - t0:.0f}s; {spread}; "
              f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command()
def profile(
    bundle_dir: Annotated[Optional[Path], typer.Argument(help="bundle to profile (its config and precisions)", show_default=False)] = None,
    config: Annotated[str, typer.Option(help="configs instead of a bundle: tiny,small,... or all")] = "",
    precision: Annotated[str, typer.Option(help="precisions to consider")] = "fp32,fp16,int8",
    canvas: Annotated[int, typer.Option(help="canvas length")] = 256,
    batch: Annotated[int, typer.Option(help="batch size")] = 1,
    measure: Annotated[bool, typer.Option(help="also measure host RSS of the onnx backend here (bundle only)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the table as JSON")] = False,
) -> None:
    """Where memory goes, per config and precision, and whether it fits an Orin Nano 8GB (with headroom).

    Examples:
      dllm profile --config all --canvas 256
      dllm profile runs/bundle --measure
    """
    import json

    from rich.table import Table

    from jetson_dllm.config import ModelConfig
    from jetson_dllm.profiler import memory_plan, orin_nano_verdict

    if bundle_dir is not None:
        from jetson_dllm.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        cfgs = [bundle.config]
        precisions = [p for p in precision.split(",") if p in bundle.precisions]
        k = bundle.topk
    else:
        cfgs = [ModelConfig.from_name(n, vocab_size=8192, canvas_len=max(canvas, 256)) for n in _configs(config or "all")]
        precisions, k = [p.strip() for p in precision.split(",")], 64
    rows = []
    for cfg in cfgs:
        if canvas > cfg.canvas_len:
            raise DllmError(f"--canvas {canvas} is longer than the model's canvas ({cfg.canvas_len})")
        for p in precisions:
            plan_ = memory_plan(cfg, p if p in ("fp32", "fp16", "int8") else "int8", batch, canvas, k)
            rows.append({"config": cfg.name, "precision": p, **plan_, **orin_nano_verdict(plan_)})
    if measure and bundle_dir is not None:
        for row in rows:
            row["host_rss_measured"] = _measured_rss(bundle_dir, row["precision"], batch, canvas)
    if json_out:
        out.print_json(json.dumps(rows))
        return
    mib = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    table = Table(title=f"memory for batch {batch} x canvas {canvas} (MiB) and the Orin Nano 8GB verdict "
                        f"(usable ~{(7620 - 1200):,} MiB: 7620 visible - 1200 for a headless JetPack 6)")
    cols = ["config", "precision", "weights", "activations", "runtime", "run total", "fits?", "headroom", "build peak", "builds?"]
    if measure and bundle_dir is not None:
        cols.insert(6, "host RSS here (onnx)")
    for c in cols:
        table.add_column(c, justify="left" if c in ("config", "precision") else "right")
    for r in rows:
        cells = [r["config"], r["precision"], mib(r["weights"]), mib(r["activations"]), mib(r["runtime"]), mib(r["run_total"]),
                 "[green]yes[/]" if r["fits"] else "[red]no[/]", mib(r["headroom"]), mib(r["build_total"]),
                 "[green]yes[/]" if r["builds"] else "[red]no: add swap[/]"]
        if "host_rss_measured" in r:
            cells.insert(6, mib(r["host_rss_measured"]))
        table.add_row(*cells)
    out.print(table)


def _measured_rss(bundle_dir: Path, precision: str, batch: int, canvas: int) -> int:
    """Peak RSS of a fresh process that loads the bundle on onnxruntime and runs one step."""
    import json
    import subprocess

    code = ("import json, sys, numpy as np\n"
            "from jetson_dllm.backends import open_backend\n"
            "from jetson_dllm.profiler import peak_rss_ever\n"
            f"be = open_backend('onnx', {str(bundle_dir)!r}, precision={precision!r})\n"
            f"be.run({{'tokens': np.full(({batch}, {canvas}), be.cfg.mask_id, dtype=np.int32)}})\n"
            "print(json.dumps(peak_rss_ever()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise DllmError(f"measuring {precision} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no output'}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1]))


# --- entry point --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes print one line and return 1, never a traceback."""
    import click

    try:
        code = app(args=argv, prog_name="dllm", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except DllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
