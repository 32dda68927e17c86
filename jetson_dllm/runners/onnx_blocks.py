"""The onnxruntime runner of a block-diffusion bundle: the block-step and commit graphs over a cache allocated once.

The cache (n_layer, batch, heads, max_len, head_dim) lives in host buffers handed to every call; a commit's new keys
and values are written into them in place at the valid length, so nothing is reallocated between steps.
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.blocks import BlockResult, generate_blocks
from jetson_dllm.bundle import Bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.manifests import member
from jetson_dllm.runners import RunnerBase
from jetson_dllm.sampler import SamplerConfig, SpecialIds


class BlockOnnxRunner(RunnerBase):
    def __init__(self, bundle: Bundle, step_session, commit_session, precision: str = "fp32"):
        self.bundle, self.step_session, self.commit_session = bundle, step_session, commit_session
        self.cfg, self.tokenizer, self.precision = bundle.config, bundle.tokenizer(), precision
        self.topk, self.canvas_lengths = bundle.topk, bundle.canvas_lengths
        self.metrics = bundle.manifest.get("source", {}).get("metrics", {})
        self.name = f"onnx-{step_session.get_providers()[0].replace('ExecutionProvider', '').lower()}-bd3"
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch -> (keys, values), allocated once

    def _cache(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if batch not in self.cache:
            c = self.cfg
            shape = (c.n_layer, batch, c.n_head, c.canvas_len, c.head_dim)
            self.cache = {batch: (np.zeros(shape, np.float32), np.zeros(shape, np.float32))}
        return self.cache[batch]

    def step(self, tokens: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
        k, v = self._cache(tokens.shape[0])
        lp, ids = self.step_session.run(None, {"tokens": tokens.astype(np.int32), "k_cache": k, "v_cache": v,
                                               "valid_len": np.array(valid, np.int32)})
        return lp, ids

    def commit(self, tokens: np.ndarray, valid: int) -> None:
        k, v = self._cache(tokens.shape[0])
        k_new, v_new = self.commit_session.run(None, {"tokens": tokens.astype(np.int32), "k_cache": k, "v_cache": v,
                                                      "valid_len": np.array(valid, np.int32)})
        b = tokens.shape[1]
        k[:, :, :, valid : valid + b], v[:, :, :, valid : valid + b] = k_new, v_new  # in place

    def generate_blockwise(self, prompt_ids: list[int], max_new: int, num_samples: int, sampler: SamplerConfig,
                           on_step=None) -> BlockResult:
        tok = self.tokenizer
        special = SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id)
        return generate_blocks(self.step, self.commit, prompt_ids, max_new, special, sampler, self.cfg.block_size,
                               self.cfg.canvas_len, num_samples, on_step)

    def run(self, feeds, outputs=("topk_logprobs", "topk_ids")):
        raise DllmError("a block-diffusion bundle runs block by block (generate_blockwise), not on a whole canvas")

    def memory(self) -> dict[str, int]:
        files = [member(self.bundle.path, e) for e in self.bundle.manifest["precisions"][self.precision].values()]
        cache = sum(a.nbytes for pair in self.cache.values() for a in pair)
        return {"weights": sum(f.stat().st_size for f in files), "cache": cache}

    def close(self) -> None:
        self.cache.clear()
        self.step_session = self.commit_session = None
