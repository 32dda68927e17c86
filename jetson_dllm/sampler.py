"""The sampler: one numpy loop that unmasks a canvas, identical for every backend.

Each step runs the network on the canvas (unless the canvas is unchanged since the last run, in which
case the last outputs are reused), draws a candidate token for every masked position from the top-K
head, scores the candidates, and commits some of them:

    confidence  LLaDA low-confidence remasking: commit the n most probable candidates
    margin      ... ordered by top-1 minus top-2 probability
    entropy     ... ordered by low entropy of the (top-K) distribution
    threshold   Fast-dLLM parallel decoding: commit every candidate above --threshold (and at least n)
    eb          EB-Sampler (arXiv 2505.24857): the most confident candidates while their summed entropy less the
                largest one stays within --eb-bound nats (and at least n)
    ancestral   MDLM: commit each masked position with the schedule's probability for the step

n is what the step budget requires: ceil(masked left / steps left), so a run always finishes within
its steps, and the threshold strategy can only finish sooner. With `span`, the canvas is filled span
by span, left to right (semi-autoregressive), the steps shared between the spans that need them; spans
count from the first position to generate.
Once an end-of-text (or padding) token is committed, every later free position becomes padding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from jetson_dllm.errors import DllmError, check_choice, check_range

MAX_STEPS = 100_000  # more network calls than any canvas has positions; a larger number is a typo
STRATEGIES = ("confidence", "margin", "entropy", "threshold", "eb", "ancestral")
GUIDANCE_SCHEDULES = ("constant", "late", "ramp")  # jetson_dllm.guidance.weight_at
MAX_GUIDANCE = 100.0
NEG_INF = np.float32(-np.inf)


@dataclass
class SamplerConfig:
    """How to unmask. temperature 0 means greedy (the most probable token)."""

    steps: int = 64
    strategy: str = "confidence"
    threshold: float = 0.9
    eb_bound: float = 0.1  # eb: the entropy (nats) a step may commit in all
    span: int = 0  # semi-autoregressive spans (LLaDA's blocks; "block" is block diffusion's word); 0: the whole canvas
    temperature: float = 0.0
    top_k: int = 0  # 0: the whole head
    top_p: float = 1.0
    seed: int = 0
    deadline_ms: float = 0.0  # 0: no deadline
    allow_end: bool = True  # False: fixed-length generation (no end-of-text), as benchmarks run
    defer_twins: bool = True  # two neighbours picked in one step with the same token: commit one, re-predict the other
    eta: float = 0.0  # continuous diffusion: 0 = DDIM (deterministic), 1 = DDPM (the posterior's full noise)
    clamp: bool = False  # continuous diffusion: step with the top-1 token's latent instead of the expected one
    guidance: float = 0.0  # classifier-free guidance weight toward the prompt (jetson_dllm.guidance); 0: none
    guidance_schedule: str = "constant"  # how the weight runs over the steps (GUIDANCE_SCHEDULES)

    def validate(self) -> SamplerConfig:
        """Every setting's range or choices (KNOBS; NaN refused); returns the config."""
        for knob in KNOBS:
            value = getattr(self, knob.name)
            if knob.choices:
                check_choice(knob.flag, value, knob.choices)
            elif knob.low is not None or knob.high is not None:
                check_range(knob.flag, value, knob.low, knob.high, low_open=knob.low_open)
        return self

    @classmethod
    def from_values(cls, values, **fixed) -> SamplerConfig:
        """A config from any object or mapping that carries knobs by name (a request's fields, a command's
        options): the knobs it has, then `fixed`; validated."""
        get = values.get if isinstance(values, dict) else lambda name, default=None: getattr(values, name, default)
        given = {k.name: get(k.name) for k in KNOBS if get(k.name) is not None}
        return cls(**(given | fixed)).validate()


