"""What a training run depends on: `TrainConfig` (saved with each checkpoint, and the torchrun relaunch's JSON)
and the one check of every setting's range and choices."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from jetson_dllm.config import SIZES, ModelConfig
from jetson_dllm.errors import DllmError, check_choice, check_range
from jetson_dllm.families import FAMILIES, get_family
from jetson_dllm.tokenizer import TextTokenizer
from train_host import diffusion
from train_host.bd3 import check_block, noise_range

RUN_FORMAT = "jetson-dllm-run"


@dataclass
class TrainConfig:
    """Everything a run depends on; saved with each checkpoint."""

    data: str
    out: str
    config: str = "tiny"
    objective: str = "mdlm"  # mdlm | ar (the autoregressive baseline: causal mask, next-token loss) | bd3 (block diffusion)
    block_size: int = 16  # bd3: tokens per block
    t_min: float = 0.0  # bd3: a fixed clipped noise range; 0 and 0 = searched at each evaluation
    t_max: float = 0.0
    init: str = ""  # start from this checkpoint's weights (e.g. an MDLM model fine-tuned into BD3), same shape
    shift: bool = False  # bd3: the token shift (a model adapted from an AR parent: position i predicts token i + 1)
    complementary: bool = False  # bd3: each canvas also trained with the complementary mask
    distill: float = 0.0  # bd3 --shift from an AR --init: share of the loss on the parent's next-token distributions
    self_cond: int = 0  # mdlm, bd3, continuous: self-conditioning on the previous prediction's top-k (the model's soft_k); 0 = off
    self_cond_rate: float = 0.5  # share of steps whose loss sees a first pass's prediction
    candidates: int = 8  # sdd: weighted candidates per position (the model's soft_k)
    swap_ids: bool = False  # sdd: above t = 0.5, leave the truth out of the candidates with probability 2t - 1
    latent_dim: int = 64  # continuous: the width of the noised token embeddings
    noise_shift: float = 1.0  # continuous: the cosine schedule's shift (its signal-to-noise ratio / shift^2); 1 = none
    cond_len: int = 0  # mdlm: a conditional model reading conditions of up to this many tokens (pairs data); 0 = none
    cond_layers: int = 2  # the condition encoder's layers
    cond_drop: float = 0.1  # share of rows trained with the condition dropped (what classifier-free guidance needs)
    freeze_denoiser: bool = False  # staged training's second stage: only the encoder and the cross-attention learn
    d_model: int = 0  # 0: from the named config; set to try custom sizes
    n_layer: int = 0
    n_head: int = 0
    n_kv_head: int = 0  # grouped-query attention: key/value heads (0: one per query head)
    canvas_len: int = 128
    batch_size: int = 32  # canvases per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    steps: int = 1000
    time_budget: float = 0.0  # seconds; 0 = no limit
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: str = "loglinear"
    ema: float = 0.0  # e.g. 0.999; 0 = off
    eval_every: int = 100
    eval_canvases: int = 128
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    threads: int = 0
    compile: bool = False
    resume: bool = False
    pause_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = off

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """A TrainConfig saved as JSON (what the torchrun relaunch reads); unknown keys are refused."""
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise DllmError(f"{path} is not a training config (unknown keys {sorted(set(data) - known) if isinstance(data, dict) else data!r})")
        return cls(**data)

    @classmethod
    def from_options(cls, options: dict) -> TrainConfig:
        """The config from a mapping that may hold more (the `dllm train` verb's options): unknown keys are ignored."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    def model_config(self, tokenizer: TextTokenizer) -> ModelConfig:
        """The model this run trains: the named size with its overrides, or with --init the parent's own shape (an
        imported model's is no named size) under this run's family, block size, shift and canvas."""
        if self.init:
            return self._from_parent()
        overrides = {k: v for k, v in (("d_model", self.d_model), ("n_layer", self.n_layer), ("n_head", self.n_head),
                                       ("n_kv_head", self.n_kv_head)) if v}
        cfg = ModelConfig.from_name(self.config, vocab_size=tokenizer.vocab_size, canvas_len=self.canvas_len, mask_id=tokenizer.mask_id,
                                    family=self.objective, block_size=self.block_size if get_family(self.objective).attention == "block" else 0,
                                    shift=self.shift, soft_k=self.soft_k(), **self.latent(), **self.condition())
        if overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), "n_kv_head": 0, **overrides, "name": "custom", "d_ff": 0})
        return cfg


    def latent(self) -> dict:
        """Continuous embedding diffusion's latent width (and its untied head), or nothing."""
        if "x" not in get_family(self.objective).canvas_inputs:
            return {}
        return {"latent_dim": self.latent_dim, "tie_embeddings": False, "noise_shift": float(self.noise_shift)}

    def condition(self) -> dict:
        """A conditional model's condition length and encoder layers (none: 0 and 0)."""
        return {"cond_len": self.cond_len, "cond_layers": self.cond_layers if self.cond_len else 0}

    def soft_k(self) -> int:
        """The model's soft inputs: SDD's candidates, a self-conditioned model's top-k, or none."""
        family = get_family(self.objective)
        return self.candidates if family.mixture else self.self_cond if family.self_cond else 0

    def _from_parent(self) -> ModelConfig:
        from train_host.checkpoint import read_config, resolve_checkpoint

        parent = ModelConfig.from_dict(read_config(resolve_checkpoint(self.init))["model"], where=f"--init {self.init}")
        theirs, ours = get_family(parent.family), get_family(self.objective)
        if theirs.network != ours.network:  # another network (continuous diffusion's latents): the weights do not carry over
            raise DllmError(f"--init {self.init} is a {theirs.title} model, whose network the {ours.title} does not share; "
                            f"start without --init, or from a {self.objective} checkpoint")
        for name in ("d_model", "n_layer", "n_head", "n_kv_head"):
            if getattr(self, name) and getattr(self, name) != getattr(parent, name):
                raise DllmError(f"--{name.replace('_', '-')} {getattr(self, name)} asks for another shape than --init {self.init} has "
                                f"({getattr(parent, name)}); with --init the model's shape is its parent's")
        if self.canvas_len > parent.canvas_len:
            raise DllmError(f"--canvas-len {self.canvas_len} is longer than --init {self.init} takes ({parent.canvas_len})")
        if parent.soft_k and parent.soft_k != self.soft_k() and get_family(parent.family).self_cond:
            raise DllmError(f"--init {self.init} self-conditions on {parent.soft_k} candidates; train on with --self-cond {parent.soft_k}")
        block = self.block_size if get_family(self.objective).attention == "block" else 0
        return ModelConfig.from_dict({**parent.to_dict(), "family": self.objective, "block_size": block, "shift": self.shift,
                                      "canvas_len": self.canvas_len, "soft_k": self.soft_k(), **self._parent_condition(parent)},
                                     where=f"--init {self.init}")

    def _parent_condition(self, parent: ModelConfig) -> dict:
        """A conditional parent's condition carries over (another length or depth is refused); an unconditional
        parent takes this run's (the staged training's second stage: a condition added to a trained denoiser)."""
        if not parent.cond_len:
            return self.condition()
        if self.cond_len not in (0, parent.cond_len) or (self.cond_len and self.cond_layers != parent.cond_layers):
            raise DllmError(f"--init {self.init} reads conditions of {parent.cond_len} tokens with {parent.cond_layers} encoder "
                            "layers; train on with the same --cond-len and --cond-layers (or leave them out)")
        return {"cond_len": parent.cond_len, "cond_layers": parent.cond_layers}


