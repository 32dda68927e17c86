import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import STRATEGIES, SamplerConfig, SpecialIds, _defer_twins, candidate_distribution, sample

SPECIAL = SpecialIds(mask=2, eot=1, pad=0)
V, K = 40, 8


class FakeNet:
    """A deterministic stand-in for a network: top-K log-probabilities that depend on the canvas.

    `end_at` makes end-of-text the confident prediction at that position; `confidence` sets how peaked.
    """

    def __init__(self, seed=0, end_at=None, confidence=1.0, sleep=0.0, random_ends=True):
        self.seed, self.end_at, self.confidence, self.sleep = seed, end_at, confidence, sleep
        self.random_ends = random_ends
        self.calls = 0

    def __call__(self, canvas):
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        B, T = canvas.shape
        rng = np.random.default_rng([self.seed, int(canvas.astype(np.int64).sum()) % 100003])
        logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3 * self.confidence
        logits[..., SPECIAL.mask] = -1e4
        if not self.random_ends:
            logits[..., [SPECIAL.eot, SPECIAL.pad]] = -1e4
        if self.end_at is not None:
            logits[:, self.end_at, SPECIAL.eot] = 50.0
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        ids = np.argsort(-logprobs, -1)[..., :K]
        return np.take_along_axis(logprobs, ids, -1), ids.astype(np.int32)


def canvas_with_prompt(B, T, prompt_len, rng):
    tokens = np.full((B, T), SPECIAL.mask, dtype=np.int32)
    fixed = np.zeros((B, T), dtype=bool)
    tokens[:, :prompt_len] = rng.integers(3, V, size=(B, prompt_len))
    fixed[:, :prompt_len] = True
    return tokens, fixed


configs = st.builds(
    SamplerConfig,
    steps=st.integers(1, 40),
    strategy=st.sampled_from(STRATEGIES),
    threshold=st.floats(0.05, 1.0),
    span=st.sampled_from([0, 4, 8, 16]),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_k=st.sampled_from([0, 1, 3]),
    top_p=st.sampled_from([1.0, 0.9, 0.5]),
    seed=st.integers(0, 1000),
    defer_twins=st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, B=st.integers(1, 3), T=st.sampled_from([8, 16, 32]), prompt_len=st.integers(0, 6), end_at=st.sampled_from([None, 3, 12]))
def test_sampler_invariants(cfg, B, T, prompt_len, end_at):
    rng = np.random.default_rng(0)
    tokens, fixed = canvas_with_prompt(B, T, prompt_len, rng)
    end_at = end_at if end_at is not None and end_at < T else None
    n_blocks = len({(p - prompt_len) // (cfg.span or T) for p in range(prompt_len, T)})
    if n_blocks > cfg.steps:
        with pytest.raises(DllmError, match="spans to fill"):
            sample(FakeNet(end_at=end_at), tokens, fixed, SPECIAL, cfg)
        return
    masked_counts = [(tokens == SPECIAL.mask).sum(1)]

    def on_step(canvas, step):
        assert np.array_equal(canvas[fixed], tokens[fixed])  # prompt tokens never change
        masked_counts.append((canvas == SPECIAL.mask).sum(1))
        if cfg.strategy != "ancestral":
            assert step.committed.any()  # every step commits something while anything is masked

    net = FakeNet(end_at=end_at)
    result = sample(net, tokens, fixed, SPECIAL, cfg, on_step=on_step)
    counts = np.array(masked_counts)
    assert (np.diff(counts, axis=0) <= 0).all()  # the masked count never grows
    assert (counts[-1] == 0).all() and not (result.tokens == SPECIAL.mask).any()  # done within the budget
    assert result.steps <= cfg.steps and net.calls == result.evaluations <= result.steps
    if cfg.strategy != "ancestral":
        assert (np.diff(counts.sum(1)) < 0).all()
    again = sample(FakeNet(end_at=end_at), tokens, fixed, SPECIAL, cfg)
    assert np.array_equal(again.tokens, result.tokens)  # the same seed gives the same tokens


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 64), threshold=st.floats(0.01, 1.0), confidence=st.floats(0.1, 5.0), T=st.sampled_from([16, 32, 64]))
def test_threshold_never_runs_more_evaluations_than_steps(steps, threshold, confidence, T):
    tokens, fixed = canvas_with_prompt(2, T, 2, np.random.default_rng(1))
    net = FakeNet(confidence=confidence)
    cfg = SamplerConfig(steps=steps, strategy="threshold", threshold=threshold)
    result = sample(net, tokens, fixed, SPECIAL, cfg)
    assert result.evaluations <= steps and net.calls == result.evaluations
    assert not (result.tokens == SPECIAL.mask).any()