@dataclass(frozen=True)
class Knob:
    """One sampler setting: its name (SamplerConfig's field, the server's request field), its range or choices
    (`low_open`: the low end excluded) and what it does. The one table of them: validation, `dllm run`, `dllm serve`'s
    request schema and the families' option lists read it."""

    name: str
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KNOBS = (
    Knob("steps", "denoising steps (network evaluations at most)", 1, MAX_STEPS),
    Knob("strategy", "which masked positions to commit first", choices=STRATEGIES),
    Knob("threshold", "confidence threshold of the threshold strategy", 0, 1, low_open=True),
    Knob("eb_bound", "strategy eb: the entropy (nats) one step may commit", 0, 100),
    Knob("span", "semi-autoregressive span length; 0 = the whole canvas", 0),
    Knob("temperature", "0 = greedy", 0, 100),
    Knob("top_k", "sample among the k best tokens; 0 = all of the head", 0),
    Knob("top_p", "nucleus sampling mass", 0, 1, low_open=True),
    Knob("seed", "the sampler's random seed", 0),
    Knob("deadline_ms", "commit the best tokens after this long; 0 = none", 0),
    Knob("defer_twins", "neighbours picked in one step with the same token: commit one, re-predict the other"),
    Knob("eta", "continuous diffusion: 0 = DDIM, 1 = DDPM", 0, 1),
    Knob("clamp", "continuous diffusion: step with the top-1 token's latent (clamping)"),
    Knob("guidance", "classifier-free guidance toward the prompt (mdlm) or a conditional model's condition (mdlm, bd3)", 0, MAX_GUIDANCE),
    Knob("guidance_schedule", "guidance over the steps", choices=GUIDANCE_SCHEDULES),
)
KNOB = {k.name: k for k in KNOBS}


@dataclass
class SpecialIds:
    mask: int
    eot: int
    pad: int


@dataclass
class Step:
    """What one step did, for the live view and the --json timings."""

    index: int
    evaluated: bool
    committed: np.ndarray  # (B, T) bool, newly committed this step
    network_ms: float
    sampler_ms: float
    weight: np.ndarray | None = None  # (B, T) SDD: each position's top candidate's probability (the live view shades by it)


@dataclass
class SampleResult:
    tokens: np.ndarray  # (B, T) int32
    steps: int  # steps taken
    evaluations: int  # network evaluations actually run
    deadline_hit: bool
    network_s: float
    sampler_s: float
    history: list[Step] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.network_s + self.sampler_s


