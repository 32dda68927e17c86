"""The same refusals through the real `dllm` entry point, in subprocesses: the installed typer (which carries its own
click) decides what a user sees, not a test runner. Plus hypothesis over the sampler's numbers."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from refusal import assert_clean_failure, call, run

from jetson_dllm.errors import DllmError
from jetson_dllm.sampler import SamplerConfig

USAGE = [
    [], ["frobnicate"], ["run", "x", "--steps", "abc"], ["run", "--bogus"], ["train", "--steps"], ["eval"], ["inspect"],
    ["bench", "--repeats", "x"], ["export", "a", "b", "c"], ["data", "--vocab-size", "1.5"], ["profile", "--canvas", "-1"],
    ["build", "b", "--opt-level", "9"], ["configs", "--vocab-size", "nan"], ["run", "-n", "0"],
]


@pytest.mark.parametrize("args", USAGE, ids=[" ".join(a) or "no-args" for a in USAGE])
def test_usage_errors_print_usage_and_one_reason_exit_2(args):
    code, out, err = run(*args)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    if args:  # `dllm` alone prints the help (to stderr) and exits 2
        assert err.strip().splitlines()[-1].startswith("Error: "), err


MISTAKES = [
    (["run", "/nonexistent", "-p", "hi"], "not found"),
    (["train", "--data", "/nonexistent"], "not a prepared data folder"),
    (["inspect", "/"], "not a bundle"),
    (["train", "--time-budget", "soon"], "duration"),
    (["bench", "--config", "huge"], "unknown config"),
    (["profile", "--precision", "fp8", "--config", "tiny"], "unknown precision"),
]


@pytest.mark.parametrize("args, match", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_user_mistakes_are_one_line_in_a_real_process(args, match):
    code, _, err = run(*args)
    assert_clean_failure(code, err, match)


def test_bad_option_values_in_a_real_process(trained_run):
    for option, value in [("--temperature", "nan"), ("--top-p", "2"), ("--strategy", "beam"), ("--precision", "fp8"), ("--length", "-1")]:
        code, _, err = run("run", trained_run, "-p", "hi", option, value)
        assert_clean_failure(code, err)


@settings(max_examples=60, deadline=None)
@given(temperature=st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=100.0001), st.just(math.nan)),
       top_p=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0000001), st.just(math.nan)))
def test_any_bad_sampler_number_is_refused_by_the_validator(temperature, top_p):
    for cfg in (SamplerConfig(temperature=temperature), SamplerConfig(top_p=top_p)):
        with pytest.raises(DllmError):
            cfg.validate()


@settings(max_examples=40, deadline=None)
@given(threshold=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0000001), st.just(math.nan), st.just(math.inf)))
def test_any_bad_threshold_is_refused_through_the_cli(threshold):
    code, _, err = call("run", "/nonexistent", "-p", "hi", "--threshold", repr(threshold))
    assert_clean_failure(code, err, "--threshold")
