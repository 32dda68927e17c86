"""Block diffusion's refusals through the real `dllm` entry point: a block size that does not fit the canvas, gaps to
fill with a left-to-right model, more tokens than the cache holds, an --init checkpoint of another shape. Each is one
line, a non-zero exit, and nothing written."""

from __future__ import annotations

from refusal import assert_clean_failure, run, snapshot


def test_block_sizes_that_do_not_fit_the_canvas(data_dir, tmp_path):
    for block in ("24", "128"):
        out = tmp_path / f"b{block}"
        code, _, err = run("train", "--data", data_dir, "--out", out, "--objective", "bd3", "--canvas-len", "64",
                           "--block-size", block, "--steps", "2")
        assert_clean_failure(code, err, "must divide the canvas")
        assert not out.exists()


def test_an_init_checkpoint_of_another_tokenizer_or_a_shape_beside_it(trained_run, tmp_path):
    """With --init the shape is the parent's: data of another tokenizer is refused, and so is a shape option."""
    from tests.conftest import make_data

    other = make_data(tmp_path / "other", stories=200, vocab_size=300)
    before = snapshot(trained_run)
    out = tmp_path / "ft"
    code, _, err = run("train", "--data", other, "--out", out, "--objective", "bd3", "--canvas-len", "64",
                       "--block-size", "16", "--init", trained_run, "--steps", "2")
    assert_clean_failure(code, err, "another shape or tokenizer")
    code, _, err = run("train", "--data", other, "--out", out, "--objective", "bd3", "--d-model", "128", "--init", trained_run)
    assert_clean_failure(code, err, "the model's shape is its parent's")
    assert not out.exists() and snapshot(trained_run) == before


def test_export_options_that_nothing_would_read(bd3_run, trained_run, data_dir, tmp_path):
    """INT8 options without --int8, --data on a block-diffusion export without --int8 (only calibration reads it), and
    data of another tokenizer are refused before anything is written."""
    from tests.conftest import make_data

    other = make_data(tmp_path / "other", stories=200, vocab_size=300)
    for run_dir, args, match in [(bd3_run, ("--calib-canvases", "8"), "--calib-canvases is an INT8 calibration option"),
                                 (trained_run, ("--int8-budget", "2"), "--int8-budget is an INT8 calibration option"),
                                 (bd3_run, ("--data", data_dir), "--data is read only by --int8 calibration"),
                                 (bd3_run, ("--int8", "--data", other), "another tokenizer than the model's"),
                                 (trained_run, ("--data", other), "another tokenizer than the model's")]:
        out = tmp_path / "bundle"
        code, _, err = run("export", run_dir, "-o", out, *args)
        assert_clean_failure(code, err, match)
        assert not out.exists()


def test_infilling_and_an_overlong_generation_on_a_block_diffusion_bundle(bd3_bundle):
    before = snapshot(bd3_bundle)
    code, _, err = run("run", bd3_bundle, "-p", "Once ____ happily ever after.")
    assert_clean_failure(code, err, "use a masked-diffusion (MDLM) model")
    code, _, err = run("run", bd3_bundle, "-p", "Once upon a time", "--length", "500")
    assert_clean_failure(code, err, "its cache) holds 64")
    assert snapshot(bd3_bundle) == before


def test_sampler_options_a_family_does_not_use_are_refused_not_ignored(bd3_bundle, ar_bundle, bundle_dir):
    """The family's record says which `dllm run` options it uses; any other one given is named and refused."""
    for bundle, args, match in [(ar_bundle, ("--span", "8"), "--span does not apply to the autoregressive baseline"),
                                (bd3_bundle, ("--gap", "4"), "--gap does not apply"),
                                (ar_bundle, ("--steps", "8"), "--steps does not apply to the autoregressive baseline"),
                                (ar_bundle, ("--strategy", "threshold"), "--strategy does not apply")]:
        code, _, err = run("run", bundle, "-p", "Once upon a time", "--length", "8", *args)
        assert_clean_failure(code, err, match)
    code, out, err = run("run", bundle_dir, "-p", "Once upon a time", "--length", "8", "--span", "4", "--steps", "8")
    assert code == 0, err  # the masked-diffusion model uses both
    code, out, err = run("run", bd3_bundle, "-p", "Once upon a time", "--length", "8", "--span", "4", "--strategy", "threshold")
    assert code == 0 and out.startswith("Once upon a time"), err  # block diffusion: sub-blocks of its blocks
    code, out, err = run("run", ar_bundle, "-p", "Once upon a time", "--length", "8", "--temperature", "0", "--seed", "3")
    assert code == 0 and out.startswith("Once upon a time"), err  # every family samples with these


def test_backend_options_on_another_backend_are_refused(ar_bundle, ar_run):
    """--providers is onnxruntime's, --device torch's, --threads not TensorRT's: given to another backend, named and
    refused (they used to be dropped)."""
    for model, args, match in [(ar_run, ("--providers", "cpu"), "--providers is the onnx backend's"),
                               (ar_bundle, ("--device", "cuda"), "--device is the torch backend's")]:
        code, _, err = run("run", model, "-p", "Once", "--length", "4", "--no-live", *args)
        assert_clean_failure(code, err, match)


def test_training_options_of_another_family_are_refused(data_dir, tmp_path):
    for objective, args, match in [("mdlm", ("--block-size", "8"), "--block-size is for --objective bd3"),
                                   ("ar", ("--t-min", "0.3"), "--t-min is for --objective bd3"),
                                   ("mdlm", ("--t-max", "0.9"), "the masked diffusion (MDLM) does not use it")]:
        code, _, err = run("train", "--data", data_dir, "--out", tmp_path / "run", "--objective", objective, "--steps", "1", *args)
        assert_clean_failure(code, err, match)
        assert not (tmp_path / "run").exists()


def test_profile_options_that_would_measure_or_profile_nothing_are_refused(ar_bundle):
    """`--measure` needs a bundle to run; `--config` beside a bundle would be dropped for the bundle's own model."""
    for args, match in [(("--measure", "--config", "tiny"), "--measure runs a bundle"),
                        ((ar_bundle, "--config", "tiny"), "give one or the other")]:
        code, _, err = run("profile", *args)
        assert_clean_failure(code, err, match)
    code, out, err = run("profile", ar_bundle, "--canvas", "64")
    assert code == 0 and "fits?" in out, err
