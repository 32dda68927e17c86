"""The dllm command end to end (in-process through main(), plus the real entry point), and its bad-input paths."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jetson_dllm.cli import main, parse_duration
from jetson_dllm.errors import DllmError


def dllm(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, match):
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def test_help_without_torch():
    # On a Jetson there is no torch: the CLI and the package must still import and answer --help.
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['dllm', '--help']; from jetson_dllm.cli import entry; entry()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for verb in ("train", "run", "data", "eval", "configs"):
        assert verb in result.stdout


def test_configs_table(capsys):
    code, out, _ = dllm(capsys, "configs")
    assert code == 0
    for name in ("tiny", "small", "medium", "large", "xlarge", "xxlarge"):
        assert name in out
    assert "5.31 M" in out  # tiny with the default 8192 vocabulary


def test_data_train_eval_run(capsys, tmp_path):
    code, out, _ = dllm(capsys, "data", "-o", tmp_path / "d", "--builtin-stories", 300, "--vocab-size", 400)
    assert code == 0 and "train" in out
    code, out, err = dllm(capsys, "train", "--data", tmp_path / "d", "--out", tmp_path / "r", "--steps", 6, "--eval-every", 3,
                          "--batch-size", 4, "--d-model", 32, "--n-layer", 1, "--n-head", 2, "--canvas-len", 64, "--eval-canvases", 8)
    assert code == 0, err
    assert "trained 6 steps" in out
    code, out, _ = dllm(capsys, "eval", tmp_path / "r", "--data", tmp_path / "d", "--canvases", 8, "--n-t", 2, "--json")
    assert code == 0
    metrics = json.loads(out)
    assert metrics["val_nll"] > 0 and 0 <= metrics["val_acc"] <= 1 and "val_acc@0.5" in metrics
    code, out, _ = dllm(capsys, "run", tmp_path / "r", "-p", "Once upon a time", "--steps", 8, "--json", "-n", 2)
    assert code == 0
    result = json.loads(out)
    assert len(result["texts"]) == 2 and all(t.startswith("Once upon a time") for t in result["texts"])
    assert result["steps"] <= 8 and result["evaluations"] <= result["steps"] and len(result["step_ms"]) == result["steps"]
    code, out, err = dllm(capsys, "run", tmp_path / "r", "-p", "Once upon a time ____ happily ever after.", "--steps", 8, "--no-live")
    assert code == 0 and out.startswith("Once upon a time") and out.rstrip().endswith("happily ever after.")


@pytest.mark.parametrize("args, match", [
    (["train", "--data", "/nonexistent"], "not a prepared data folder"),
    (["data", "/nonexistent/file.txt", "-o", "{tmp}/d"], "not found"),
    (["eval", "/nonexistent"], "not found"),
    (["run", "/nonexistent", "-p", "hi"], "not found"),
    (["train", "--time-budget", "soon"], "duration"),
])
def test_bad_input_one_line_errors(capsys, tmp_path, args, match):
    code, _, err = dllm(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_line_error(code, err, match)


def test_bad_input_against_a_trained_run(capsys, trained_run, data_dir, tmp_path):
    for args, match in [
        (["run", trained_run, "-p", ""], "prompt is empty"),
        (["run", trained_run, "-p", "____ [MASK]"], "only placeholders"),
        (["run", trained_run, "-p", "word " * 200], "longest canvas"),
        (["run", trained_run, "-p", "hi", "--length", 500], "do not fit"),
        (["run", trained_run, "-p", "hi", "--threshold", 1.5], "--threshold"),
        (["run", trained_run, "-p", "hi", "--top-p", 0], "--top-p"),
        (["run", trained_run, "-p", "hi", "--backend", "tpu"], "unknown backend"),
        (["train", "--data", data_dir, "--out", tmp_path / "x", "--config", "huge"], "unknown --config"),
        (["run", trained_run, "-p", "hi", "--temperature", "nan"], "--temperature must be a number"),
        (["run", trained_run, "--backend", "torch", "--precision", "int8"], "does not run int8"),
        (["train", "--data", data_dir, "--out", trained_run], "--resume"),
    ]:
        code, _, err = dllm(capsys, *args)
        assert_one_line_error(code, err, match)
    # out of an option's range: a usage error (exit 2), the usage and one line saying which option
    code, _, err = dllm(capsys, "run", trained_run, "-p", "hi", "--steps", 0)
    assert code == 2 and "Invalid value for '--steps'" in err and "Traceback" not in err


def test_truncated_checkpoint_is_refused_by_eval(capsys, trained_run, data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    from train_host.checkpoint import list_checkpoints

    for c in list_checkpoints(copy):
        f = c / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])
    code, _, err = dllm(capsys, "eval", copy, "--data", data_dir)
    assert_one_line_error(code, err, "truncated or altered")


def test_eval_refuses_data_with_another_tokenizer(capsys, trained_run, tmp_path):
    from train_host.data import prepare_data
    from train_host.sources import Source

    prepare_data([Source("builtin", builtin_stories=100, seed=9)], tmp_path / "other", vocab_size=350, val_fraction=0.1)
    code, _, err = dllm(capsys, "eval", trained_run, "--data", tmp_path / "other")
    assert_one_line_error(code, err, "another tokenizer")


def test_non_utf8_prompt_from_a_pipe(trained_run):
    result = subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(trained_run), "-p", "-"], input=b"\xff\xfe bad",
                            capture_output=True)
    assert result.returncode == 1
    assert result.stderr.decode().strip().startswith("error: the prompt on standard input is not UTF-8")


@pytest.mark.slow
def test_recorded_canvases_feed_int8_calibration(capsys, trained_run, data_dir, tmp_path):
    import numpy as np

    code, _, err = dllm(capsys, "run", trained_run, "-p", "Once upon a time", "--steps", 6, "-n", 2, "--no-live",
                        "--save-canvases", tmp_path / "c.npz")
    assert code == 0 and "saved 6 network calls (canvas 6)" in err
    data = np.load(tmp_path / "c.npz")
    assert data["tokens"].shape[0] == 12 and (data["tokens"][0] == data["tokens"][0, -1]).sum() > 10  # the first canvas is mostly masks
    code, out, err = dllm(capsys, "export", trained_run, "-o", tmp_path / "b", "--int8", "--data", data_dir, "--calib-canvases", 8,
                          "--parity-canvases", 4, "--calib-file", tmp_path / "c.npz")
    assert code == 0, err
    cal = json.loads((tmp_path / "b" / "manifest.json").read_text())["calibration"]
    assert cal["recorded_canvases"] == 12 and cal["calibration_canvases"] == 8 + 12


@pytest.mark.parametrize("family", ["bd3", "ar"])
def test_save_canvases_records_every_network_call_of_a_cached_family(family, bd3_bundle, ar_bundle, tmp_path):
    """Block diffusion and the AR baseline record each graph call's inputs (tokens and the cache's valid length), in a
    real `dllm run` process, as many as the run reports."""
    import numpy as np

    bundle = {"bd3": bd3_bundle, "ar": ar_bundle}[family]
    out = tmp_path / "calls.npz"
    steps = ["--steps", "4"] if family == "bd3" else []
    done = subprocess.run([sys.executable, "-m", "jetson_dllm", "run", str(bundle), "-p", "Once upon a time", "--length", "24",
                           *steps, "-n", "2", "--no-live", "--temperature", "0", "--json", "--save-canvases", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    data = np.load(out)
    graphs = {"bd3": ("block_step", "commit_step", "commit"), "ar": ("verify", "decode")}[family]
    counts = {g: len(data[f"{g}.tokens"]) // 2 for g in graphs if f"{g}.tokens" in data}  # two rows a call
    assert f"saved {sum(counts.values())} network calls" in done.stderr
    if family == "ar":  # the start token and the prompt in one verify call, then a decode call per token but the first
        assert counts["verify"] == 1 and counts["verify"] + counts["decode"] == report["evaluations"] == report["new_tokens"]
        prompt = data["verify.tokens"].shape[1]
        assert data["verify.valid_len"].tolist() == [0, 0] and data["verify.width"].tolist() == [prompt, prompt]
        assert data["decode.tokens"].shape[1] == 1 and data["decode.valid_len"].tolist()[:4] == [prompt, prompt, prompt + 1, prompt + 1]
    else:
        assert counts["block_step"] + counts.get("commit_step", 0) == report["evaluations"]
        assert counts.get("commit", 0) == report["cache_passes"] and counts.get("commit_step", 0) == report["folded_commits"]
        assert data["block_step.tokens"].shape[1] == 16 and (data["block_step.valid_len"] % 16 == 0).all()


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    with pytest.raises(DllmError):
        parse_duration("5 minutes")


def test_piped_run_output_is_the_text_exactly_as_generated(trained_run):
    prompt = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. One day she saw a big red ball near the tree and"
    base = [sys.executable, "-m", "jetson_dllm", "run", str(trained_run), "-p", prompt, "--steps", "8", "-n", "2", "--seed", "3"]
    as_json = subprocess.run(base + ["--json"], capture_output=True, text=True)
    assert as_json.returncode == 0, as_json.stderr
    texts = json.loads(as_json.stdout)["texts"]
    assert max(len(t) for t in texts) > 160  # longer than the width a pipe used to be wrapped at
    piped = subprocess.run(base, capture_output=True, text=True)  # stdout is a pipe
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "".join(f"--- sample {i + 1}\n{t}\n" for i, t in enumerate(texts))


def test_eval_text_reproduces_the_split_evaluation(trained_run, data_dir, tmp_path, capsys):
    from jetson_dllm.tokenizer import EOT, TextTokenizer
    from train_host.data import CanvasDataset

    tok = TextTokenizer.from_file(data_dir / "tokenizer.json")
    val = CanvasDataset(data_dir, "val", 64, tok.pad_id)
    ids = np.asarray(val.tokens).tolist()
    docs, doc = [], []
    for t in ids:
        if t == tok.eot_id:
            docs.append(tok.decode(doc))
            doc = []
        else:
            doc.append(t)
    (tmp_path / "stories.txt").write_text(f"\n{EOT}\n".join(docs) + "\n")
    code, out, _ = dllm(capsys, "eval", trained_run, "--data", data_dir, "--canvases", 100000, "--n-t", 2, "--json")
    assert code == 0
    split = json.loads(out)
    code, out, _ = dllm(capsys, "eval", trained_run, "--text", tmp_path / "stories.txt", "--n-t", 2, "--json")
    assert code == 0
    text = json.loads(out)
    assert text["val_tokens"] == split["val_tokens"] and text["scored"].endswith("stories.txt")
    assert text["val_nll"] == pytest.approx(split["val_nll"], rel=1e-9) and text["val_acc"] == pytest.approx(split["val_acc"])


def test_an_undertrained_model_says_so_in_train_and_run(capsys, data_dir, tmp_path):
    code, out, _ = dllm(capsys, "train", "--data", data_dir, "--out", tmp_path / "r", "--steps", 2, "--d-model", 32, "--n-layer", 1,
                        "--n-head", 2, "--canvas-len", 64, "--batch-size", 4, "--eval-canvases", 8)
    assert code == 0 and "the model is undertrained" in out and "--resume --steps" in out
    code, _, err = dllm(capsys, "run", tmp_path / "r", "-p", "Once", "--steps", 2, "--no-live")
    assert code == 0 and "warning: this model is undertrained" in err


@pytest.mark.parametrize("nll, says", [(4.67, "word frequencies alone"), (3.98, "reads like the data below about 3.14"), (3.0, None),
                                       (1.50, None)])
def test_the_verdict_tracks_readable_text(nll, says):
    """The built-in corpus's numbers (word frequencies 5.23): 4.67 and 3.98 wrote gibberish, 1.50 read well."""
    from jetson_dllm.generate import undertrained
    from train_host.launch import summary
    from train_host.train_config import TrainConfig

    why = undertrained({"val_nll": nll, "unigram_nll": 5.23})
    assert (why is None) == (says is None) and (says is None or says in why)
    line = summary({"stop": "time budget", "step": 235, "elapsed": 240.0, "val_nll": nll, "val_acc": 0.2, "unigram_nll": 5.23},
                   TrainConfig(data="d", out="o", steps=1000))
    assert ("undertrained" in line) == (says is not None)
    if says:  # what it takes, in this run's time: 765 more steps at 235 per 4 minutes
        assert "--resume --steps 1000" in line and "about 13 more minutes" in line


def test_long_work_piped_prints_a_line_at_least_every_interval():
    """Piped (no terminal), `working` prints each update with the time so far, and a `still:` line whenever the
    interval passes without one; nothing is lost when it ends."""
    import io
    import time

    from rich.console import Console

    from jetson_dllm.cli.common import working

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with working("exporting", every=0.3, console=console) as status:
        time.sleep(1.0)  # quiet work: heartbeats
        status.update("calibrating")
        time.sleep(0.1)
    lines = buffer.getvalue().splitlines()
    assert lines[0].endswith("] still: exporting") and lines[-1].endswith("] calibrating")  # no line before the first interval
    still = [ln for ln in lines if "still: exporting" in ln]
    assert 2 <= len(still) <= 4, lines  # about one per 0.3 s of the quiet second
    assert all(ln.startswith("[") and " s] " in ln for ln in lines)
