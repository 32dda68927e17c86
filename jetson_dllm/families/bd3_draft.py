"""Block diffusion as the drafter of speculative decoding (jetson_dllm.speculative): a left-to-right block model with
its parent's tokenizer proposes the rest of the aligned block the text has reached, in `steps` denoising calls,
greedily; its parent checks the proposal in one verify call.

The drafter keeps its own exact cache of whole blocks, and only of final text: the text the parent accepted. The
block the text is inside is never committed while it is partial: its accepted tokens are fixed tokens of the next
noised block (as a prompt's tail is in `block_calls`); once the text passes a block's end, that block is committed,
folded into the next denoising call where the runner has the commit-step graph. Nothing the parent rejects ever
reaches the drafter's cache, so there is nothing to roll back.

A drafter is greedy (its proposal is one token per position, a point mass): the acceptance rule of
jetson_dllm.speculative is exact for it, whatever it proposes.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.families.bd3 import BlockModel, _block_canvas, _commit, _denoise, _First, _Rows
from jetson_dllm.runners.calls import DRAFT, Call, on_model
from jetson_dllm.sampler import SamplerConfig, sample_steps


@dataclass
class DraftTally:
    """What a drafter has spent: denoising calls, cache passes (commits on their own; folded ones are in `calls`),
    and the seconds inside its calls and its sampler."""

    calls: int = 0
    commits: int = 0
    seconds: float = 0.0


class BlockDrafter:
    """Proposals of a block-diffusion model (`model`, BlockModel.of its runner) in `steps` calls a round."""

    def __init__(self, model: BlockModel, steps: int):
        if model.cond_len:
            raise DllmError("a conditional block-diffusion model cannot draft: its blocks are written under a condition the parent never sees")
        if not 1 <= steps <= model.block:
            raise DllmError(f"--draft-steps must be in 1..{model.block} (the drafter's block), got {steps}")
        self.model, self.steps = model, steps
        self.sampler = SamplerConfig(steps=steps, temperature=0.0).validate()  # greedy: a point-mass proposal
        self.shifted = model.shift_bos is not None
        self.first = _First(self.shifted)
        self.rows = _Rows(1, self.sampler, {}, model.topk, self.shifted)
        self.committed = 0  # whole blocks in the drafter's cache (all of them final text)
        self.tally = DraftTally()

    def draft(self, seq: list[int], most: int) -> Generator[Call, dict, list[int]]:
        """Up to `most` tokens to follow `seq` (the prompt and the accepted text: final), as DRAFT calls: the rest of
        the aligned block `seq` has reached; [] when there is no room (the drafter's context is full)."""
        t0 = time.perf_counter()
        got = yield from on_model(self._draft(seq, most), DRAFT)
        self.tally.seconds += time.perf_counter() - t0
        return got

    def _draft(self, seq: list[int], most: int) -> Generator[Call, dict, list[int]]:
        m, special = self.model, self.model.special
        text = [m.shift_bos, *seq] if self.shifted else list(seq)
        n, block = len(text), m.block
        j = n // block
        s, e = j * block, min((j + 1) * block, m.max_len)
        if most <= 0 or n >= e:
            return []
        out = np.full((1, e), special.pad, dtype=np.int32)
        out[0, :n] = text
        pending = None
        for b in range(self.committed, j):  # blocks the accepted text has completed since the last round
            chunk = out[:, b * block : (b + 1) * block].copy()
            if m.fold and b == j - 1:
                pending = (chunk, b * block)  # folded into this round's first denoising call
            else:
                yield from self._counted(_commit(chunk, b * block, self.rows, self.first, []), commit=True)
        self.committed = j
        canvas, fixed = _block_canvas(out, s, e, n, block, special)
        steps = sample_steps(canvas, fixed, special, self.sampler)
        result = yield from self._counted(_denoise(steps, s, pending, self.first, self.rows, m.soft_k, special.mask))
        if pending is not None and not result.evaluations:
            yield from self._counted(_commit(*pending, self.rows, self.first, []), commit=True)
        proposal = [int(t) for t in result.tokens[0, n - s : e - s][:most]]
        if special.eot in proposal:  # nothing after the end is worth a verifier's position
            proposal = proposal[: proposal.index(special.eot) + 1]
        return proposal

    def _counted(self, loop, commit: bool = False):
        try:
            call = next(loop)
            while True:
                self.tally.calls += not commit
                self.tally.commits += commit
                call = loop.send((yield call))
        except StopIteration as done:
            return done.value


def drafter_for(runner, steps: int) -> BlockDrafter:
    """A block-diffusion runner as a drafter of `steps` denoising calls a round."""
    return BlockDrafter(BlockModel.of(runner), steps)
