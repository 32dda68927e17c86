"""`dllm run`: generate text on any backend, the canvas denoising live in the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from jetson_dllm.cli.common import app, err, given_options, out
from jetson_dllm.generate import CallRecorder, complete, open_model, read_prompt, undertrained_note
from jetson_dllm.live import live_view
from jetson_dllm.sampler import SamplerConfig
from jetson_dllm.speculative import run_speculative as speculative


@app.command()
def run(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="training run / checkpoint (torch backend) or bundle (onnx, trt)")] = Path("runs/tiny"),
    prompt: Annotated[str, typer.Option("--prompt", "-p", help='start of the text, or a template with ____ gaps / [MASK] tokens; "-" reads stdin')] = "Once upon a time",
    backend: Annotated[str, typer.Option(help="auto | torch | onnx | trt (auto: torch for a checkpoint, onnx for a bundle)")] = "auto",
    precision: Annotated[str, typer.Option(help="bundle precision: fp32 | fp16 | int8 | int8-dynamic")] = "fp32",
    steps: Annotated[int, typer.Option(help="denoising steps, network calls at most: for the whole canvas (mdlm), per block (bd3); ar models take none", min=1, max=100000)] = 64,
    length: Annotated[int, typer.Option(help="tokens to generate, rounded up to an allowed canvas; 0 = the longest canvas", min=0, max=16384)] = 0,
    strategy: Annotated[str, typer.Option(help="confidence | margin | entropy | threshold | eb (entropy-bounded) | ancestral")] = "confidence",
    span: Annotated[int, typer.Option(help="fill the canvas (mdlm) or each block (bd3: sub-blocks, as Fast-dLLM v2) in spans of this length, left to right; 0 = the whole canvas or block", min=0, max=16384)] = 0,
    threshold: Annotated[float, typer.Option(help="confidence threshold of --strategy threshold, in (0, 1]")] = 0.9,
    eb_bound: Annotated[float, typer.Option(help="--strategy eb: the entropy (nats) one step may commit in all")] = 0.1,
    temperature: Annotated[float, typer.Option(help="0 = greedy (repeats itself on small models; see the sampler results in docs/results.md)")] = 0.8,
    top_k: Annotated[int, typer.Option(help="sample among the k best tokens; 0 = all of the head", min=0, max=3839)] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass, in (0, 1]")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, max=4294967295)] = 0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", help="samples generated together as one batch", min=1, max=4096)] = 1,
    deadline_ms: Annotated[float, typer.Option(help="stop refining after this long and commit the best tokens; 0 = none")] = 0.0,
    defer_twins: Annotated[bool, typer.Option("--defer-twins/--no-defer-twins", help="neighbours picked in one step with the same token: commit one, re-predict the other (against 'play play'; see the sampler results in docs/results.md)")] = True,
    gap: Annotated[int, typer.Option(help="tokens per ____ gap in an infilling template", min=1, max=16384)] = 12,
    eta: Annotated[float, typer.Option(help="continuous diffusion: 0 = DDIM (deterministic), 1 = DDPM (fresh noise each step), or between")] = 0.0,
    clamp: Annotated[bool, typer.Option("--clamp", help="continuous diffusion: step with each position's top-1 token's latent (Diffusion-LM's clamping), not the expected one")] = False,
    condition: Annotated[Optional[str], typer.Option(help="a conditional model's condition (e.g. a story's first sentence), read by its encoder once; none: the empty condition")] = None,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance toward the prompt (mdlm), or a conditional model's condition (mdlm, bd3): an unguided twin row per sample, docs/guidance.md; 0 = none")] = 0.0,
    guidance_schedule: Annotated[str, typer.Option(help="guidance over the steps: constant | late (none in the first half) | ramp (growing to --guidance)")] = "constant",
    device: Annotated[str, typer.Option(help="torch backend device: cpu | cuda")] = "cpu",
    providers: Annotated[str, typer.Option(help="onnx backend providers, comma-separated (e.g. CUDAExecutionProvider)")] = "",
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = the physical cores this process may use (docs/running.md#threads)", min=0, max=1024)] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="print text, tokens, steps, evaluations and timings as JSON")] = False,
    live: Annotated[Optional[bool], typer.Option("--live/--no-live", help="show the denoising (default: when stdout is a terminal)")] = None,
    save_canvases: Annotated[Optional[Path], typer.Option(help="save the inputs of every network call (.npz), any model family; a masked-diffusion model's canvases feed INT8 calibration (dllm export --calib-file)")] = None,
    draft: Annotated[Optional[Path], typer.Option(help="speculative decoding: a block-diffusion model with this AR parent's tokenizer (run or bundle) proposes the next tokens, the parent checks them in one call; the text is the parent's (docs/speculative.md)")] = None,
    draft_steps: Annotated[int, typer.Option(help="--draft: the drafter's denoising calls a round (1..its block)", min=1, max=16384)] = 1,
) -> None:
    """Generate text with the diffusion sampler, showing the canvas denoise step by step.

    Infilling: a run of 3+ underscores is a gap of --gap tokens, each [MASK] one token, e.g.
      dllm run runs/tiny -p "Once upon a time ____ happily ever after."
    Examples:
      dllm run runs/tiny -p "Lily went to the park" --steps 32
      dllm run bundle/ --backend onnx --precision int8 -n 4 --temperature 0
      echo "Tom had a dog" | dllm run runs/tiny -p - --json
      dllm run runs/cond -p "" --condition "Tom found a red ball." --guidance 2   (a conditional model)
      dllm run runs/parent --draft runs/child --temperature 0   (speculative: the parent's text, fewer calls)
    """
    text = read_prompt(prompt)
    sampler = SamplerConfig.from_values(ctx.params)  # the sampler's knobs (jetson_dllm.sampler.KNOBS) by name
    if draft is not None or "draft_steps" in given_options(ctx):
        gen = speculative(model, draft, text, length, sampler, draft_steps, given_options(ctx), backend=backend, precision=precision,
                          device=device, providers=providers, threads=threads)
        return print_generation(gen, json_out)
    runner = open_model(model, backend=backend, precision=precision, device=device, providers=providers, threads=threads)
    with (CallRecorder(runner, save_canvases) if save_canvases is not None else runner) as runner, \
            live_view(out, err, runner.tokenizer, steps, (out.is_terminal and not json_out) if live is None else live) as view:
        gen = complete(runner, text, length=length, num_samples=num_samples, sampler=sampler, gap=gap, on_step=view, given=given_options(ctx),
                       condition=condition)
        if save_canvases is not None:
            err.print(runner.save_message(save_canvases))
    print_generation(gen, json_out, undertrained_note(runner))


def print_generation(gen, json_out: bool, note: str | None = None) -> None:
    """The generation as JSON, or the texts exactly as generated (a header between samples when there are several)
    and a summary line on stderr; `note` (a warning about the model) goes to stderr first."""
    if note:
        err.print(f"[yellow]warning: {note}[/]")
    if json_out:
        out.print(json.dumps(gen.to_json()), soft_wrap=True, markup=False, highlight=False)  # one line (not a token per line)
        return
    for i, t in enumerate(gen.texts):
        header = f"--- sample {i + 1}\n" if len(gen.texts) > 1 else ""
        if out.is_terminal:
            out.print(f"[bold]{header}[/]{escape(t)}", emoji=False, end="\n")
        else:  # piped: the bytes as generated, no markup, no wrapping, flushed sample by sample
            sys.stdout.write(header + t + "\n")
            sys.stdout.flush()
    err.print(f"[dim]{gen.summary()}[/]")
