import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SMALL, assert_same, train_small, weights

from jetson_dllm.errors import DllmError
from train_host import checkpoint as ck
from train_host import diffusion


def test_run_writes_checkpoints_metrics_and_curves(trained_run):
    assert (trained_run / "metrics.jsonl").is_file() and (trained_run / "metrics.csv").is_file()
    assert (trained_run / "curves.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_nll" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]  # it learns
    assert evals[-1]["val_nll"] < evals[0]["val_nll"]
    assert len(ck.list_checkpoints(trained_run)) == 3


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_is_exact(data_dir, tmp_path, ema):
    straight = train_small(data_dir, tmp_path / "straight", steps=8, ema=ema, eval_every=100)
    first = train_small(data_dir, tmp_path / "split", steps=8, ema=ema, eval_every=100, pause_after=4)
    assert first["stop"] == "paused" and first["step"] == 4
    second = train_small(data_dir, tmp_path / "split", steps=8, ema=ema, eval_every=100, resume=True)
    assert straight["step"] == second["step"] == 8
    assert_same(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    if ema:
        _, meta = ck.load_trainer_state(ck.resolve_checkpoint(tmp_path / "split", "latest"))
        raw, _ = ck.load_trainer_state(ck.resolve_checkpoint(tmp_path / "split", "latest"))
        assert not torch.equal(raw["raw.tok_emb.weight"], weights(tmp_path / "split")["tok_emb.weight"])  # EMA differs from raw


def test_existing_run_is_not_overwritten_without_resume(data_dir, trained_run):
    before = weights(trained_run)
    with pytest.raises(DllmError, match="--resume"):
        train_small(data_dir, trained_run, steps=5)
    assert_same(before, weights(trained_run))


def test_resume_with_another_shape_is_refused(data_dir, tmp_path):
    train_small(data_dir, tmp_path / "r", steps=4, eval_every=100)
    with pytest.raises(DllmError, match="another shape"):
        train_small(data_dir, tmp_path / "r", steps=8, resume=True, d_model=32)


def test_resume_on_data_of_another_tokenizer_is_refused(data_dir, tmp_path):
    from conftest import make_data

    other = make_data(tmp_path / "other", stories=300, vocab_size=512)  # same vocabulary size, another tokenizer
    train_small(data_dir, tmp_path / "r", steps=2, eval_every=100)
    with pytest.raises(DllmError, match="another tokenizer"):
        train_small(other, tmp_path / "r", steps=4, resume=True)


def test_a_metrics_line_cut_by_a_kill_does_not_stop_resume(data_dir, tmp_path):
    train_small(data_dir, tmp_path / "r", steps=4, eval_every=2)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # what kill -9 during an append leaves
    result = train_small(data_dir, tmp_path / "r", steps=6, eval_every=2, resume=True)
    assert result["step"] == 6
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(ln)["step"] <= 6 for ln in lines) and any(json.loads(ln)["step"] == 6 for ln in lines)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real = diffusion.mdlm_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 5 else loss), stats

    monkeypatch.setattr(diffusion, "mdlm_loss", poisoned)
    with pytest.raises(DllmError, match="loss became nan at step 5.*step 4"):
        train_small(data_dir, tmp_path / "r", steps=10, eval_every=2)
    ckpts = ck.list_checkpoints(tmp_path / "r")
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000004"]
    model, _, _ = ck.load_model(tmp_path / "r", which="latest")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_settings_are_refused(data_dir, tmp_path):
    for bad, match in [(dict(steps=0), "--steps"), (dict(batch_size=7, grad_accum=2), "split evenly"), (dict(lr=-1.0), "--lr"),
                       (dict(ema=1.5), "--ema"), (dict(schedule="sqrt"), "schedule"), (dict(device="tpu"), "unknown --device"),
                       (dict(dtype="bf16", device="cpu"), "for GPUs")]:
        with pytest.raises(DllmError, match=match):
            train_small(data_dir, tmp_path / "bad", **bad)
    with pytest.raises(DllmError, match="not a prepared data folder"):
        train_small(tmp_path, tmp_path / "bad")
    with pytest.raises(DllmError, match="unknown --config 'gigantic'"):
        train_small(data_dir, tmp_path / "bad", config="gigantic")


