"""The torch runner: runs a training checkpoint with the same heads the exported graph has (host only)."""

from __future__ import annotations

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.runners import SAMPLING_OUTPUTS, RunnerBase, check_tokens

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
        if device == "cuda" and not torch.cuda.is_available():
            raise DllmError("--device cuda asked for, but torch sees no CUDA GPU")
        if threads:
            torch.set_num_threads(threads)
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

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] = SAMPLING_OUTPUTS) -> dict[str, np.ndarray]:
        torch = self.torch
        tokens = torch.from_numpy(check_tokens(feeds, self.canvas_lengths, self.cfg.vocab_size)).to(self.device)
        with torch.inference_mode():
            logits = self.model(tokens)
            result = {}
            if "logits" in outputs:
                result["logits"] = logits.float().cpu().numpy()
            if any(o in outputs for o in SAMPLING_OUTPUTS):
                from train_host.model import topk_logprobs

                values, ids = topk_logprobs(logits, self.topk)
                result["topk_logprobs"] = values.cpu().numpy()
                result["topk_ids"] = ids.cpu().numpy()
        return result

    def generate_autoregressive(self, prompt_ids: list[int], max_new: int, num_samples: int, temperature: float,
                                top_k: int, top_p: float, seed: int, stop_at_end: bool = True):
        """Token by token with a KV cache: only for the autoregressive baseline (cfg.causal)."""
        from train_host.autoregressive import ar_generate

        tok = self.tokenizer
        return ar_generate(self.model, prompt_ids, max_new, tok.eot_id, tok.eot_id, tok.pad_id, num_samples=num_samples,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop_at_end=stop_at_end)

    def generate_blockwise(self, prompt_ids: list[int], max_new: int, num_samples: int, sampler, on_step=None):
        """Block after block with an exact KV cache: only for a block-diffusion model (cfg.block_size)."""
        from jetson_dllm.sampler import SpecialIds
        from train_host.bd3_generate import generate_blocks_torch as generate_blocks

        tok = self.tokenizer
        special = SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id)
        return generate_blocks(self.model, prompt_ids, max_new, special, sampler, num_samples=num_samples, k=self.topk, on_step=on_step)

    def memory(self) -> dict[str, int]:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        mem = {"weights": weights}
        if self.device == "cuda":
            mem["device_used"] = int(self.torch.cuda.memory_allocated())
        return mem

    def close(self) -> None:
        self.model = None


def runner_from_checkpoint(checkpoint: str, device: str = "cpu", topk: int = DEFAULT_TOPK, threads: int = 0) -> TorchRunner:
    """A checkpoint (a run folder's best, or a checkpoints/step_* folder) on torch."""
    _torch()
    from train_host.checkpoint import load_model

    model, tokenizer, config = load_model(checkpoint, device=device)
    return TorchRunner(model, tokenizer, device=device, topk=topk, threads=threads, source=config["path"], metrics=config.get("metrics"))