def candidate_distribution(logprobs: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Sampling logits over the head's top-K (sorted descending) after temperature, top-k and top-p. (..., K)"""
    logits = logprobs / max(temperature, 1e-6)
    if top_k and top_k < logits.shape[-1]:
        logits = logits.copy()
        logits[..., top_k:] = NEG_INF
    if top_p < 1.0:
        probs = np.exp(logits - logits[..., :1])
        probs /= probs.sum(-1, keepdims=True)
        before = np.cumsum(probs, -1) - probs  # mass of the better tokens
        logits = np.where(before >= top_p, NEG_INF, logits)  # keeps the first token that crosses top_p
    return logits


def sample(
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    tokens: np.ndarray,
    fixed: np.ndarray,
    special: SpecialIds,
    cfg: SamplerConfig,
    on_step: Callable[[np.ndarray, Step], None] | None = None,
) -> SampleResult:
    """Unmask `tokens` (B, T) int32, whose masked positions hold special.mask; `fixed` (B, T) marks prompt
    tokens, which never change. `run(canvas)` returns the top-K log-probabilities (B, T, K) and ids.

    Returns the final canvas with nothing masked, unless the step budget is wrong for the spans.
    """
    steps = sample_steps(tokens, fixed, special, cfg, on_step)
    try:
        canvas = next(steps)
        while True:
            canvas = steps.send(run(canvas))
    except StopIteration as done:
        return done.value


def sample_steps(
    tokens: np.ndarray,
    fixed: np.ndarray,
    special: SpecialIds,
    cfg: SamplerConfig,
    on_step: Callable[[np.ndarray, Step], None] | None = None,
) -> Generator[np.ndarray, tuple[np.ndarray, np.ndarray], SampleResult]:
    """The sampler as a generator: it yields each canvas the network must run on and is sent back the
    (top-K log-probabilities, ids) for it; it returns the SampleResult. `sample` drives it with one runner;
    the server drives many at once, so requests share one network call (their canvases stacked on the batch
    axis), each with its own prompt, seed, strategy and stopping point."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    canvas = np.array(tokens, dtype=np.int32, copy=True)
    fixed = np.asarray(fixed, dtype=bool)
    B, T = canvas.shape
    positions = np.arange(T)
    # Before a row's last prompt token lies a gap to fill: ending the text there is not allowed.
    last_fixed = np.where(fixed.any(1), T - 1 - np.argmax(fixed[:, ::-1], axis=1), -1)
    no_end = positions[None, :] < last_fixed[:, None]  # (B, T)
    if not cfg.allow_end:
        no_end[:] = True
    _apply_end(canvas, fixed, special)

    span = cfg.span or T
    free = (canvas == special.mask) & ~fixed
    # Blocks count from where generation starts (the first free position), as LLaDA's semi-autoregressive
    # sampler does, so a prompt that ends mid-span does not shorten the first span.
    origin = int(np.argmax(free.any(0))) if free.any() else 0
    span_starts = list(range(origin, T, span))
    active = [s for s in span_starts if free[:, s : s + span].any()]
    if len(active) > cfg.steps:
        raise DllmError(f"--steps {cfg.steps} is fewer than the {len(active)} spans to fill; raise --steps or --span")

    t0 = time.perf_counter()
    deadline = t0 + cfg.deadline_ms / 1000.0 if cfg.deadline_ms else math.inf
    outputs, evaluated_canvas = None, None
    steps = evaluations = 0
    network_s = 0.0
    history: list[Step] = []
    deadline_hit = False

    for bi, start in enumerate(active):
        in_span = (positions >= start) & (positions < start + span)
        spans_left = len(active) - bi
        block_steps = -(-(cfg.steps - steps) // spans_left)  # ceil: earlier blocks get the remainder
        for k in range(block_steps, 0, -1):  # k: steps left for this block, this one included
            free = (canvas == special.mask) & ~fixed
            todo = free & in_span
            if not todo.any():
                break
            step_t0 = time.perf_counter()
            evaluated = evaluated_canvas is None or not np.array_equal(canvas, evaluated_canvas)
            if evaluated:
                outputs = yield canvas
                evaluated_canvas = canvas.copy()
                evaluations += 1
            net_s = time.perf_counter() - step_t0 if evaluated else 0.0
            network_s += net_s
            logprobs, ids, *more = outputs  # (top-K log-probabilities, ids[, each position's entropy from the graph])
            if time.perf_counter() >= deadline:  # out of time: best token everywhere, done
                commit = free
                chosen = _best_allowed(logprobs, ids, no_end, special)
                deadline_hit = True
            else:
                chosen, score, entropy = _candidates(logprobs, ids, no_end, special, cfg, rng, more[0] if more else None)
                commit = _select(todo, score, k, cfg, rng, entropy)
                if cfg.defer_twins and k > 1:  # never on a block's last step: it must finish
                    commit = _defer_twins(commit, chosen, score)
            before = canvas.copy()
            canvas[commit] = chosen[commit]
            _apply_end(canvas, fixed, special)
            steps += 1
            step = Step(steps, evaluated, canvas != before, net_s * 1e3, (time.perf_counter() - step_t0 - net_s) * 1e3)
            history.append(step)
            if on_step is not None:
                on_step(canvas, step)
            if deadline_hit:
                break
        if deadline_hit:
            break

    total = time.perf_counter() - t0
    return SampleResult(canvas, steps, evaluations, deadline_hit, network_s, total - network_s, history)


def _candidates(logprobs, ids, no_end, special: SpecialIds, cfg: SamplerConfig, rng,
                full_entropy: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A token for every position (B, T), the score that orders commits (higher = sooner), and the entropy of
    each position's distribution: the whole distribution's when the graph returned it (`full_entropy`), else the
    renormalised top-K's (an underestimate: older bundles, TensorRT engines)."""
    banned = _banned(ids, no_end, special)
    logits = candidate_distribution(logprobs, cfg.temperature, cfg.top_k, cfg.top_p)
    logits = np.where(banned, NEG_INF, logits)
    if cfg.temperature == 0:
        pick = np.argmax(logits, -1)
    else:
        gumbel = -np.log(-np.log(rng.random(logits.shape, dtype=np.float32) + 1e-20) + 1e-20)
        pick = np.argmax(logits + gumbel, -1)
    chosen = np.take_along_axis(ids, pick[..., None], -1)[..., 0]
    probs = np.exp(logprobs)  # the model's own probabilities rank the candidates
    p = probs / probs.sum(-1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-20))).sum(-1) if full_entropy is None else np.asarray(full_entropy, dtype=np.float32)
    if cfg.strategy == "margin":
        score = probs[..., 0] - probs[..., 1]
    elif cfg.strategy == "entropy":
        score = -entropy
    else:
        score = np.take_along_axis(probs, pick[..., None], -1)[..., 0]
    return chosen.astype(np.int32), score, entropy