def _cli_train(data_dir, out, *extra):
    return [sys.executable, "-m", "jetson_dllm", "train", "--data", str(data_dir), "--out", str(out),
            "--d-model", str(SMALL["d_model"]), "--n-layer", str(SMALL["n_layer"]), "--n-head", str(SMALL["n_head"]),
            "--canvas-len", str(SMALL["canvas_len"]), "--batch-size", "8", "--warmup", "5", "--lr", "3e-3",
            "--eval-canvases", "16", "--log-every", "1", *extra]


@pytest.mark.slow
def test_sigterm_during_export_leaves_nothing_behind(trained_run, tmp_path):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "jetson_dllm", "export", str(trained_run), "-o", str(out), "--int8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".b.tmp-*")):  # wait until the bundle is being written
        time.sleep(0.05)
    assert list(tmp_path.glob(".b.tmp-*")), "the export never started writing"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr.read()
    assert not out.exists() and not list(tmp_path.glob(".b.tmp-*"))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(data_dir, tmp_path):
    run = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli_train(data_dir, run, "--steps", "100000", "--eval-every", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is training
        line = proc.stderr.readline()
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "interrupted at step" in out
    ckpts = ck.list_checkpoints(run)
    assert len(ckpts) == 1 and int(ckpts[0].name[5:]) >= 3
    _, meta = ck.load_trainer_state(ckpts[0])
    assert meta["step"] == int(ckpts[0].name[5:])
    done = subprocess.run(_cli_train(data_dir, run, "--steps", str(meta["step"] + 2), "--eval-every", "100000", "--resume"),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} from step {meta['step']}" in done.stderr.replace("\n", "")
    assert re.search(rf"step {meta['step'] + 2}/{meta['step'] + 2}, \d+m\d\ds left", done.stderr), done.stderr  # the resumed run's time left


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--steps", "3", "--eval-every", "100", "--threads", "1"]
    single = subprocess.run(_cli_train(data_dir, tmp_path / "one", *common), capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    # dllm train --nproc 2 relaunches itself as torchrun --nproc_per_node 2 -m train_host.train (gloo on a CPU)
    ddp = subprocess.run(_cli_train(data_dir, tmp_path / "two", *common, "--nproc", "2"), capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same(weights(tmp_path / "one"), weights(tmp_path / "two"), exact=False)
    one_opt, _ = ck.load_trainer_state(ck.list_checkpoints(tmp_path / "one")[-1])
    two_opt, _ = ck.load_trainer_state(ck.list_checkpoints(tmp_path / "two")[-1])
    torch.testing.assert_close(one_opt["opt.0.exp_avg"], two_opt["opt.0.exp_avg"], atol=1e-6, rtol=1e-4)


def test_warm_up_and_decay_follow_the_same_clock_under_a_time_budget():
    from dataclasses import replace

    from train_host.optim import lr_at
    from train_host.train_config import TrainConfig

    tc = TrainConfig(data="d", out="o", steps=1000, warmup=50, lr=1e-3, min_lr_ratio=0.1, time_budget=240)
    slow = lr_at(tc, step=10, progress=0.1)  # a slow machine: 10 steps done in a tenth of the time
    assert 0.95e-3 < slow < 1e-3  # warm-up finished (by the clock) and the decay started
    assert lr_at(replace(tc, time_budget=0), step=10, progress=10 / 1000) == pytest.approx(1e-3 * 11 / 50, rel=0.01)
    assert lr_at(tc, step=999, progress=1.0) == pytest.approx(1e-4)


def test_a_time_budget_reaches_the_peak_rate_even_in_few_steps(data_dir, tmp_path):
    result = train_small(data_dir, tmp_path / "r", steps=100_000, warmup=5_000, time_budget=3.0, eval_every=100_000, log_every=1)
    assert result["stop"] == "time budget" and result["step"] < 5_000  # far fewer steps than the step warm-up
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"lr"' in ln]
    assert max(lrs) > 0.9 * 3e-3  # the schedule followed the clock: it warmed up within the budget
    assert "unigram_nll" in result and result["val_nll"] < result["unigram_nll"] * 1.5