def test_threshold_is_adaptive_confident_models_finish_early():
    tokens, fixed = canvas_with_prompt(1, 32, 2, np.random.default_rng(1))
    sure = sample(FakeNet(confidence=20), tokens, fixed, SPECIAL, SamplerConfig(steps=32, strategy="threshold", threshold=0.9))
    unsure = sample(FakeNet(confidence=0.05), tokens, fixed, SPECIAL, SamplerConfig(steps=32, strategy="threshold", threshold=0.9))
    assert sure.evaluations <= 3 < unsure.evaluations == 30


def test_ancestral_reuses_outputs_when_a_step_commits_nothing():
    tokens, fixed = canvas_with_prompt(1, 16, 12, np.random.default_rng(2))  # 4 positions, 64 steps
    net = FakeNet()
    history = []
    result = sample(net, tokens, fixed, SPECIAL, SamplerConfig(steps=64, strategy="ancestral", seed=5), on_step=lambda c, s: history.append(s))
    assert result.steps > result.evaluations == net.calls
    assert result.evaluations <= 5
    for prev, step in zip(history, history[1:]):
        assert step.evaluated == bool(prev.committed.any())  # a network run only after something changed


def test_end_of_text_pads_the_rest_and_stops_costing_steps():
    tokens, fixed = canvas_with_prompt(2, 32, 3, np.random.default_rng(3))
    result = sample(FakeNet(end_at=10, random_ends=False), tokens, fixed, SPECIAL, SamplerConfig(steps=29))
    assert (result.tokens[:, 10] == SPECIAL.eot).all()
    assert (result.tokens[:, 11:] == SPECIAL.pad).all()
    assert result.steps == 8  # end-of-text first (most confident), then one of the 7 positions 3..9 per step


def test_infilling_never_ends_inside_the_gap():
    T = 16
    tokens = np.full((1, T), SPECIAL.mask, dtype=np.int32)
    fixed = np.zeros((1, T), dtype=bool)
    tokens[0, :2], tokens[0, 10:13] = [5, 6], [7, 8, SPECIAL.eot]
    tokens[0, 13:] = SPECIAL.pad
    fixed[0, :2] = fixed[0, 10:] = True
    result = sample(FakeNet(end_at=5), tokens, fixed, SPECIAL, SamplerConfig(steps=8))
    gap = result.tokens[0, 2:10]
    assert not np.isin(gap, [SPECIAL.eot, SPECIAL.pad, SPECIAL.mask]).any()
    assert np.array_equal(result.tokens[0, 10:], tokens[0, 10:])


