"""Speculative decoding's acceptance rule and loop on stand-ins (numpy only): the token written has the parent's
distribution whatever the draft, rejected drafts are never read again, and the loop's bookkeeping."""

import numpy as np
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.runners.calls import DRAFT, MAIN
from jetson_dllm.sampler import SamplerConfig
from jetson_dllm.speculative import accept, check_pair, parent_distribution, speculative_calls


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square statistic's upper critical value at df degrees of freedom (Wilson-Hilferty; z = 3.09: 0.1%)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs` (cells expected under 5 pooled), and its degrees of freedom."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


def test_the_token_written_has_the_parents_distribution_whatever_the_draft():
    rng = np.random.default_rng(0)
    ids = np.array([7, 3, 9, 4, 5])
    probs = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    for draft in (7, 9, 5, 11):  # likely, unlikely, impossible (p = 0) and outside the top-K
        written = [accept(draft, ids, probs, rng)[1] for _ in range(6000)]
        counts = np.array([written.count(int(i)) for i in ids])
        stat, df = chi2(counts, probs)
        assert stat < chi2_critical(df), (draft, counts)
        assert counts[-1] == 0  # a token of probability 0 is never written
    # the rule's power: the draft accepted every time is far from the parent's distribution
    always = np.array([6000, 0, 0, 0, 0])
    assert chi2(always, probs)[0] > chi2_critical(3)
    greedy = parent_distribution(np.log(probs + 1e-12), ids, (), SamplerConfig(temperature=0.0))
    assert accept(7, ids, greedy, rng) == (True, 7) and accept(3, ids, greedy, rng) == (False, 7)


def test_the_parents_distribution_is_its_own_decodings():
    """Banned ids never, temperature and top-k as the AR loop applies them (the head's order may be any)."""
    lp = np.log(np.array([0.1, 0.6, 0.3]))
    ids = np.array([5, 1, 8])
    p = parent_distribution(lp, ids, (1,), SamplerConfig(temperature=1.0))
    assert p[1] == 0 and np.isclose(p.sum(), 1) and np.allclose(p[[0, 2]], [0.25, 0.75])
    top1 = parent_distribution(lp, ids, (), SamplerConfig(temperature=1.0, top_k=1))
    assert top1.tolist() == [0, 1, 0]
    assert parent_distribution(lp, ids, (1,), SamplerConfig(temperature=0.0)).tolist() == [0, 0, 1]


class Proposer:
    """A stand-in drafter: proposes `guess(text)` for each next position, up to `most`, with no calls of its own."""

    def __init__(self, guess):
        self.guess = guess
        self.tally = type("T", (), {"calls": 0, "commits": 0, "seconds": 0.0})()
        self.asked = []

    def draft(self, seq, most):
        self.asked.append((list(seq), most))
        out = []
        for _ in range(most):
            out.append(self.guess(seq + out))
        return out
        yield  # a generator with no calls


def parent(text: list[int]) -> int:
    """A stand-in parent's greedy next token: (sum of the text) mod 7 + 3."""
    return sum(text) % 7 + 3


def run_loop(loop, reads: list, network=parent):
    """Drive a speculative loop with a stand-in parent `network` (its greedy next token of a text) as the verify
    graph over a cache of its own (top-K of 3: its token first): a call at `valid_len` keeps the cache's first
    valid_len positions, the rest is gone, and must not skip a position."""
    cache: list[int] = []
    try:
        call = next(loop)
        while True:
            assert call.model == MAIN and call.graph == "verify"
            tokens, at = call.feeds["tokens"][0].tolist(), int(call.feeds["valid_len"])
            assert at <= len(cache)  # every position before the call's was read
            reads.append((at, tokens))
            cache = cache[:at] + tokens
            ids = np.array([[network(cache[: at + i + 1]), 1, 2] for i in range(len(tokens))]).reshape(1, len(tokens), 3)
            lp = np.tile(np.log([0.7, 0.2, 0.1]), (1, len(tokens), 1))
            call = loop.send({"topk_logprobs": lp, "topk_ids": ids})
    except StopIteration as done:
        return done.value


