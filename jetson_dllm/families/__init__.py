"""Model families: one literal registry of records, as the precisions table is.

A family is everything that differs between MDLM, block diffusion and the autoregressive baseline: how the network
attends in training, the objective and its NLL (its host module), the graphs a bundle of it carries, its generation
loop (a generator of graph calls, in its runtime module), what `--steps` means to it, its memory terms and what it
refuses. Code outside this package and the family modules asks the record, never the family's name.

Adding a family: a record here, a runtime module (jetson_dllm/families/NAME.py: `complete`, `bench_generate`, `serve_calls`) and a
host module (train_host/families/NAME.py: `train_loss`, `evaluate`, `export`); docs/architecture.md walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from jetson_dllm.errors import DllmError


@dataclass(frozen=True)
class Family:
    """One family of models.

    Args:
        name: what checkpoints and bundles record (`model.family`) and `dllm train --family` takes.
        title: how tables and messages name it.
        attention: the network's mask in training and export: "bidirectional", "causal" or "block".
        graphs: the graphs a bundle of it carries, the first one the precision entry's `file`.
        trt_graphs: the graphs TensorRT builds engines for (empty: onnxruntime only, `dllm build` refuses it).
        left_to_right: writes left to right, so it cannot fill gaps (infilling is refused).
        infilling: fills gaps anywhere in a canvas (`____` in a prompt, a server's `suffix`): MDLM; a left-to-right
            family cannot, nor SDD (it was trained on prefixes).
        cached: runs over a key/value cache the runner owns (allocated once for the whole context).
        steps: what `--steps` means to it ("" when it does not use steps: one call per token).
        nll: "bound" (a variational upper bound), "exact", or "" (none: SDD has no likelihood; its evaluation reports
            a denoising loss and accuracies, never in an NLL column).
        options: the `dllm run` sampler options it uses beyond temperature, top-k, top-p and seed.
        int8: what `dllm export --int8` writes: "qdq" (calibrated Q/DQ graphs for TensorRT, and for the canvas graph
            the dynamic CPU variant too), "dynamic" (INT8 weights with activations quantized as the graph runs, for
            onnxruntime on a CPU: nothing to calibrate), or "" (no INT8).
        runtime: its runtime module (torch-free): the generation loop and bench point.
        host: its host module (torch): objective, evaluation and export.
        train_options: the `dllm train` options of its own (others' are refused when given).
        self_cond: a model of it may be self-conditioned (`--self-cond K`: with `soft_k` set, its denoising graph, the
            canvas or the block step, also takes the previous step's top-k candidates, `soft_ids` and `soft_probs`, at
            the positions still masked; zeros: none).
        mixture: every position's input is a mixture of `soft_k` weighted candidates (SDD: `soft_k` is required, the
            network embeds the mixture itself and takes its noise level `t` as a time embedding).
        canvas_inputs, canvas_outputs: what its canvas graph takes and returns beyond tokens, soft inputs and the
            sampling head: SDD's noise level `t`; continuous diffusion's noised latents `x` (B, T, latent_dim) and `t`
            in, the expected clean latent `x0` and the top-1's `x0_top1` out (a family taking `x` has a latent width).
        network: the host module whose `Network(cfg)` is its network when that is not the Denoiser (continuous
            diffusion's, over latents); "" for the Denoiser.
        conditional: a model of it may take a condition (a text the encoder reads once per request, cross-attended
            by every denoiser layer: `cond_len`); its generation loop takes `condition`.
        drafter: the runtime module whose `drafter_for(runner, steps)` makes a model of it the drafter of speculative
            decoding (jetson_dllm.speculative: it proposes the next tokens, a parent with the verify graph checks them
            in one call); "" when it cannot draft.
    """

    name: str
    title: str
    attention: str
    graphs: tuple[str, ...]
    trt_graphs: tuple[str, ...]
    left_to_right: bool
    cached: bool
    steps: str
    nll: str
    options: tuple[str, ...]
    int8: str
    runtime: str
    host: str
    train_options: tuple[str, ...] = ()
    self_cond: bool = False
    mixture: bool = False
    infilling: bool = False
    canvas_inputs: tuple[str, ...] = ()
    canvas_outputs: tuple[str, ...] = ()
    network: str = ""
    conditional: bool = False
    drafter: str = ""

    def runtime_module(self) -> ModuleType:
        return importlib.import_module(self.runtime)

    def host_module(self) -> ModuleType:
        try:
            return importlib.import_module(self.host)
        except ImportError as e:
            if e.name and e.name.split(".")[0] in ("torch", "safetensors", "onnx"):
                raise DllmError(f"{self.title} training and export need torch: pip install 'jetson-dllm[train,export]'") from None
            raise

    def network_module(self) -> ModuleType | None:
        """The module of its own network (host side, torch), or None for the Denoiser."""
        return importlib.import_module(self.network) if self.network else None

    def describe(self, cfg) -> str:
        """What a model of this family adds to its title in tables: block diffusion's block and token shift."""
        if self.attention != "block":
            return ""
        return f" (block {cfg.block_size}" + (", token shift: adapted from an AR parent" if cfg.shift else "") + ")"

    def positions_per_call(self, cfg, canvas: int) -> int:
        """Positions one network call computes: the canvas, a block, or one token."""
        return {"bidirectional": canvas, "block": cfg.block_size, "causal": 1}[self.attention]


MASKED_OPTIONS = ("steps", "strategy", "threshold", "eb_bound", "span", "deadline_ms", "defer_twins", "gap", "guidance",
                  "guidance_schedule")  # MDLM's
SAMPLER_OPTIONS = (*MASKED_OPTIONS, "eta", "clamp")  # every family's together: one given that a family does not use is refused

FAMILIES: dict[str, Family] = {
    "mdlm": Family("mdlm", "masked diffusion (MDLM)", "bidirectional", ("canvas",), ("canvas",), left_to_right=False,
                   cached=False, steps="denoising steps for the whole canvas (network calls at most)", nll="bound",
                   options=MASKED_OPTIONS, int8="qdq", runtime="jetson_dllm.families.mdlm", host="train_host.families.mdlm",
                   train_options=("self_cond", "self_cond_rate", "cond_len", "cond_layers", "cond_drop", "freeze_denoiser"),
                   self_cond=True, infilling=True, conditional=True),
    "bd3": Family("bd3", "block diffusion (BD3-LM)", "block", ("block_step", "commit", "commit_step"), ("block_step", "commit"),
                  left_to_right=True, cached=True, steps="denoising steps per block",
                  nll="bound", options=("steps", "strategy", "threshold", "eb_bound", "defer_twins", "span", "guidance", "guidance_schedule"),
                  int8="qdq", runtime="jetson_dllm.families.bd3", host="train_host.families.bd3", self_cond=True,
                  train_options=("block_size", "t_min", "t_max", "shift", "complementary", "distill", "self_cond", "self_cond_rate", "cond_len",
                                 "cond_layers", "cond_drop", "freeze_denoiser"), conditional=True,
                  drafter="jetson_dllm.families.bd3_draft"),
    "sdd": Family("sdd", "sparse distribution diffusion (SDD)", "bidirectional", ("canvas",), ("canvas",), left_to_right=False,
                  cached=False, steps="denoising steps from noise level 1 to 0 (network calls)", nll="", options=("steps",), int8="qdq",
                  runtime="jetson_dllm.families.sdd", host="train_host.families.sdd", train_options=("candidates", "swap_ids"), mixture=True,
                  canvas_inputs=("t",)),
    "continuous": Family("continuous", "continuous embedding diffusion", "bidirectional", ("canvas",), ("canvas",), left_to_right=False,
                         cached=False, steps="denoising steps from noise level 1 to 0 (network calls)", nll="", options=("steps", "eta", "clamp"),
                         int8="qdq", runtime="jetson_dllm.families.continuous", host="train_host.families.continuous",
                         train_options=("latent_dim", "noise_shift", "self_cond", "self_cond_rate"), self_cond=True, canvas_inputs=("x", "t"),
                         canvas_outputs=("x0", "x0_top1"),
                         network="train_host.continuous_model"),
    "ar": Family("ar", "autoregressive baseline", "causal", ("decode", "verify"), (), left_to_right=True, cached=True, steps="",
                 nll="exact", options=(), int8="dynamic", runtime="jetson_dllm.families.ar", host="train_host.families.ar"),
}


def check_options(family: Family, given: set[str]) -> None:
    """Refuse `dllm run` options (parameter names) that were given but that this family does not use, rather than
    ignore them."""
    unused = sorted(o for o in given if o in SAMPLER_OPTIONS and o not in family.options)
    if unused:
        flag = "--" + unused[0].replace("_", "-")
        uses = ("it uses " + ", ".join("--" + o.replace("_", "-") for o in family.options) if family.options
                else "it takes no diffusion options: one network call per token")
        raise DllmError(f"{flag} does not apply to the {family.title} ({uses}); leave it out")


def check_train_options(name: str, given: set[str]) -> None:
    """Refuse `dllm train` options given for another family (e.g. --block-size when training MDLM); an unknown
    family is left to the training config's own check, which names the choices."""
    if name not in FAMILIES:
        return
    family = FAMILIES[name]
    theirs = {o for f in FAMILIES.values() for o in f.train_options} - set(family.train_options)
    unused = sorted(given & theirs)
    if unused:
        owners = [f.name for f in FAMILIES.values() if unused[0] in f.train_options]
        raise DllmError(f"--{unused[0].replace('_', '-')} is for --objective {' / '.join(owners)}; the {family.title} does not use it")


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise DllmError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_graphs(cfg) -> tuple[str, ...]:
    """The graphs a model has: its family's, and a conditional model's condition encoder (run once per request)."""
    return FAMILIES[cfg.family].graphs + (("encoder",) if getattr(cfg, "cond_len", 0) else ())


def engine_graphs_of(cfg) -> tuple[str, ...]:
    """The graphs TensorRT builds engines for, for this model: its family's (`trt_graphs`); none yet for a conditional
    model (its encoder and the denoising graphs taking the encoding run on onnxruntime)."""
    return () if getattr(cfg, "cond_len", 0) else FAMILIES[cfg.family].trt_graphs


def check_engines(cfg, where) -> None:
    """Refuse TensorRT for a model it builds no engines for (`engine_graphs_of`), saying why and what runs it."""
    if not engine_graphs_of(cfg):
        what = ("a conditional model (an encoder and denoising graphs taking its encoding)" if getattr(cfg, "cond_len", 0)
                else f"the {FAMILIES[cfg.family].title}")
        raise DllmError(f"{where} holds {what}; TensorRT engines for its graphs are not built yet (run it with --backend onnx)")


def family_of(cfg) -> Family:
    """The family record of a model config."""
    return get_family(cfg.family)


def infer_family(model: dict) -> str:
    """The family of a model config written before configs recorded it (an older checkpoint or bundle): its
    `causal` and `block_size` fields said it then."""
    if model.get("causal") is True:
        return "ar"
    return "bd3" if isinstance(model.get("block_size"), int) and model["block_size"] > 0 else "mdlm"
