"""The autoregressive baseline: next-token loss, exact NLL, and sampling with a KV cache.

The same network as the denoiser with a causal mask (the `ar` family), trained by the same loop on the
same canvases: the input is the canvas shifted right behind an end-of-text token (which doubles as the
beginning of a story), the target is the canvas itself, padding is never a target. So the AR model pays
for every text token and the end-of-text, exactly the tokens the diffusion NLL bound is counted over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import candidate_distribution
from train_host.model import Denoiser, KVCache


def shift_right(x: torch.Tensor, bos_id: int) -> torch.Tensor:
    """(B, L) -> the inputs that predict x: bos, x[:, :-1]."""
    return torch.cat([torch.full_like(x[:, :1], bos_id), x[:, :-1]], dim=1)


def ar_loss(model: torch.nn.Module, x: torch.Tensor, bos_id: int, pad_id: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy summed over non-padding targets, per canvas position (as MDLM's loss is,
    so learning rates transfer and data-parallel ranks average exactly)."""
    keep = x != pad_id
    logits = model(shift_right(x, bos_id), keep)
    targets = x[keep]
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    stats = {"masked": keep.sum().detach(), "ce_sum": ce.sum().detach(), "correct": (logits.argmax(-1) == targets).sum().detach()}
    return ce.sum() / x.numel(), stats


@torch.no_grad()
def ar_nll(model: torch.nn.Module, x: torch.Tensor, bos_id: int, pad_id: int) -> dict[str, float]:
    """Exact NLL (sum, nats) of canvases' non-padding tokens, their count, and next-token accuracy counts."""
    keep = x != pad_id
    logits = model(shift_right(x, bos_id), keep)
    targets = x[keep]
    ce = F.cross_entropy(logits.float(), targets, reduction="sum")
    return {"nll": float(ce), "tokens": int(keep.sum()), "masked": int(keep.sum()), "correct": int((logits.argmax(-1) == targets).sum())}


@dataclass
class ArResult:
    tokens: np.ndarray  # (B, T) prompt + generated, end-of-text and padding after the end
    new_tokens: int  # decoding steps run (network evaluations after the prefill)
    seconds: float


@torch.inference_mode()
def ar_generate(
    model: Denoiser,
    prompt: list[int],
    max_new: int,
    bos_id: int,
    eot_id: int,
    pad_id: int,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_end: bool = True,
) -> ArResult:
    """Sample continuations of `prompt` token by token with a KV cache; rows stop at end-of-text
    (`stop_at_end=False`: exactly `max_new` tokens, end-of-text never chosen, as for timing and infilling)."""
    cfg = model.cfg
    if cfg.attention != "causal":
        raise DllmError("this is a diffusion model; it is sampled with the diffusion sampler, not token by token")
    # The network sees the start token, the prompt and all but the last new token: at most canvas_len positions.
    max_new = min(max_new, cfg.canvas_len - len(prompt))
    if max_new <= 0:
        raise DllmError(f"the prompt is {len(prompt)} tokens; the model takes {cfg.canvas_len}")
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    B = num_samples
    cache = KVCache(cfg, B, 1 + len(prompt) + max_new, device)
    t0 = time.perf_counter()
    x = torch.tensor([[bos_id] + prompt] * B, device=device)
    h = model.hidden(x, cache)[:, -1]
    out = np.full((B, len(prompt) + max_new), pad_id, dtype=np.int32)
    out[:, : len(prompt)] = prompt
    done = np.zeros(B, dtype=bool)
    steps = 0
    for i in range(max_new):
        logits = model.logits_from_hidden(h).float()
        if not stop_at_end:
            logits[:, [eot_id, pad_id]] = float("-inf")
        logprobs = torch.log_softmax(logits, -1)
        values, ids = torch.topk(logprobs, min(logprobs.shape[-1], 256 if (temperature > 0) else 1), dim=-1)
        values, ids = values.cpu().numpy(), ids.cpu().numpy()
        if temperature == 0:
            nxt = ids[:, 0]
        else:
            scores = candidate_distribution(values, temperature, top_k, top_p)
            gumbel = -np.log(-np.log(rng.random(scores.shape) + 1e-20) + 1e-20)
            nxt = ids[np.arange(B), np.argmax(scores + gumbel, -1)]
        nxt = np.where(done, pad_id, nxt)
        out[:, len(prompt) + i] = nxt
        done |= nxt == eot_id
        steps += 1
        if done.all() or i == max_new - 1:
            break
        h = model.hidden(torch.from_numpy(nxt.astype(np.int64)).view(B, 1).to(device), cache)[:, -1]
    return ArResult(out, steps, time.perf_counter() - t0)
