"""Shared fixtures: a small built-in data set and a briefly trained small model (seconds on a CPU)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# The small model every test trains: the tiny config narrowed so a step takes milliseconds.
SMALL = dict(config="tiny", d_model=64, n_layer=2, n_head=2, canvas_len=64)


def make_data(out: Path, stories: int = 600, vocab_size: int = 512) -> Path:
    from train_host.data import prepare_data
    from train_host.sources import Source

    prepare_data([Source("builtin", builtin_stories=stories)], out, vocab_size=vocab_size, val_fraction=0.05)
    return out


def train_small(data: Path, out: Path, steps: int = 20, **overrides) -> dict:
    from rich.console import Console

    from train_host.train import train
    from train_host.train_config import TrainConfig

    settings = dict(SMALL, batch_size=8, steps=steps, eval_every=10, eval_canvases=16, warmup=5, lr=3e-3,
                    log_every=5, threads=1, seed=0)
    settings.update(overrides)
    tc = TrainConfig(data=str(data), out=str(out), **settings)
    return train(tc, console=Console(stderr=True, quiet=True))


def weights(run, which="latest"):
    """A run's checkpoint weights (the run's own, EMA when it keeps one)."""
    from safetensors.torch import load_file

    from train_host import checkpoint as ck

    return load_file(str(ck.resolve_checkpoint(run, which) / "model.safetensors"))


def assert_same(a, b, exact=True):
    import torch

    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "data")


@pytest.fixture(scope="session")
def pairs_data(tmp_path_factory) -> Path:
    """Built-in stories with their (first sentence -> rest) pairs: conditional models' data."""
    from train_host.data import prepare_data
    from train_host.sources import Source

    out = tmp_path_factory.mktemp("pairs") / "data"
    prepare_data([Source("builtin", builtin_stories=600)], out, vocab_size=512, val_fraction=0.05, pairs=True)
    return out


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train_small(data_dir, out, steps=30)
    return out


@pytest.fixture(scope="session")
def bundle_dir(trained_run, data_dir, tmp_path_factory) -> Path:
    """The trained small model exported with FP32, FP16 and INT8 (calibrated on its validation split)."""
    from calibration.quantize import Int8Options
    from train_host.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(trained_run, out, precisions=("fp32", "fp16", "int8"), data_dir=str(data_dir), parity_canvases=8,
                  int8=Int8Options(n_canvases=16, eval_canvases=16, budget=100.0))
    return out


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def ar_run(data_dir, tmp_path_factory) -> Path:
    """The autoregressive baseline, trained the same way as `trained_run`."""
    out = tmp_path_factory.mktemp("ar") / "ar"
    train_small(data_dir, out, steps=30, objective="ar")
    return out


@pytest.fixture(scope="session")
def adapted_run(ar_run, data_dir, tmp_path_factory) -> Path:
    """BD3 (block 4) adapted from the AR parent with the shift and complementary masks, briefly: the parent's
    tokenizer, so it can draft for it."""
    out = tmp_path_factory.mktemp("adapted") / "run"
    train_small(data_dir, out, steps=4, eval_every=2, objective="bd3", block_size=4, t_min=0.3, t_max=0.8, shift=True,
                complementary=True, init=str(ar_run))
    return out


def pytest_collection_modifyitems(config, items):
    """`jetson` tests run only on a Jetson (L4T release file present); elsewhere they skip with the reason."""
    if Path("/etc/nv_tegra_release").is_file():
        return
    skip = pytest.mark.skip(reason="needs a Jetson (no /etc/nv_tegra_release here)")
    for item in items:
        if "jetson" in item.keywords:
            item.add_marker(skip)