def greedy_text(prompt, n, network=parent, bos=0, eot=-1):
    """The stand-in parent's own greedy text after `prompt`: n tokens, or up to its end-of-text."""
    text = [bos, *prompt]
    for _ in range(n):
        text.append(network(text))
        if text[-1] == eot:
            break
    return text[1:]


@pytest.mark.parametrize("guess", [parent, lambda t: 4, lambda t: parent(t) if len(t) % 3 else 5])
def test_greedy_output_is_the_parents_and_rejected_drafts_are_never_read_again(guess):
    """Whatever the drafter proposes (always right, always wrong, right two times in three), the text is the
    parent's greedy text; each round reads from the first position after what was accepted."""
    proposer, reads = Proposer(lambda text: guess([0, *text])), []
    r = run_loop(speculative_calls([5, 6], 10, 0, 1, 64, proposer, SamplerConfig(temperature=0.0), 4, stop_at_end=False), reads)
    assert r.tokens[0].tolist() == greedy_text([5, 6], 10)
    assert r.new_tokens == 10 and r.rounds == len(r.accepted_at) and sum(r.accepted_at) == r.accepted
    # the prompt's prefill (start token and first prompt token), then rounds each at the text's last token
    assert reads[0] == (0, [0, 5])
    text = [0, 5, 6] + r.tokens[0, 2:].tolist()
    for at, tokens in reads[1:]:
        assert tokens[0] == text[at]  # the last accepted token, at its own position: what was rejected is overwritten
    if guess is parent:
        assert r.rounds == 1 and r.accepted == 9  # every drafted token accepted, the tenth the parent's own
    assert all(most <= 10 - len(seq) + 2 - 1 for seq, most in proposer.asked)  # never more than the room left


def test_the_loop_ends_at_the_end_of_text_and_refuses_a_full_context():
    """A parent that writes end-of-text (id 1) as the text's fifth token: the loop stops there, drafts or not."""
    ends = lambda text: 1 if len(text) == 5 else parent(text)  # noqa: E731
    for guess in (ends, lambda text: 4):
        r = run_loop(speculative_calls([5], 8, 0, 1, 64, Proposer(lambda t, g=guess: g([0, *t])), SamplerConfig(temperature=0.0), 4), [],
                     network=ends)
        assert r.tokens[0].tolist() == greedy_text([5], 8, ends, eot=1) == [5, 8, 9, 4, 1]
    with pytest.raises(DllmError, match="the model takes 2"):
        run_loop(speculative_calls([5, 6], 4, 0, 1, 2, Proposer(parent), SamplerConfig(temperature=0.0), 4), [])


class Tok:
    def __init__(self, vocab):
        self.tok = type("H", (), {"to_str": lambda self: vocab})()
        self.bos_id, self.eot_id, self.pad_id = 0, 0, 1


class Cfg:
    def __init__(self, family):
        self.family, self.cond_len = family, 0


class Stand:
    def __init__(self, family, graphs, vocab="a"):
        self.cfg, self.graphs, self.tokenizer = Cfg(family), graphs, Tok(vocab)


def test_a_pair_that_cannot_speculate_is_refused_with_the_reason():
    check_pair(Stand("ar", ("decode", "verify")), Stand("bd3", ("block_step", "commit")))  # fine
    for verifier, drafter, reason in ((Stand("ar", ("decode",)), Stand("bd3", ()), "no verify graph"),
                                      (Stand("bd3", ("block_step",)), Stand("bd3", ()), "no verify graph"),
                                      (Stand("ar", ("decode", "verify")), Stand("mdlm", ("canvas",)), "cannot draft"),
                                      (Stand("ar", ("decode", "verify")), Stand("bd3", (), vocab="b"), "tokenizer is not the parent's")):
        with pytest.raises(DllmError, match=reason):
            check_pair(verifier, drafter)
    assert DRAFT != MAIN
