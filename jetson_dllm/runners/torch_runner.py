"""The torch runner: runs a training checkpoint with the same heads the exported graph has (host only)."""

from __future__ import annotations

import re

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of, model_graphs
from jetson_dllm.runners.feeds import call_slots, canvas_inputs, condition_inputs, encoder_inputs, graph_soft_inputs, valid_length
from jetson_dllm.runners.graphs import ENTROPY, SAMPLING_OUTPUTS, TOKEN_INPUTS
from jetson_dllm.runners.protocol import RunnerBase, check_graph
from jetson_dllm.threads import resolve as resolve_threads

DEFAULT_TOPK = 64
MAX_TOPK = 3839  # TensorRT's TopK takes K < 3840; the same bound everywhere


def _torch():
    try:
        import torch
    except ImportError:
        raise DllmError("the torch backend needs torch: pip install 'jetson-dllm[train]', or use --backend onnx / trt with a bundle") from None
    return torch


class TorchRunner(RunnerBase):
    """A Denoiser (in memory) behind the runner interface."""

    def __init__(self, model, tokenizer=None, device: str = "cpu", topk: int = DEFAULT_TOPK, threads: int = 0, source: str = "<memory>",
                 metrics: dict | None = None):
        torch = _torch()
        check_device(torch, device)
        if device == "cpu":
            torch.set_num_threads(resolve_threads(threads))
        self.torch = torch
        self.model, self.tokenizer, self.source = model.to(device).eval(), tokenizer, source
        self.metrics = metrics or {}  # the checkpoint's validation metrics
        cfg = self.model.cfg
        if not 0 < topk <= min(cfg.vocab_size, MAX_TOPK):
            raise DllmError(f"top-K must be in 1..{min(cfg.vocab_size, MAX_TOPK)}, got {topk}")
        self.device = device
        self.cfg, self.topk, self.precision = cfg, topk, "fp32"
        self.name = f"torch-{device}"
        self.canvas_lengths = cfg.canvas_buckets()
        self.graphs = model_graphs(cfg)
        self.cache: dict = {}  # batch -> (keys, values) tensors, for the cached graphs
        self.pool = None  # open_slots: the server's rows

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        spec = check_graph(self, graph)
        outputs = outputs or spec.outputs + ((ENTROPY,) if spec.entropy else ())  # (not the decode graph's: no sampler reads it)
        if spec.cache:
            return self._run_cached(graph, feeds, outputs)
        torch = self.torch
        if graph == "encoder":  # a conditional model's condition, encoded once per request
            inputs = {k: torch.from_numpy(v).to(self.device).long() for k, v in encoder_inputs(feeds, self.cfg).items()}
            with torch.inference_mode():
                memory, bias = self.model.encode(inputs["tokens"], inputs["condition_len"])
            return {"memory": memory.float().cpu().numpy(), "memory_bias": bias.cpu().numpy()}
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in canvas_inputs(feeds, self.canvas_lengths, self.cfg).items()}
        soft = (inputs["soft_ids"].long(), inputs["soft_probs"]) if "soft_ids" in inputs else None
        latent = {"x": inputs["x"]} if "x" in inputs else {}  # continuous diffusion's noised latents
        memory = {"memory": (inputs["memory"], inputs["memory_bias"])} if "memory" in inputs else {}
        with torch.inference_mode():
            return self._heads(self.model(inputs["tokens"], soft=soft, t=inputs.get("t"), **latent, **memory), outputs)

    def _heads(self, logits, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        result = {}
        if "logits" in outputs:
            result["logits"] = logits.float().cpu().numpy()
        if any(o in outputs for o in (*SAMPLING_OUTPUTS, ENTROPY)):
            from train_host.model import sampling_head

            values, ids, entropy = sampling_head(logits, self.topk)
            result["topk_logprobs"] = values.cpu().numpy()
            result["topk_ids"] = ids.cpu().numpy()
            if ENTROPY in outputs:
                result[ENTROPY] = entropy.cpu().numpy()
        if "x0" in outputs:  # continuous diffusion: the expected clean latent, and its top-1's (clamping)
            result["x0"] = self.model.expected_latent(logits).cpu().numpy()
        if "x0_top1" in outputs:
            result["x0_top1"] = self.model.top1_latent(logits).float().cpu().numpy()
        return result

    def _run_cached(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """A cached graph over this runner's cache (n_layer, rows, heads, context, head_dim). Rows at different
        positions, or rows of the pool: the exported graph's own computation (train_host.graph_modules.graph_outputs)
        on the rows' caches up to the furthest valid length, the new keys and values then written at each row's; a
        batch at one position (`dllm run`): the model's KVCache over the same tensors."""
        from train_host.graph_modules import graph_outputs

        torch = self.torch
        tokens = feeds.get("tokens")
        if tokens is None or np.ndim(tokens) != 2:
            raise DllmError(f"the {graph} graph takes tokens shaped (batch, positions)")
        batch, width = tokens.shape
        valid = valid_length(feeds, batch, self.cfg.canvas_len - width + 1)
        slots = call_slots(feeds, batch, self.pool[0].shape[1] if self.pool else 0)
        if slots is None:
            if batch not in self.cache:  # one batch size at a time, as the other runners
                self.cache = {batch: self._tensors(batch)}
            k_all, v_all = self.cache[batch]
            slots, rows = np.arange(batch), slice(None)  # a view of the whole cache, no copy
        else:
            k_all, v_all = self.pool
            rows = torch.from_numpy(slots).to(self.device)
        as_tensor = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(self.device)  # noqa: E731
        named = {name: as_tensor(feeds[name]) for name in TOKEN_INPUTS if name in feeds}
        soft = graph_soft_inputs(graph, feeds, (batch, width), self.cfg)  # a self-conditioned block step: top-k or zeros
        memory = condition_inputs(feeds, batch, self.cfg)  # a conditional model's encoding, per row (refused for others)
        named |= {name: torch.from_numpy(value).to(self.device) for name, value in {**(soft or {}), **memory}.items()}
        if "soft_ids" in named:
            named["soft_ids"] = named["soft_ids"].long()
        with torch.inference_mode():
            if isinstance(rows, slice) and (valid == valid[0]).all():  # one batch at one position: the model's own cache
                return self._run_kv(graph, k_all, v_all, int(valid[0]), named, outputs)
            upto = int(valid.max())
            named |= {"k_cache": k_all[:, rows, :, :upto], "v_cache": v_all[:, rows, :, :upto], "valid_len": as_tensor(valid)}
            got = graph_outputs(self.model, graph, self.topk, named)
            if "k_new" in got:
                for r, (slot, at) in enumerate(zip(slots, valid)):
                    k_all[:, slot, :, at : at + width] = got["k_new"][:, r]
                    v_all[:, slot, :, at : at + width] = got["v_new"][:, r]
        return {name: got[name].cpu().numpy() for name in outputs if name in got}

    def _run_kv(self, graph: str, k_all, v_all, valid: int, named: dict, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The graph through the model's KVCache over the same tensors (attending to exactly the valid positions,
        keys written in place, no mask built): the path `dllm run` took before rows had positions of their own, the
        same greedy tokens, measured at the same speed."""
        from train_host.cached_graphs import run_cached
        from train_host.model import KVCache

        soft = (named["soft_ids"], named["soft_probs"]) if "soft_ids" in named else None
        memory = (named["memory"], named["memory_bias"]) if "memory" in named else None
        logits = run_cached(self.model, KVCache.over(k_all, v_all, valid), graph, valid, named["tokens"], named.get("prev_tokens"), soft, memory)
        return self._heads(logits, outputs) if logits is not None else {}

    def _tensors(self, rows: int):
        c = self.cfg
        shape = (c.n_layer, rows, c.n_kv_head, c.canvas_len, c.head_dim)
        return self.torch.zeros(shape, device=self.device), self.torch.zeros(shape, device=self.device)

    def open_slots(self, rows: int) -> int:
        if not family_of(self.cfg).cached:
            return 0
        self.pool = self._tensors(rows)
        return 2 * self.pool[0].numel() * 4

    def memory(self) -> dict[str, int]:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        mem = {"weights": weights}
        if self.device == "cuda":
            mem["device_used"] = int(self.torch.cuda.memory_allocated())
        return mem

    def close(self) -> None:
        self.cache.clear()
        self.pool = None
        self.model = None


def check_device(torch, device: str) -> None:
    """A device torch can use here: cpu, or cuda[:N] when this torch has CUDA and sees that GPU."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise DllmError(f"--device must be cpu or cuda (cuda:N for another GPU), got {device[:20]!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DllmError(f"--device {device} asked for, but this torch has no usable CUDA (a CPU-only build, or no GPU); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DllmError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def runner_from_checkpoint(checkpoint: str, device: str = "cpu", topk: int = DEFAULT_TOPK, threads: int = 0) -> TorchRunner:
    """A checkpoint (a run folder's best, or a checkpoints/step_* folder) on torch."""
    check_device(_torch(), device)
    from train_host.checkpoint import load_model

    model, tokenizer, config = load_model(checkpoint, device=device)
    return TorchRunner(model, tokenizer, device=device, topk=topk, threads=threads, source=config["path"], metrics=config.get("metrics"))
