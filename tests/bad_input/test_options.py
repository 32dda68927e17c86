"""Bad option values for every command: each is refused with one clean message and a non-zero exit, before any work.

The cases are generated from one table per command: values out of each option's range, NaN and infinities,
text where a number goes, and unknown choices."""

from __future__ import annotations

import pytest
from refusal import assert_clean_failure, call

NOT_INT = ["abc", "1.5", "", "0x10", "1e3"]
NOT_FLOAT = ["abc", "", "1,5"]
NAN_INF = ["nan", "inf", "-inf", "NaN"]

# option -> bad values, per command; positional arguments are filled in by the fixture
TRAIN = {
    "--steps": ["0", "-1", *NOT_INT], "--lr": ["0", "-1", "11", *NAN_INF, *NOT_FLOAT], "--eval-every": ["0", "-3"],
    "--log-every": ["0"], "--seed": ["-1"], "--threads": ["-1"], "--batch-size": ["0", "-4"], "--canvas-len": ["0", "4", "1000000"],
    "--ema": ["1", "1.5", "-0.1", "nan"], "--min-lr-ratio": ["2", "-1", "nan"], "--time-budget": ["soon", "5x", "-5"],
    "--nproc": ["0", "-1"], "--dtype": ["int4", "fp8"], "--device": ["tpu"], "--objective": ["gpt"], "--schedule": ["sqrt"],
    "--config": ["huge", ""], "--warmup": ["-1"], "--weight-decay": ["nan", "-1"], "--grad-clip": ["nan", "-1"],
    "--keep-last": ["0"], "--n-layer": ["-1"], "--n-head": ["-2"], "--d-model": ["-8"], "--pause-after": ["-1"],
    "--grad-accum": ["0"], "--eval-canvases": ["0"],
}
DATA = {
    "--vocab-size": ["0", "-5", "10000000", *NOT_INT], "--val-fraction": ["0", "0.5", "1", "-1", *NAN_INF],
    "--builtin-stories": ["0", "-1"], "--tokenizer-docs": ["0"], "--format": ["xml"], "--seed": ["-3"],
}
EVAL = {"--canvases": ["0", "-1"], "--n-t": ["0"], "--samples": ["0"], "--seed": ["-1"], "--steps": ["0"]}
RUN = {
    "--steps": ["0", "-1", "100001", "1" + "0" * 40, *NOT_INT], "--temperature": ["-1", "101", *NAN_INF], "--top-p": ["0", "1.5", "-1", "nan"],
    "--threshold": ["0", "2", "nan"], "--top-k": ["-1", "5000"], "--span": ["-1"], "--num-samples": ["0", "-2", "100000"],
    "--deadline-ms": ["-1", "nan"], "--length": ["-1", "99999"], "--strategy": ["beam", ""], "--backend": ["tpu"],
    "--precision": ["fp8", "bogus"], "--gap": ["0"], "--seed": ["-1"], "--device": ["tpu", "cuda", "cuda:7", "gpu0"],
    "--guidance": ["-1", "101", *NAN_INF, *NOT_FLOAT], "--guidance-schedule": ["early", ""],
}
EXPORT = {
    "--topk": ["0", "99999"], "--parity-canvases": ["-2", "0"], "--calib-canvases": ["0"], "--calib-method": ["bogus"],
    "--int8-budget": ["nan", "-1"], "--calib-canvas-len": ["-1", "100000"], "--seed": ["-1"],
}
PROFILE = {"--canvas": ["0", "-1"], "--batch": ["-2", "0"], "--precision": ["fp8", "bogus,fp32"], "--config": ["huge"]}
BENCH = {
    "--precision": ["bogus,fp32", "fp8"], "--backend": ["tpu", ""], "--steps": ["0", "abc", "8,-1"], "--canvas": ["0"],
    "--batch": ["0"], "--repeats": ["0"], "--warmup": ["-1"], "--strategy": ["beam"], "--config": ["huge"], "--threads": ["-1"],
    "--quality-samples": ["0"],
}
BUILD = {"--opt-level": ["9", "-1"], "--canvas": ["0", "x"], "--batch": ["0"], "--precision": ["bogus"]}
CONFIGS = {"--vocab-size": ["0", "-1", "abc"], "--canvas-len": ["0", "-5"]}


def cases():
    for command, table in [("train", TRAIN), ("data", DATA), ("eval", EVAL), ("run", RUN), ("export", EXPORT), ("profile", PROFILE),
                           ("bench", BENCH), ("build", BUILD), ("configs", CONFIGS)]:
        for option, values in table.items():
            for value in values:
                yield pytest.param(command, option, value, id=f"{command}{option}={value or 'empty'}")


@pytest.mark.parametrize("command, option, value", list(cases()))
def test_a_bad_option_value_is_refused(command, option, value, trained_run, data_dir, bundle_dir, tmp_path):
    base = {
        "train": ["train", "--data", data_dir, "--out", tmp_path / "run", "--steps", "2", "--d-model", "32", "--n-layer", "1",
                  "--n-head", "2", "--canvas-len", "32", "--batch-size", "2"],
        "data": ["data", "-o", tmp_path / "d", "--builtin-stories", "50", "--vocab-size", "300"],
        "eval": ["eval", trained_run, "--data", data_dir, "--canvases", "2", "--n-t", "1"],
        "run": ["run", trained_run, "-p", "Once", "--steps", "2", "--no-live"],
        "export": ["export", trained_run, "-o", tmp_path / "b", "--int8", "--parity-canvases", "2", "--calib-canvases", "8"],
        "profile": ["profile", "--config", "tiny"],
        "bench": ["bench", bundle_dir, "--steps", "2", "--canvas", "32", "--repeats", "1", "--warmup", "0", "--out", tmp_path / "bench"],
        "build": ["build", bundle_dir],
        "configs": ["configs"],
    }[command]
    code, _, err = call(*base, option, value)
    assert_clean_failure(code, err)
    if command in ("data", "export", "train", "bench"):  # refused before anything was written
        assert not any(p.name in ("d", "b", "run", "bench") for p in tmp_path.iterdir())


def test_there_are_enough_cases():
    assert len(list(cases())) >= 150