def _banned(ids: np.ndarray, no_end: np.ndarray, special: SpecialIds) -> np.ndarray:
    """Candidates never chosen: padding anywhere (it only ever follows an end-of-text, which pads the rest
    itself), and end-of-text where the text may not end (inside an infilling gap, or fixed-length runs)."""
    return (ids == special.pad) | ((ids == special.eot) & no_end[..., None])


def _best_allowed(logprobs, ids, no_end, special: SpecialIds) -> np.ndarray:
    lp = np.where(_banned(ids, no_end, special), NEG_INF, logprobs)
    return np.take_along_axis(ids, np.argmax(lp, -1)[..., None], -1)[..., 0].astype(np.int32)


def _select(todo: np.ndarray, score: np.ndarray, steps_left: int, cfg: SamplerConfig, rng, entropy: np.ndarray | None = None) -> np.ndarray:
    """Which of the `todo` positions (B, T) to commit this step."""
    n_todo = todo.sum(1)  # (B,)
    if cfg.strategy == "ancestral":
        # MDLM reverse step from t = k/K to s = (k-1)/K under alpha_t = 1 - t: P(unmask) = 1/k.
        return todo & (rng.random(todo.shape) < 1.0 / steps_left)
    need = -(-n_todo // steps_left)  # ceil(n / k): finishes the block in the steps left
    if cfg.strategy == "threshold":
        need = np.maximum(need, (todo & (score > cfg.threshold)).sum(1))
    masked_score = np.where(todo, score, -np.inf)
    order = np.argsort(-masked_score, axis=1, kind="stable")
    if cfg.strategy == "eb" and entropy is not None:
        # EB-Sampler's rule: the longest most-confident run whose summed entropy, less its largest, is within the
        # bound (the most uncertain token of the run is the one it pays for; sum - max never decreases along the run)
        h = np.take_along_axis(np.where(todo, entropy, np.inf), order, axis=1)
        with np.errstate(invalid="ignore"):  # inf - inf past the masked positions: NaN, never within
            within = (np.cumsum(h, axis=1) - np.maximum.accumulate(h, axis=1)) <= cfg.eb_bound
        need = np.maximum(need, np.maximum(1, within.sum(1)))
        need = np.minimum(need, n_todo)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(todo.shape[1])[None, :].repeat(todo.shape[0], 0), axis=1)
    return todo & (rank < need[:, None])


def _defer_twins(commit: np.ndarray, chosen: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Of two neighbouring positions committed in the same step with the same token, keep the higher-scoring
    one. Both were predicted without seeing the other (parallel decoding assumes them independent), which is
    where "play play" and "the the" come from; the deferred one is predicted again next step with its
    neighbour in view, so a doubled word the model really means can still be written."""
    twin = commit[:, 1:] & commit[:, :-1] & (chosen[:, 1:] == chosen[:, :-1])  # (B, T-1): pair (i, i+1)
    if not twin.any():
        return commit
    out = commit.copy()
    for b, i in zip(*np.nonzero(twin)):  # left to right: the lower-scoring of each still-twinned pair waits
        if not (out[b, i] and out[b, i + 1]):
            continue  # one of the pair is already deferred
        loser = i + 1 if score[b, i] >= score[b, i + 1] else i
        out[b, loser] = False
    return out


def _apply_end(canvas: np.ndarray, fixed: np.ndarray, special: SpecialIds) -> None:
    """After the first generated end-of-text or padding token of a row, every free position is padding."""
    is_end = ((canvas == special.eot) | (canvas == special.pad)) & ~fixed
    rows = np.flatnonzero(is_end.any(1))
    if rows.size == 0:
        return
    first = np.argmax(is_end[rows], axis=1)
    after = np.arange(canvas.shape[1])[None, :] > first[:, None]
    sub = canvas[rows]
    sub[after & ~fixed[rows]] = special.pad
    canvas[rows] = sub
