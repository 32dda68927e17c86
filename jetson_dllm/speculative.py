"""Speculative decoding: an AR parent (the verifier) writes the text, a left-to-right diffusion model with its
tokenizer (the drafter) proposes the next tokens, and the parent checks a whole proposal in one verify call.

A round: the drafter proposes up to `most` tokens d1..dk after the text (its family's drafter, e.g.
jetson_dllm.families.bd3_draft); the parent reads [last, d1..dk] in one verify call at the position of the text's
last token (not yet read), which gives its distribution p_i after each of them; d_i is accepted with probability
p_{i-1}(d_i) (greedy: when it is the parent's top-1), and at the first rejection the parent's own token is drawn
from p_{i-1} with d_i removed and renormalised (greedy: its top-1); if all are accepted, its next token comes from
p_k. For a proposal that is one token per position (a greedy drafter) this is the rule that keeps the output
distribution the parent's alone, exactly: every token is the parent's, from the same top-K distribution (temperature,
top-k, top-p) its own decoding samples from. Rejected drafts leave nothing behind: the verifier's next call starts
at the first position after the accepted tokens (`valid_len`), so their keys are masked out and overwritten; the
drafter only ever caches accepted text.

Counted per generation: rounds, drafted and accepted tokens, the parent's verify calls and prefill calls, the
drafter's calls, and network calls per generated token for both models together (the prompt's prefill apart).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.families.ar import prefill_calls, prefill_of
from jetson_dllm.families.common import Generated, Served, check_context, left_to_right_ids, left_to_right_request
from jetson_dllm.runners.calls import DRAFT, MAIN, Call, drive
from jetson_dllm.sampler import SamplerConfig, candidate_distribution


@dataclass
class SpeculativeResult:
    tokens: np.ndarray  # (1, prompt + generated) int32
    new_tokens: int
    rounds: int  # verify calls after the prompt
    drafted: int  # tokens the drafter proposed
    accepted: int  # of them, tokens the parent accepted
    prefill_calls: int  # the parent's calls reading the prompt
    drafter_calls: int  # the drafter's network calls (its denoising calls and cache passes)
    seconds: float
    verify_s: float = 0.0
    drafter_s: float = 0.0
    accepted_at: list[int] = field(default_factory=list)  # accepted tokens per round
    drafted_at: list[int] = field(default_factory=list)  # drafted tokens per round
    starts: list[int] = field(default_factory=list)  # the text's length (prompt and generated) when each round began

    @property
    def calls_per_token(self) -> float:
        """Network calls per generated token, both models, the prompt's prefill apart."""
        return (self.rounds + self.drafter_calls) / max(self.new_tokens, 1)


@dataclass
class SpeculativeGeneration(Generated):
    """What a parent wrote with a drafter (`result`: a SpeculativeResult)."""

    drafter: str = ""

    def to_json(self) -> dict:
        r = self.result
        return {"texts": self.texts, "tokens": r.tokens.tolist(), "backend": self.backend, "drafter": self.drafter,
                "new_tokens": r.new_tokens, "rounds": r.rounds, "drafted": r.drafted, "accepted": r.accepted,
                "accepted_per_round": r.accepted / max(r.rounds, 1), "verify_calls": r.rounds, "prefill_calls": r.prefill_calls,
                "drafter_calls": r.drafter_calls, "calls_per_token": r.calls_per_token, "total_ms": r.seconds * 1e3,
                "verify_ms": r.verify_s * 1e3, "drafter_ms": r.drafter_s * 1e3, "tokens_per_s": r.new_tokens / max(r.seconds, 1e-9)}

    def summary(self) -> str:
        r = self.result
        return (f"speculative ({self.drafter} drafting): {r.new_tokens} tokens in {r.rounds} rounds, {r.accepted} of {r.drafted} drafted "
                f"tokens accepted ({r.accepted / max(r.rounds, 1):.2f} a round), {r.calls_per_token:.2f} network calls per token "
                f"(both models), {r.seconds * 1e3:.0f} ms")


def parent_distribution(lp: np.ndarray, ids: np.ndarray, banned: tuple[int, ...], sampler: SamplerConfig) -> np.ndarray:
    """The parent's sampling distribution over one position's top-K `ids` (sorted log-probabilities `lp`), as its own
    decoding samples (jetson_dllm.families.ar): `banned` ids never, greedy a point mass on the best of the rest."""
    lp = np.where(np.isin(ids, banned), -np.inf, lp) if banned else lp
    if sampler.temperature == 0:
        probs = np.zeros(len(ids))
        probs[int(np.argmax(lp))] = 1.0
        return probs
    order = np.argsort(-lp, kind="stable")
    scores = np.full(len(ids), -np.inf)
    scores[order] = candidate_distribution(lp[order][None], sampler.temperature, sampler.top_k, sampler.top_p)[0]
    probs = np.exp(scores - scores.max())
    return probs / probs.sum()


