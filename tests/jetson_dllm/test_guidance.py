"""Classifier-free guidance (jetson_dllm.guidance): the mix, the schedules, the prompt-masked twin, and the MDLM loop
running guided steps as 2-row calls that ask for the logits."""

from __future__ import annotations

import numpy as np
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.families.mdlm import canvas_calls
from jetson_dllm.guidance import check_prompt, check_runner, guided_head, log_softmax, unconditional, weight_at
from jetson_dllm.sampler import SamplerConfig, SpecialIds

SPECIAL = SpecialIds(mask=3, eot=1, pad=0)


def test_weight_zero_is_the_models_own_head():
    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(size=(2, 5, 40)) * 3, rng.normal(size=(2, 5, 40)) * 3
    lp, ids, entropy = guided_head(cond, uncond, 0.0, 6)
    ref = log_softmax(cond)
    order = np.argsort(-ref, -1)[..., :6]
    np.testing.assert_array_equal(ids, order)
    np.testing.assert_allclose(lp, np.take_along_axis(ref, order, -1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, -(np.exp(ref) * ref).sum(-1), rtol=1e-5)


def test_the_mix_is_p_cond_to_the_1_plus_w_over_p_uncond_to_the_w_renormalised():
    rng = np.random.default_rng(1)
    cond, uncond = rng.normal(size=(1, 3, 12)), rng.normal(size=(1, 3, 12))
    w = 2.5
    lp, ids, entropy = guided_head(cond, uncond, w, 12)  # the whole vocabulary
    pc, pu = np.exp(log_softmax(cond)), np.exp(log_softmax(uncond))
    mix = pc ** (1 + w) / pu**w
    mix /= mix.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(lp), np.take_along_axis(mix, ids, -1), rtol=1e-4)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-5)
    assert (np.diff(lp, axis=-1) <= 0).all()  # sorted, best first
    np.testing.assert_allclose(entropy, -(mix * np.log(mix)).sum(-1), rtol=1e-4)


def test_guidance_raises_what_the_prompt_explains_over_what_is_likely_anyway():
    # token 5: likely with or without the prompt; token 9: a little less likely, but only because of the prompt
    cond, uncond = np.zeros((1, 1, 16)), np.zeros((1, 1, 16))
    cond[..., 5], cond[..., 9] = 4.0, 3.5
    uncond[..., 5], uncond[..., 9] = 4.0, 0.0
    assert guided_head(cond, uncond, 0.0, 2)[1][0, 0, 0] == 5
    assert guided_head(cond, uncond, 1.0, 2)[1][0, 0, 0] == 9


def test_schedules():
    assert [weight_at(2.0, "constant", i, 4) for i in range(4)] == [2.0] * 4
    assert [weight_at(2.0, "late", i, 4) for i in range(4)] == [0.0, 0.0, 2.0, 2.0]
    ramp = [weight_at(2.0, "ramp", i, 4) for i in range(4)]
    assert ramp == sorted(ramp) and ramp[-1] == 2.0 and ramp[0] > 0
    with pytest.raises(DllmError, match="schedule"):
        weight_at(1.0, "early", 0, 4)


def test_the_unconditional_twin_masks_the_prompt_and_keeps_the_rest():
    canvas = np.array([[7, 8, 3, 3, 9, 0, 0]], dtype=np.int32)
    fixed = np.array([[1, 1, 0, 0, 1, 1, 1]], dtype=bool)  # a prompt, a gap, a suffix, padding
    np.testing.assert_array_equal(unconditional(canvas, fixed, SPECIAL), [[3, 3, 3, 3, 3, 0, 0]])
    with pytest.raises(DllmError, match="needs a prompt"):
        check_prompt(np.zeros_like(fixed), canvas, SPECIAL)


@pytest.mark.parametrize("value", [float("nan"), -0.5, 101.0])
def test_bad_guidance_is_refused(value):
    with pytest.raises(DllmError, match="--guidance"):
        SamplerConfig(guidance=value).validate()
    with pytest.raises(DllmError, match="--guidance-schedule"):
        SamplerConfig(guidance=1.0, guidance_schedule="sometimes").validate()


def test_a_runner_without_logits_is_refused_by_name():
    class Engine:
        name, returns_logits = "trt-fp16", False

    with pytest.raises(DllmError, match="trt-fp16 keeps the logits"):
        check_runner(Engine())


def _drive(sampler: SamplerConfig, T: int = 10, V: int = 24):
    """The MDLM loop on a fake network whose prompt makes token 11 likely; the calls it asked for."""
    tokens = np.full((2, T), SPECIAL.mask, dtype=np.int32)
    tokens[:, :2] = [4, 5]
    fixed = np.zeros_like(tokens, dtype=bool)
    fixed[:, :2] = True
    calls, loop = [], canvas_calls(tokens, fixed, SPECIAL, sampler, topk=5)
    try:
        call = next(loop)
        while True:
            calls.append(call)
            x = call.feeds["tokens"]
            logits = np.zeros((*x.shape, V), dtype=np.float32)
            logits[..., 10] = 2.0
            logits[..., 11] = np.where((x[:, :1] == 4), 1.9, -5.0)  # the prompt explains 11
            if call.outputs == ("logits",):
                out = {"logits": logits}
            else:
                lp, ids, ent = guided_head(logits, logits, 0.0, 5)
                out = {"topk_logprobs": lp, "topk_ids": ids, "entropy": ent}
            call = loop.send(out)
    except StopIteration as done:
        return calls, done.value


def test_guided_steps_are_two_row_calls_for_the_logits_and_follow_the_prompt():
    calls, plain = _drive(SamplerConfig(steps=8, temperature=0))
    assert all(c.outputs is None and len(c.feeds["tokens"]) == 2 for c in calls)
    assert (plain.tokens[:, 2:] == 10).all()
    calls, guided = _drive(SamplerConfig(steps=8, temperature=0, guidance=2.0))
    assert all(c.outputs == ("logits",) and len(c.feeds["tokens"]) == 4 for c in calls)
    for c in calls:  # the twin rows: the prompt masked, the rest the same canvas
        x = c.feeds["tokens"]
        assert (x[2:, :2] == SPECIAL.mask).all() and (x[2:, 2:] == x[:2, 2:]).all() and (x[:2, :2] == [4, 5]).all()
    assert (guided.tokens[:, 2:] == 11).all()


def test_late_guidance_costs_one_row_in_the_first_half():
    calls, _ = _drive(SamplerConfig(steps=8, temperature=0, guidance=2.0, guidance_schedule="late"))
    rows = [len(c.feeds["tokens"]) for c in calls]
    assert rows == [2] * 4 + [4] * 4
