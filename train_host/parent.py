"""What a training run takes from its --init parent: the weights (checked to fit: tokenizer, shift), and, with
`dllm train --distill A`, the frozen parent as a teacher. A block-diffusion model adapted with the
token shift predicts, at each masked position, the token its parent's head predicts there, so the frozen parent's
next-token distribution (read on the clean text) is a soft target beside the true token. The loss's cross-entropy
becomes (1 - A) x the true token's + A x the parent distribution's, under the same 1/t weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.tokenizer import TextTokenizer
from train_host import checkpoint as ckpt_io
from train_host.conditioning import condition_parameters


def init_weights(source: str, cfg: ModelConfig, tokenizer: TextTokenizer) -> tuple[dict, str]:
    """The weights of --init (whose shape this run's model took: TrainConfig.model_config), refused unless its
    tokenizer is the data's and it predicts what this run's model will (the token shift: its parent predicts the next
    token, an AR model or a shifted one; a model that predicts the token at its own position cannot be shifted).
    Returns (weights, the checkpoint's path)."""
    theirs_cfg, weights, theirs_tok, config = ckpt_io.load_checkpoint(source)
    if theirs_tok.sha256 != tokenizer.sha256:
        raise DllmError(f"--init {source} is a model of another shape or tokenizer than this run's: its tokenizer is not "
                        f"the data's; tokenize the text with it (dllm data FILES --tokenizer {source})")
    next_token = theirs_cfg.attention == "causal" or theirs_cfg.shift
    if cfg.shift and not next_token:
        raise DllmError(f"--shift needs a parent that predicts the next token (an autoregressive model, or one trained with "
                        f"--shift); {source} is a {theirs_cfg.family} model trained without the shift")
    if theirs_cfg.shift and not cfg.shift:
        raise DllmError(f"--init {source} was trained with --shift (its positions predict the next token); train on with --shift")
    return weights, config["path"]


def initialise(r, weights: dict, path: str) -> None:
    """Start from --init's weights (checked by `init_weights`)."""
    fresh = frozenset({"soft_proj.weight"}) if r.cfg.soft_k else frozenset()  # self-conditioning post-trained: starts at zero
    fresh |= frozenset(condition_parameters(r.core)) if r.cfg.cond_len else frozenset()  # a condition added to a denoiser
    ckpt_io.load_weights(r.core, weights, path, fresh)
    if r.ema is not None:
        r.ema.load_state_dict(r.core.state_dict())
    if r.d.main:
        r.console.print(f"starting from the weights of {path}")


def load_teacher(source: str, device: torch.device) -> torch.nn.Module:
    """The frozen parent of --init (an autoregressive model: its positions predict the next token)."""
    model, _, _ = ckpt_io.load_model(source)
    if family_of(model.cfg).attention != "causal":
        raise DllmError(f"--distill learns from an autoregressive parent; --init {source} is a {model.cfg.family} model")
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def parent_targets(teacher: torch.nn.Module, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(N, V) the parent's next-token probabilities for the N masked positions of `masked` (R, L), in its row-major
    order. `x` (B, L) is the shifted clean text (start token first); R is B or, with complementary masks, 2B (the
    same text twice). The target at position i is what the parent reads at i - 1 (position 0 is never masked)."""
    B, L = x.shape
    logits = teacher(x, torch.ones_like(x, dtype=torch.bool)).view(B, L, -1)
    rows, pos = masked.nonzero(as_tuple=True)  # row-major, the order of logits[masked]
    return logits[rows % B, (pos - 1).clamp(min=0)].float().softmax(-1)  # only the N rows needed, no (2B, L, V) copies


def distilled(ce: torch.Tensor, logits: torch.Tensor, teacher: torch.nn.Module, x: torch.Tensor, masked: torch.Tensor,
              share: float) -> torch.Tensor:
    """The masked positions' cross-entropy with `share` of it taken against the parent's distributions (`ce`: the
    true tokens', `logits` the child's at those positions)."""
    soft = F.cross_entropy(logits.float(), parent_targets(teacher, x, masked), reduction="none")
    return (1 - share) * ce + share * soft