def test_blocks_fill_left_to_right():
    tokens, fixed = canvas_with_prompt(1, 32, 0, np.random.default_rng(4))
    blocks = []
    sample(FakeNet(random_ends=False), tokens, fixed, SPECIAL, SamplerConfig(steps=16, span=8),
           on_step=lambda c, s: blocks.append(set(np.flatnonzero(s.committed[0]) // 8)))
    assert all(len(b) == 1 for b in blocks)
    order = [b.pop() for b in blocks]
    assert order == sorted(order) and set(order) == {0, 1, 2, 3}
    assert len(blocks) == 16  # 4 steps per block


def test_blocks_count_from_where_generation_starts():
    """As LLaDA's generate: with a 3-token prompt and blocks of 8, the first block is positions 3..10, not 3..7."""
    tokens, fixed = canvas_with_prompt(1, 32, 3, np.random.default_rng(6))
    steps = []
    sample(FakeNet(random_ends=False), tokens, fixed, SPECIAL, SamplerConfig(steps=16, span=8),
           on_step=lambda c, s: steps.append(np.flatnonzero(s.committed[0])))
    first_block = np.concatenate(steps[:4])
    assert sorted(first_block.tolist()) == list(range(3, 11))
    assert all(((np.asarray(pos) - 3) // 8 == i // 4).all() for i, pos in enumerate(steps))


def test_deadline_commits_the_best_tokens_and_returns():
    tokens, fixed = canvas_with_prompt(1, 32, 2, np.random.default_rng(5))
    net = FakeNet(sleep=0.02, random_ends=False)
    seen = []

    def run(canvas):
        seen.append(canvas.copy())
        return net(canvas)

    history = []
    result = sample(run, tokens, fixed, SPECIAL, SamplerConfig(steps=30, deadline_ms=50, temperature=1.0), on_step=lambda c, s: history.append(s))
    assert result.deadline_hit and 1 <= result.steps < 30
    assert not (result.tokens == SPECIAL.mask).any()
    _, ids = FakeNet(random_ends=False)(seen[-1])
    last = history[-1].committed
    assert last.sum() > 1 and np.array_equal(result.tokens[last], ids[..., 0][last])  # the best token everywhere left


def test_greedy_commits_top1_and_batches_are_independent():
    tokens, fixed = canvas_with_prompt(3, 16, 0, np.random.default_rng(6))
    net = FakeNet()
    first = []
    sample(net, tokens, fixed, SPECIAL, SamplerConfig(steps=16), on_step=lambda c, s: first.append(c.copy()) if not first else None)
    logprobs, ids = FakeNet()(tokens)
    committed = first[0] != tokens
    assert np.array_equal(first[0][committed], ids[..., 0][committed])
    assert (committed.sum(1) == 1).all()  # each row commits its own most confident position


def test_candidate_distribution_top_k_and_top_p():
    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    assert np.isinf(candidate_distribution(lp, 1.0, 2, 1.0)[0, 2:]).all()
    kept = np.isfinite(candidate_distribution(lp, 1.0, 0, 0.7)[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 crosses it
    assert np.isfinite(candidate_distribution(lp, 1.0, 0, 0.4)[0]).tolist() == [True, False, False, False]
    hot = candidate_distribution(lp, 2.0, 0, 1.0)
    np.testing.assert_allclose(hot, lp / 2.0)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(steps=-3), dict(threshold=0.0), dict(threshold=1.5), dict(top_p=0.0),
                                 dict(top_p=1.2), dict(strategy="beam"), dict(temperature=-1), dict(span=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(DllmError):
        SamplerConfig(**bad).validate()


def test_defer_twins_keeps_the_best_of_each_run_of_equal_neighbours():
    commit = np.array([[True, True, True, False, True, True]])
    chosen = np.array([[5, 5, 5, 6, 7, 8]])
    assert _defer_twins(commit, chosen, np.array([[0.9, 0.8, 0.7, 0.1, 0.5, 0.5]])).tolist() == [[True, False, True, False, True, True]]
    assert _defer_twins(commit, chosen, np.array([[0.1, 0.9, 0.2, 0.1, 0.5, 0.5]])).tolist() == [[False, True, False, False, True, True]]
    alone = np.array([[True, False, True, False, False, False]])  # same token but not committed together: both stay
    assert _defer_twins(alone, np.array([[5, 5, 5, 0, 0, 0]]), np.zeros((1, 6))).tolist() == alone.tolist()


def test_defer_twins_in_a_run():
    """A context-free network that wants the same token everywhere: without deferral the first step writes it
    twice side by side; with it, never two neighbours in one step, and the run still finishes in its steps."""

    def same_everywhere(canvas):
        B, T = canvas.shape
        logprobs = np.tile(np.log(np.linspace(0.5, 0.01, K, dtype=np.float32)), (B, T, 1))
        return logprobs, np.tile(np.arange(3, 3 + K, dtype=np.int32), (B, T, 1))

    tokens = np.full((1, 8), SPECIAL.mask, dtype=np.int32)
    fixed = np.zeros_like(tokens, dtype=bool)
    for defer in (False, True):
        steps = []
        result = sample(same_everywhere, tokens, fixed, SPECIAL, SamplerConfig(steps=4, defer_twins=defer),
                        on_step=lambda c, s, seen=steps: seen.append(s.committed.copy()))
        first = steps[0][0]
        adjacent_in_one_step = bool((first[1:] & first[:-1]).any())
        assert adjacent_in_one_step != defer
        assert not (result.tokens == SPECIAL.mask).any() and result.steps <= 4


def _net(confident: bool, K: int = 8):
    """A stand-in network: top-1 almost certain (entropy ~0) or the top-K uniform (entropy log K)."""
    def run(canvas):
        B, T = canvas.shape
        lp = np.full((B, T, K), np.log(1e-6 / (K - 1)) if confident else np.log(1.0 / K), dtype=np.float32)
        if confident:
            lp[..., 0] = np.log(1 - 1e-6)
        ids = np.broadcast_to(np.arange(10, 10 + K, dtype=np.int32), (B, T, K)).copy()
        return lp, ids
    return run


def test_eb_sampler_spends_evaluations_only_where_the_model_is_unsure():
    tokens, fixed = canvas_with_prompt(1, 16, 0, np.random.default_rng(7))
    cfg = SamplerConfig(steps=16, strategy="eb", eb_bound=0.5, temperature=0.0, allow_end=False, defer_twins=False)
    sure = sample(_net(True), tokens, fixed, SPECIAL, cfg)
    unsure = sample(_net(False), tokens, fixed, SPECIAL, cfg)
    assert sure.evaluations == 1 and not (sure.tokens == SPECIAL.mask).any()  # everything within the bound at once
    assert unsure.evaluations == 16  # log 8 = 2.08 nats each: one position per step, as the budget requires
    with pytest.raises(DllmError, match="--eb-bound"):
        SamplerConfig(strategy="eb", eb_bound=float("nan")).validate()


def test_eb_selects_exactly_the_papers_set():
    """EB-Sampler: of the masked positions ordered by confidence, the longest prefix U with sum(H_U) - max(H_U) <= bound
    (checked against a brute-force reading of the rule on random entropies)."""
    from jetson_dllm.sampler import _select

    rng = np.random.default_rng(0)
    for _ in range(200):
        T = 12
        todo = rng.random((1, T)) < 0.7
        todo[0, 0] = True
        score, entropy = rng.random((1, T)), rng.gamma(1.0, 0.3, (1, T))
        bound = float(rng.choice([0.05, 0.3, 1.0]))
        got = _select(todo, score, 100, SamplerConfig(strategy="eb", eb_bound=bound), rng, entropy)[0]
        order = [i for i in np.argsort(-np.where(todo[0], score[0], -np.inf), kind="stable") if todo[0, i]]
        want = 1
        for n in range(1, len(order) + 1):
            h = entropy[0, order[:n]]
            if h.sum() - h.max() <= bound:
                want = n
        assert set(np.flatnonzero(got)) == set(order[:want])


def test_eb_uses_the_graphs_whole_distribution_entropy_when_given():
    """A head whose top-K is confident but whose whole distribution is not (its mass spread past the top-K): from the
    top-K alone the bound commits everything at once; with the graph's entropy it takes one position per step."""
    tokens, fixed = canvas_with_prompt(1, 16, 0, np.random.default_rng(7))
    cfg = SamplerConfig(steps=16, strategy="eb", eb_bound=0.5, temperature=0.0, allow_end=False, defer_twins=False)
    sure = _net(True)

    def spread(canvas):
        lp, ids = sure(canvas)
        return lp, ids, np.full(canvas.shape, 2.5, dtype=np.float32)  # 2.5 nats: the real entropy

    assert sample(sure, tokens, fixed, SPECIAL, cfg).evaluations == 1
    assert sample(spread, tokens, fixed, SPECIAL, cfg).evaluations == 16
    none_given = lambda canvas: (*sure(canvas), None)  # noqa: E731 (a graph without the output: the top-K estimate)
    assert sample(none_given, tokens, fixed, SPECIAL, cfg).evaluations == 1