HEARTBEAT_S = float(os.environ.get("DLLM_TEST_HEARTBEAT_S", "30"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test (its fixtures included: a session fixture may train a model) running longer than HEARTBEAT_S says so
    every HEARTBEAT_S seconds, so that `-q` on a busy machine never looks like a hang. Not a test that captures its
    own output (capsys, capfd): pausing the run's capture to write would take its stream from under it."""
    import threading

    if {"capsys", "capsysbinary", "capfd", "capfdbinary"} & set(getattr(item, "fixturenames", ())):
        yield
        return

    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    capture = item.config.pluginmanager.get_plugin("capturemanager")
    done = threading.Event()

    def beat() -> None:
        waited = 0.0
        while not done.wait(HEARTBEAT_S):
            waited += HEARTBEAT_S
            if reporter is None:
                continue
            # past the run's own output capture (fd level) to the terminal; a test's capsys (Python level) is untouched
            if capture is not None:
                capture.suspend_global_capture()
            try:
                reporter.write(f"[{item.nodeid} still running: {waited:.0f} s]")
                reporter.flush()
            finally:
                if capture is not None:
                    capture.resume_global_capture()

    threading.Thread(target=beat, daemon=True).start()
    try:
        yield
    finally:
        done.set()


@pytest.fixture(scope="session")
def bd3_run(data_dir, tmp_path_factory) -> Path:
    """A small block-diffusion model (block 16 of the 64-token canvas), briefly trained on a fixed noise range."""
    out = tmp_path_factory.mktemp("bd3") / "bd3"
    train_small(data_dir, out, steps=6, eval_every=3, objective="bd3", block_size=16, t_min=0.3, t_max=0.8)
    return out


@pytest.fixture(scope="session")
def bd3_bundle(bd3_run, data_dir, tmp_path_factory) -> Path:
    """The block-diffusion model exported: FP32, FP16 and INT8 block-step and commit graphs, checked against torch."""
    from calibration.quantize import Int8Options
    from train_host.export import export_bundle

    out = tmp_path_factory.mktemp("bd3-bundle") / "bundle"
    export_bundle(bd3_run, out, precisions=("fp32", "fp16", "int8"), data_dir=str(data_dir),
                  int8=Int8Options(n_canvases=16, eval_canvases=16, budget=100.0))
    return out


@pytest.fixture(scope="session")
def ar_bundle(ar_run, tmp_path_factory) -> Path:
    """The baseline exported: its decode graph with a KV cache, FP32 and FP16."""
    from train_host.export import export_bundle

    out = tmp_path_factory.mktemp("ar-bundle") / "bundle"
    export_bundle(ar_run, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m jetson_dllm serve BUNDLE` on a free port, waited for until /health answers."""

    def __init__(self, bundle: Path, *extra: str):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "jetson_dllm", "serve", str(bundle), "--port", str(self.port), "--model-name", "tiny",
                                      "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server died: {self.proc.stderr.read()}")
        raise RuntimeError("the server did not start in 60 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        return self.proc.returncode


def all_precisions_bundle(run: Path, data_dir: Path, folder: Path) -> Path:
    """`run` exported at FP32, FP16 and INT8 (calibrated on `data_dir`, a small budget) into `folder`/bundle."""
    from calibration.quantize import Int8Options
    from train_host.export import export_bundle

    export_bundle(run, folder / "bundle", precisions=("fp32", "fp16", "int8"), data_dir=str(data_dir), parity_canvases=8,
                  int8=Int8Options(n_canvases=16, eval_canvases=16, budget=100.0))
    return folder / "bundle"


def no_nll_evaluation(run: Path, data_dir: Path) -> tuple[dict, str]:
    """A noise-level family's run: its last evaluation's metrics (checked to hold no NLL) and `dllm eval`'s output
    (checked to say it is not an NLL)."""
    import json

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "val_loss" in m]
    assert evals and not any("val_nll" in m for m in metrics)
    done = subprocess.run([sys.executable, "-m", "jetson_dllm", "eval", str(run), "--data", str(data_dir), "--canvases", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "not an NLL" in done.stdout and "NLL bound" not in done.stdout
    return evals[-1], done.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def browser_page(url: str):
    """The server's page in a headless Chromium (Debian's, through playwright), closed afterwards."""
    import pytest

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()


def server_fixture(bundle_fixture: str, *extra: str):
    """A module-scoped fixture: a server (Server) over the bundle another fixture names, stopped after the module."""
    import pytest

    @pytest.fixture(scope="module")
    def serving(request):
        s = Server(request.getfixturevalue(bundle_fixture), *extra)
        yield s
        s.stop()

    return serving


def concurrently(fn, count: int, timeout: float = 150) -> list:
    """fn(0) .. fn(count - 1) at once, each in its own thread; their return values (None for one still running)."""
    import threading

    results = [None] * count

    def one(i):
        results[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return results
