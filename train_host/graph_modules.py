"""The cached graphs as torch modules over explicit cache tensors: what bd3_export and ar_export export to ONNX and
what the torch runner runs (`graph_outputs`), one computation for both.

Each takes tokens (B, w), the cache's keys and values (n_layer, B, heads, positions, head_dim) and each row's valid
length (B,): a row's queries sit at its valid length onward and attend to its first valid_len cached positions
(past them the cache is masked out, so what it holds there never matters) and to the call's own positions.

    BlockStep   a noised block over the cache: its top-K (and entropy)
    Commit      a final block's keys and values (a shifted model's also its block's top-K)
    CommitStep  the finished block committed and the next noised block stepped in one pass (training's mask)
    Decode      one token read (its keys and values) and the next one's top-K
"""

from __future__ import annotations

import torch

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.graphs import COMMIT_OUTPUTS, ENTROPY, graph_spec, returns_logits
from train_host.bd3 import fused_mask
from train_host.model import Denoiser, sampling_head, shifted, topk_logprobs


class TensorCache:
    """The model's cache interface over explicit tensors: reads past keys, records the block's, writes nothing."""

    frozen = True
    len = 0

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_k.append(k)
        self.new_v.append(v)
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


def row_mask(valid_len: torch.Tensor, queries: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's rotary positions (B, Q) and attention mask over [cache; the call's own positions] (B, 1, Q,
    max_len + Q): row r's queries sit at valid_len[r] onward and see its first valid_len[r] cached positions, and
    among the call's own positions what `queries` (Q, Q) bool allows."""
    valid_len = valid_len.to(torch.int64)
    q = queries.shape[0]
    positions = valid_len.unsqueeze(1) + torch.arange(q, device=valid_len.device)
    past = (torch.arange(max_len, device=valid_len.device) < valid_len.unsqueeze(1)).unsqueeze(1).expand(-1, q, -1)
    own = queries.unsqueeze(0).expand(valid_len.shape[0], -1, -1)
    return positions, torch.cat([past, own], dim=2).unsqueeze(1)


def _hidden(model: Denoiser, tokens, k_cache, v_cache, valid_len, queries: torch.Tensor | None = None,
            soft: tuple | None = None, memory: tuple | None = None) -> tuple[torch.Tensor, TensorCache]:
    """Hidden states of `tokens` over the cache; `queries` (Q, Q) what the call's own positions see of each other
    (default: all of them); `soft` a self-conditioned model's soft inputs (ids, probabilities); `memory` a
    conditional model's encoded condition (memory, memory_bias)."""
    q = tokens.shape[1]
    cache = TensorCache(k_cache, v_cache)
    own = queries if queries is not None else torch.ones(q, q, dtype=torch.bool, device=tokens.device)
    positions, mask = row_mask(valid_len, own, k_cache.shape[3])
    return model.hidden(tokens, cache=cache, attn_mask=mask, rope_positions=positions, soft=soft, memory=memory), cache


class BlockStep(torch.nn.Module):
    """Inputs after the cache's: a self-conditioned model's soft inputs (soft_ids, soft_probs), then a conditional
    model's encoding (memory, memory_bias); a conditional model's block step also returns its logits (guidance)."""

    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens, k_cache, v_cache, valid_len, soft_ids=None, soft_probs=None, memory=None, memory_bias=None):
        soft = (soft_ids, soft_probs) if soft_ids is not None else None
        h, _ = _hidden(self.model, tokens, k_cache, v_cache, valid_len, soft=soft, memory=_pair(memory, memory_bias))
        logits = self.model.logits_from_hidden(h)
        logits = shifted(logits) if self.model.cfg.shift else logits
        return (*sampling_head(logits, self.k), *((logits,) if self.model.cfg.cond_len else ()))


class CommitStep(torch.nn.Module):
    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, prev_tokens, tokens, k_cache, v_cache, valid_len, memory=None, memory_bias=None):
        b = tokens.shape[1]
        h, cache = _hidden(self.model, torch.cat([prev_tokens, tokens], dim=1), k_cache, v_cache, valid_len, fused_mask(b, tokens.device),
                           memory=_pair(memory, memory_bias))
        rows = h[:, b - 1 : 2 * b - 1] if self.model.cfg.shift else h[:, b:]  # shifted: from the position before
        logits = self.model.logits_from_hidden(rows)
        lp, ids, entropy = sampling_head(logits, self.k)
        new = (torch.stack(cache.new_k)[:, :, :, :b], torch.stack(cache.new_v)[:, :, :, :b])
        return lp, ids, entropy, *new, *((logits,) if self.model.cfg.cond_len else ())  # a conditional model's: guidance