def accept(draft: int, ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> tuple[bool, int]:
    """(accepted, the token written): `draft` with probability p(draft) (0 outside the top-K), else a token drawn
    from p with the draft removed and renormalised. Exact for a point-mass proposal: the token written has
    distribution p."""
    hit = ids == draft
    p_draft = float(probs[hit].sum())
    if p_draft > 0 and (p_draft >= 1.0 or rng.random() < p_draft):
        return True, draft
    rest = np.where(hit, 0.0, probs)
    return False, int(ids[rng.choice(len(ids), p=rest / rest.sum())])


def draw(ids: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> int:
    return int(ids[rng.choice(len(ids), p=probs)])


def speculative_calls(prompt: list[int], max_new: int, bos: int, eot: int, max_len: int, drafter, sampler: SamplerConfig,
                      prefill: int, stop_at_end: bool = True, pad: int = 0,
                      on_token: Callable[[np.ndarray], None] | None = None) -> Generator[Call, dict, SpeculativeResult]:
    """The parent's continuation of `prompt` (one row) as MAIN's verify calls and the drafter's DRAFT calls
    (`drafter.draft(text, most)`: a generator of calls returning up to `most` proposed tokens; `drafter.tally`: its
    calls, commits and seconds). The prompt (after the start token) is read by verify calls of up to `prefill` tokens.
    Ends at end-of-text (`stop_at_end=False`: end-of-text and padding banned, exactly `max_new` tokens)."""
    max_new = min(max_new, max_len - len(prompt))
    if max_new <= 0:
        raise DllmError(f"the prompt is {len(prompt)} tokens; the model takes {max_len}")
    t0, rng, banned = time.perf_counter(), np.random.default_rng(sampler.seed), () if stop_at_end else (eot, pad)
    text = [bos, *prompt]
    before, times = (drafter.tally.calls + drafter.tally.commits, drafter.tally.seconds), []
    read: list[float] = []  # the prefill's calls
    yield from prefill_calls(text[:-1], 1, max(prefill, 1), read)
    new: list[int] = []
    rounds = drafted = accepted = 0
    accepted_at, drafted_at, starts = [], [], []
    while len(new) < max_new and not (stop_at_end and new and new[-1] == eot):
        at = len(text) - 1 + len(new)  # the last token's position: read by this round's call
        most = min(max_new - len(new) - 1, max_len - at - 1)  # room for the parent's own token after the drafts
        drafts = (yield from drafter.draft(prompt + new, most)) if most > 0 else []
        starts.append(len(prompt) + len(new))
        drafted_at.append(len(drafts))
        s = time.perf_counter()
        feeds = {"tokens": np.asarray([[(text + new)[-1], *drafts]], np.int32), "valid_len": np.int32(at)}
        got = yield Call("verify", feeds, model=MAIN)
        times.append(time.perf_counter() - s)
        lp, ids = got["topk_logprobs"][0], got["topk_ids"][0]
        rounds, drafted = rounds + 1, drafted + len(drafts)
        took = 0
        for i, d in enumerate(drafts):
            ok, token = accept(d, ids[i], parent_distribution(lp[i], ids[i], banned, sampler), rng)
            new.append(token)
            took += ok
            if not ok or (stop_at_end and token == eot):
                break
        else:
            new.append(draw(ids[len(drafts)], parent_distribution(lp[len(drafts)], ids[len(drafts)], banned, sampler), rng))
        accepted += took
        accepted_at.append(took)
        if stop_at_end and eot in new:
            new = new[: new.index(eot) + 1]
        if on_token is not None:
            on_token(np.asarray([prompt + new], np.int32))
    tally = drafter.tally
    return SpeculativeResult(np.asarray([prompt + new], np.int32), len(new), rounds, drafted, accepted, len(read),
                             tally.calls + tally.commits - before[0], time.perf_counter() - t0, sum(times),
                             tally.seconds - before[1], accepted_at, drafted_at, starts)


DRAFT_STEPS = 1  # the drafter's denoising calls a round, by default (docs/speculative.md: what more steps buy)


def check_pair(verifier, drafter) -> None:
    """A parent that can verify (the verify graph) and a drafter of a family that drafts, with the same tokenizer."""
    if "verify" not in verifier.graphs:
        what = family_of(verifier.cfg).title
        raise DllmError(f"the model to verify with ({what}) has no verify graph: the parent must be an autoregressive model "
                        "exported since the graph came (re-export it with dllm export), or its training run")
    if not family_of(drafter.cfg).drafter:
        raise DllmError(f"--draft is a {family_of(drafter.cfg).title} model, which cannot draft; a left-to-right diffusion model "
                        "(block diffusion, e.g. one adapted from this parent with dllm adapt) can")
    a, b = verifier.tokenizer, drafter.tokenizer
    if a.tok.to_str() != b.tok.to_str() or (a.bos_id, a.eot_id, a.pad_id) != (b.bos_id, b.eot_id, b.pad_id):
        raise DllmError("the drafter's tokenizer is not the parent's: a drafter proposes the parent's own tokens "
                        "(adapt it from this parent, or train it with the parent's tokenizer)")


def open_drafter(verifier, drafter, steps: int):
    """The drafter object of a drafter runner (its family's `drafter_for`), checked against the parent."""
    check_pair(verifier, drafter)
    return importlib.import_module(family_of(drafter.cfg).drafter).drafter_for(drafter, steps)


def speculative_loop(verifier, drafter, draft_steps: int, ids: list[int], max_new: int, sampler: SamplerConfig, stop_at_end: bool = True,
                     on_token=None):
    """`speculative_calls` for a parent runner and a drafter runner (checked as a pair; the drafter object made by its
    family): the parent's special ids, context and prefill. `drive({MAIN: verifier, DRAFT: drafter}, ...)` runs it."""
    tok = verifier.tokenizer
    return speculative_calls(ids, max_new, tok.bos_id, tok.eot_id, verifier.cfg.canvas_len, open_drafter(verifier, drafter, draft_steps),
                             sampler, prefill_of(verifier), stop_at_end, tok.pad_id, on_token)


def complete(verifier, drafter, prompt: str, length: int = 0, sampler: SamplerConfig | None = None, draft_steps: int = DRAFT_STEPS,
             stop_at_end: bool = True, on_token=None) -> SpeculativeGeneration:
    """`prompt` continued by the parent `verifier` (a runner with the verify graph) with `drafter` (a runner of a
    family that drafts, the parent's tokenizer) proposing: up to `length` tokens (0: the context), one sample."""
    sampler = (sampler or SamplerConfig()).validate()
    check_pair(verifier, drafter)
    ids = left_to_right_ids(verifier, prompt, "speculative decoding")
    check_context(verifier, [verifier.tokenizer.bos_id, *ids], length and length - 1)
    loop = speculative_loop(verifier, drafter, draft_steps, ids, length or verifier.cfg.canvas_len - len(ids), sampler, stop_at_end, on_token)
    r = drive({MAIN: verifier, DRAFT: drafter}, loop)
    return SpeculativeGeneration([verifier.tokenizer.decode(row) for row in r.tokens], r, verifier.name, drafter.name)


def serve_calls(verifier, drafter, draft_steps: int, prompt: str, max_tokens: int, n: int, sampler: SamplerConfig, on_step=None) -> Served:
    """A server request written speculatively: `max_tokens` after the prompt, the parent's verify calls and the
    drafter's calls (each named for its model) over the request's rows of both pools; `on_step(text so far, None)`
    sees the text after every round. One sample per request."""
    if n != 1:
        raise DllmError("n: speculative decoding writes one sample per request (send n requests)", option="n")
    check_pair(verifier, drafter)
    ids = left_to_right_ids(verifier, prompt, "speculative decoding")
    fixed = left_to_right_request(verifier, ids, max_tokens, 1)
    return Served(speculative_loop(verifier, drafter, draft_steps, ids, max_tokens, sampler,
                                   on_token=None if on_step is None else (lambda view: on_step(view, None))), fixed)


SPECULATIVE_REFUSES = {"num_samples": "--num-samples (one sample at a time)", "save_canvases": "--save-canvases",
                       "condition": "--condition", "live": "--live (the text is printed when done)"}


def run_speculative(parent, draft, prompt: str, length: int, sampler: SamplerConfig, draft_steps: int, given: set[str], **open_args):
    """`dllm run PARENT --draft CHILD`: both opened (`open_args`: backend, precision, device, providers, threads), the
    parent's options checked (the sampler options an AR model does not use refused, and what speculative decoding does
    not do), then `complete`."""
    from jetson_dllm.families import check_options
    from jetson_dllm.generate import open_model

    if draft is None:
        raise DllmError("--draft-steps is for speculative decoding: give the drafter with --draft")
    refused = [flag for name, flag in SPECULATIVE_REFUSES.items() if name in given]
    if refused:
        raise DllmError(f"{refused[0]} does not apply with --draft (speculative decoding writes one sample, the parent's); leave it out")
    with open_model(parent, **open_args) as verifier:
        check_options(family_of(verifier.cfg), given)  # the parent's: an AR model takes no diffusion options
        with open_model(draft, **open_args) as drafter:
            return complete(verifier, drafter, prompt, length, sampler, draft_steps)
