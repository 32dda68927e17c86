"""The onnxruntime runner of a block-diffusion bundle: the block-step and commit graphs over a cache allocated once.

Every buffer is allocated once per batch size and bound to both sessions through I/O binding: the cache
(n_layer, batch, heads, max_len, head_dim), the block's tokens and valid length, the top-K outputs and the commit's
new keys and values. A call writes the block into its bound buffer and runs; a commit's keys and values are then
copied into the cache at the valid length, in place. Nothing is allocated or converted between steps. The buffers are
host memory: on the CPU provider that is where the graphs run; with the CUDA provider onnxruntime would copy the
bound cache to the GPU on each call, which is why the GPU path for block diffusion is TensorRT (trt_blocks.py).
"""

from __future__ import annotations

import numpy as np

from jetson_dllm.blocks import BlockResult, generate_blocks
from jetson_dllm.bundle import Bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.manifests import member
from jetson_dllm.runners import COMMIT_OUTPUTS, SAMPLING_OUTPUTS, RunnerBase
from jetson_dllm.sampler import SamplerConfig, SpecialIds


class Bound:
    """One batch size's buffers, bound once to each session (CPU memory): the cache, the block's tokens (`block`
    of them) and valid length, the top-K outputs and the new keys and values. `sessions`: name -> (session, outputs)."""

    def __init__(self, sessions: dict, cfg, batch: int, k: int, block: int):
        cache = (cfg.n_layer, batch, cfg.n_head, cfg.canvas_len, cfg.head_dim)
        new = (cfg.n_layer, batch, cfg.n_head, block, cfg.head_dim)
        self.k, self.v = np.zeros(cache, np.float32), np.zeros(cache, np.float32)
        self.tokens, self.valid = np.zeros((batch, block), np.int32), np.zeros((), np.int32)
        self.prev = np.zeros((batch, block), np.int32)  # the commit step's finished block
        self.out = {"topk_logprobs": np.zeros((batch, block, k), np.float32), "topk_ids": np.zeros((batch, block, k), np.int32),
                    "k_new": np.zeros(new, np.float32), "v_new": np.zeros(new, np.float32)}
        inputs = {"tokens": self.tokens, "k_cache": self.k, "v_cache": self.v, "valid_len": self.valid}
        self.bindings = {name: self._binding(session, {"prev_tokens": self.prev, **inputs} if name == "commit_step" else inputs, outputs)
                         for name, (session, outputs) in sessions.items()}

    def _binding(self, session, inputs: dict, outputs: tuple[str, ...]):
        io = session.io_binding()
        for name, a in inputs.items():
            io.bind_input(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        for name in outputs:
            a = self.out[name]
            io.bind_output(name, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
        return io

    def load(self, tokens: np.ndarray, valid: int) -> None:
        np.copyto(self.tokens, tokens, casting="unsafe")
        self.valid[...] = valid

    def write_new(self, valid: int) -> None:
        """The new keys and values into the cache at `valid`, in place."""
        b = self.tokens.shape[1]
        self.k[:, :, :, valid : valid + b] = self.out["k_new"]
        self.v[:, :, :, valid : valid + b] = self.out["v_new"]


class BlockOnnxRunner(RunnerBase):
    def __init__(self, bundle: Bundle, step_session, commit_session, precision: str = "fp32", commit_step_session=None):
        self.bundle, self.step_session, self.commit_session = bundle, step_session, commit_session
        self.commit_step_session = commit_step_session  # the commit folded into the next block's first step, when exported
        self.cfg, self.tokenizer, self.precision = bundle.config, bundle.tokenizer(), precision
        self.topk, self.canvas_lengths = bundle.topk, bundle.canvas_lengths
        self.metrics = bundle.manifest.get("source", {}).get("metrics", {})
        self.name = f"onnx-{step_session.get_providers()[0].replace('ExecutionProvider', '').lower()}-bd3"
        self.buffers: dict[int, Bound] = {}  # batch -> buffers and bindings, allocated once

    def _bound(self, batch: int) -> Bound:
        if batch not in self.buffers:
            sessions = {"step": (self.step_session, SAMPLING_OUTPUTS), "commit": (self.commit_session, COMMIT_OUTPUTS)}
            if self.commit_step_session is not None:
                sessions["commit_step"] = (self.commit_step_session, SAMPLING_OUTPUTS + COMMIT_OUTPUTS)
            self.buffers = {batch: Bound(sessions, self.cfg, batch, self.topk, self.cfg.block_size)}
        return self.buffers[batch]

    def step(self, tokens: np.ndarray, valid: int) -> tuple[np.ndarray, np.ndarray]:
        bound = self._bound(tokens.shape[0])
        bound.load(tokens, valid)
        self.step_session.run_with_iobinding(bound.bindings["step"])
        return bound.out["topk_logprobs"].copy(), bound.out["topk_ids"].copy()

    def commit(self, tokens: np.ndarray, valid: int) -> None:
        bound = self._bound(tokens.shape[0])
        bound.load(tokens, valid)
        self.commit_session.run_with_iobinding(bound.bindings["commit"])
        bound.write_new(valid)

    def commit_step(self, prev: np.ndarray, tokens: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """The finished block at `start` committed and the next block stepped, in one call."""
        bound = self._bound(tokens.shape[0])
        bound.load(tokens, start)
        np.copyto(bound.prev, prev, casting="unsafe")
        self.commit_step_session.run_with_iobinding(bound.bindings["commit_step"])
        bound.write_new(start)
        return bound.out["topk_logprobs"].copy(), bound.out["topk_ids"].copy()

    def generate_blockwise(self, prompt_ids: list[int], max_new: int, num_samples: int, sampler: SamplerConfig,
                           on_step=None) -> BlockResult:
        tok = self.tokenizer
        special = SpecialIds(tok.mask_id, tok.eot_id, tok.pad_id)
        fold = self.commit_step if self.commit_step_session is not None else None
        return generate_blocks(self.step, self.commit, prompt_ids, max_new, special, sampler, self.cfg.block_size,
                               self.cfg.canvas_len, num_samples, on_step, fold)

    def run(self, feeds, outputs=("topk_logprobs", "topk_ids")):
        raise DllmError("a block-diffusion bundle runs block by block (generate_blockwise), not on a whole canvas")

    def memory(self) -> dict[str, int]:
        files = [member(self.bundle.path, e) for e in self.bundle.manifest["precisions"][self.precision].values()]
        cache = sum(b.k.nbytes + b.v.nbytes for b in self.buffers.values())
        return {"weights": sum(f.stat().st_size for f in files), "cache": cache}

    def close(self) -> None:
        self.buffers.clear()
        self.step_session = self.commit_session = self.commit_step_session = None