class Commit(torch.nn.Module):
    """A shifted model's commit also returns its block's top-K (position 0: the next block's first token), and a
    conditional shifted model's its logits after the keys and values."""

    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens, k_cache, v_cache, valid_len, memory=None, memory_bias=None):
        h, cache = _hidden(self.model, tokens, k_cache, v_cache, valid_len, memory=_pair(memory, memory_bias))
        new = (torch.stack(cache.new_k), torch.stack(cache.new_v))
        if self.model.cfg.shift:
            logits = shifted(self.model.logits_from_hidden(h))
            return (*sampling_head(logits, self.k), *new, *((logits,) if self.model.cfg.cond_len else ()))
        return new


def _pair(memory, bias) -> tuple | None:
    return (memory, bias) if memory is not None else None


def example_memory(model: Denoiser, batch: int = 2) -> dict:
    """A conditional model's example encoding (the block graphs' `memory` and `memory_bias` keywords: one row's
    condition, the next one's empty); {} for a model without a condition."""
    cfg = model.cfg
    if not cfg.cond_len:
        return {}
    with torch.no_grad():
        memory, bias = model.encode(torch.randint(3, cfg.vocab_size, (batch, cfg.cond_len)), torch.tensor([cfg.cond_len // 2 + 1, 0] * batch)[:batch])
    return {"memory": memory, "memory_bias": bias}


def example_inputs(model: Denoiser, batch: int = 2, soft: bool = False) -> tuple:
    """Example inputs of the block graphs; with `soft`, a self-conditioned block step's soft inputs after them."""
    cfg = model.cfg
    shape = (cfg.n_layer, batch, cfg.n_kv_head, cfg.canvas_len, cfg.head_dim)
    tokens = torch.full((batch, cfg.block_size), cfg.mask_id, dtype=torch.int32)
    out = (tokens, torch.zeros(shape), torch.zeros(shape), torch.zeros(batch, dtype=torch.int32))
    if soft:
        out += (torch.randint(3, cfg.vocab_size, (batch, cfg.block_size, cfg.soft_k), dtype=torch.int32),
                torch.full((batch, cfg.block_size, cfg.soft_k), 1.0 / (cfg.soft_k + 1)))
    return out


class Decode(torch.nn.Module):
    def __init__(self, model: Denoiser, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, tokens, k_cache, v_cache, valid_len):
        h, cache = _hidden(self.model, tokens, k_cache, v_cache, valid_len)
        lp, ids = topk_logprobs(self.model.logits_from_hidden(h), self.k)
        return lp, ids, torch.stack(cache.new_k), torch.stack(cache.new_v)


def graph_outputs(model: Denoiser, graph: str, k: int, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_len: torch.Tensor,
                  tokens: torch.Tensor, prev_tokens: torch.Tensor | None = None, soft: tuple | None = None,
                  memory: tuple | None = None) -> dict[str, torch.Tensor]:
    """One cached graph (jetson_dllm.runners.graphs.GRAPHS) through the export's own modules, on explicit cache tensors
    (n_layer, B, heads, positions, head_dim) and each row's valid length (B,): the graph's outputs by name (the
    new keys and values included, for the caller to write). What the torch runner runs: the exported computation.
    `soft`: a self-conditioned block step's soft inputs; `memory`: a conditional model's encoding."""
    modules = {"block_step": BlockStep, "commit": Commit, "commit_step": CommitStep, "decode": Decode}
    if graph not in modules:
        raise DllmError(f"no cached graph {graph!r}")
    spec = graph_spec(graph, model.cfg)
    inputs = (prev_tokens, tokens) if graph == "commit_step" else (tokens,)
    extra = soft if soft is not None and graph == "block_step" else ()
    encoding = dict(zip(("memory", "memory_bias"), memory)) if memory is not None else {}
    got = modules[graph](model, k)(*inputs, k_cache, v_cache, valid_len, *extra, **encoding)
    names = [*spec.outputs, *((ENTROPY,) if spec.entropy else ()), *(COMMIT_OUTPUTS if spec.cache == "write" else ()),
             *(("logits",) if returns_logits(graph, model.cfg) else ())]
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(names), (graph, names)
    return dict(zip(names, got))
