"""The torch backend: runs a training checkpoint with the same heads the exported graph has."""

from __future__ import annotations

import numpy as np

from jetson_dllm.backends import SAMPLING_OUTPUTS, check_tokens
from jetson_dllm.errors import DllmError

DEFAULT_TOPK = 64


class TorchBackend:
    def __init__(self, checkpoint: str, device: str = "cpu", topk: int = DEFAULT_TOPK, threads: int = 0, model=None):
        try:
            import torch
        except ImportError:
            raise DllmError("the torch backend needs torch: pip install 'jetson-dllm[train]', or use --backend onnx / trt with a bundle") from None
        from train_host.checkpoint import load_model

        if device == "cuda" and not torch.cuda.is_available():
            raise DllmError("--device cuda asked for, but torch sees no CUDA GPU")
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if model is None:
            self.model, self.tokenizer, self.config = load_model(checkpoint, device=device)
        else:  # an in-memory model (tests, bench)
            self.model, self.tokenizer, self.config = model.to(device).eval(), None, {"path": "<memory>"}
        cfg = self.model.cfg
        if not 0 < topk <= min(cfg.vocab_size, 3839):
            raise DllmError(f"top-K must be in 1..{min(cfg.vocab_size, 3839)}, got {topk}")
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

    def memory(self) -> dict[str, int]:
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        mem = {"weights": weights}
        if self.device == "cuda":
            mem["device"] = int(self.torch.cuda.memory_allocated())
        return mem

    def close(self) -> None:
        self.model = None