def validate(tc: TrainConfig) -> None:
    """Every setting's range and choices, once (NaN is refused everywhere)."""
    for flag, value, low in (("--steps", tc.steps, 1), ("--batch-size", tc.batch_size, 1), ("--grad-accum", tc.grad_accum, 1),
                             ("--eval-every", tc.eval_every, 1), ("--eval-canvases", tc.eval_canvases, 1), ("--log-every", tc.log_every, 1),
                             ("--keep-last", tc.keep_last, 1), ("--warmup", tc.warmup, 0), ("--pause-after", tc.pause_after, 0),
                             ("--seed", tc.seed, 0), ("--threads", tc.threads, 0), ("--d-model", tc.d_model, 0),
                             ("--n-layer", tc.n_layer, 0), ("--n-head", tc.n_head, 0), ("--n-kv-head", tc.n_kv_head, 0), ("--time-budget", tc.time_budget, 0),
                             ("--weight-decay", tc.weight_decay, 0), ("--grad-clip", tc.grad_clip, 0)):
        check_range(flag, value, low)
    check_range("--lr", tc.lr, 0, 10, low_open=True)
    check_range("--min-lr-ratio", tc.min_lr_ratio, 0, 1)
    check_range("--self-cond", tc.self_cond, 0, 64)
    check_range("--self-cond-rate", tc.self_cond_rate, 0, 1)
    check_range("--candidates", tc.candidates, 1, 64)
    check_range("--latent-dim", tc.latent_dim, 1, 4096)
    check_range("--noise-shift", tc.noise_shift, 0.1, 100)
    check_range("--cond-len", tc.cond_len, 0, 1024)
    check_range("--cond-layers", tc.cond_layers, 1, 64)
    check_range("--cond-drop", tc.cond_drop, 0, 1, high_open=True)
    check_range("--distill", tc.distill, 0, 1)
    if tc.distill and not (tc.shift and tc.init):
        raise DllmError("--distill learns from an autoregressive parent's next-token distributions: give the parent with --init, "
                        "and --shift (so each position predicts the next token, as the parent's head does)")
    if tc.freeze_denoiser and not tc.init:
        raise DllmError("--freeze-denoiser trains a condition onto a trained denoiser (the staged training's second stage): "
                        "give that model with --init")
    check_range("--ema", tc.ema, 0, 1, high_open=True)
    check_range("--canvas-len", tc.canvas_len, 8, 16384)
    check_choice("--config", tc.config, SIZES)
    check_choice("--objective", tc.objective, tuple(FAMILIES))
    if get_family(tc.objective).attention == "block":
        check_block(tc.canvas_len, tc.block_size)
        low, high = noise_range(tc)
        check_range("--t-min", low, 0, 1)
        check_range("--t-max", high, low, 1, low_open=True)
    check_choice("--schedule", tc.schedule, diffusion.SCHEDULES)
    check_choice("--device", tc.device, ("auto", "cpu", "cuda"))
    check_choice("--dtype", tc.dtype, ("auto", "fp32", "bf16", "fp16"))
