"""Options that would do nothing where they are given are refused, never silently ignored (issue 41, class 4)."""

from __future__ import annotations

from refusal import assert_clean_failure, call, snapshot


def test_a_guidance_schedule_without_guidance_is_refused(trained_run):
    code, _, err = call("run", trained_run, "-p", "Once upon a time", "--guidance-schedule", "late", "--no-live")
    assert_clean_failure(code, err, "give --guidance W too")


def test_tokenizer_training_options_beside_a_reused_tokenizer_are_refused(data_dir, tmp_path):
    for extra in (("--vocab-size", "512"), ("--tokenizer-docs", "10")):
        code, _, err = call("data", "-o", tmp_path / "out", "--tokenizer", data_dir / "tokenizer.json", *extra)
        assert_clean_failure(code, err, f"{extra[0]} shapes a tokenizer")
        assert not (tmp_path / "out").exists()


def test_a_latent_width_beside_init_is_refused(trained_run, data_dir, tmp_path):
    before = snapshot(trained_run)
    code, _, err = call("train", "--data", data_dir, "--out", tmp_path / "run", "--family", "continuous", "--init", trained_run,
                        "--latent-dim", "32", "--steps", "1")
    assert_clean_failure(code, err, "--latent-dim sets a shape")
    assert not (tmp_path / "run").exists() and snapshot(trained_run) == before
