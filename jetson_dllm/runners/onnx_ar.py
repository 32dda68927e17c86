"""The onnxruntime runner of the autoregressive baseline's bundle: its decode graph over a KV cache allocated once.

Buffers and I/O binding as for block diffusion (onnx_blocks.Bound, a block of one token): each call reads one
token, returns the next one's top-K and writes the read token's keys and values into the cache in place. The
loop is jetson_dllm.decode, the same on every runtime; sampling draws from the graph's top-K head (K = 64 by
default; the torch runner draws from the best 256).
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.bundle import Bundle
from jetson_dllm.decode import DecodeResult, decode_tokens
from jetson_dllm.errors import DllmError
from jetson_dllm.manifests import member
from jetson_dllm.runners import COMMIT_OUTPUTS, SAMPLING_OUTPUTS, RunnerBase
from jetson_dllm.runners.onnx_blocks import Bound


class ArOnnxRunner(RunnerBase):
    def __init__(self, bundle: Bundle, session, precision: str = "fp32"):
        self.bundle, self.session, self.precision = bundle, session, precision
        self.cfg, self.tokenizer, self.topk = bundle.config, bundle.tokenizer(), bundle.topk
        self.canvas_lengths = bundle.canvas_lengths
        self.metrics = bundle.manifest.get("source", {}).get("metrics", {})
        self.name = f"onnx-{session.get_providers()[0].replace('ExecutionProvider', '').lower()}-ar"
        self.buffers: dict[int, Bound] = {}

    def step(self, tokens: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
        batch = tokens.shape[0]
        if batch not in self.buffers:
            self.buffers = {batch: Bound({"decode": (self.session, SAMPLING_OUTPUTS + COMMIT_OUTPUTS)}, self.cfg, batch, self.topk, 1)}
        bound = self.buffers[batch]
        bound.load(tokens, valid)
        self.session.run_with_iobinding(bound.bindings["decode"])
        bound.write_new(valid)
        return bound.out["topk_logprobs"].copy(), bound.out["topk_ids"].copy()

    def generate_autoregressive(self, prompt_ids: list[int], max_new: int, num_samples: int, temperature: float,
                                top_k: int, top_p: float, seed: int, stop_at_end: bool = True) -> DecodeResult:
        tok = self.tokenizer
        return decode_tokens(self.step, prompt_ids, max_new, tok.eot_id, tok.eot_id, tok.pad_id, self.cfg.canvas_len,
                             num_samples, temperature, top_k, top_p, seed, stop_at_end)

    def run(self, feeds, outputs=SAMPLING_OUTPUTS):
        raise DllmError("the autoregressive baseline runs token by token (generate_autoregressive), not on a whole canvas")

    def memory(self) -> dict[str, int]:
        path = member(self.bundle.path, self.bundle.manifest["precisions"][self.precision]["file"])
        return {"weights": path.stat().st_size, "cache": sum(b.k.nbytes + b.v.nbytes for b in self.buffers.values())}

    def close(self) -> None:
        self.buffers.clear()
        self.session = None
