"""Greedy outputs of every family on every backend, against a golden file written on main before the family
registry (0f51ad5): a refactor that changes what a model writes fails here. Regenerate only on purpose:
DLLM_WRITE_GOLDEN=1 pytest tests/test_greedy_golden.py (and say why in the commit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "fixtures" / "greedy_tokens.json"
PROMPT = "Once upon a time"


def _greedy(path: Path, backend: str, family: str) -> list[list[int]]:
    steps = [] if family == "ar" else ["--steps", "8"]  # the AR baseline refuses --steps (it has none); it ignored it before
    cmd = [sys.executable, "-m", "jetson_dllm", "run", str(path), "-p", PROMPT, "--backend", backend, "--temperature", "0",
           *steps, "--length", "32", "-n", "2", "--json", "--no-live"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("\n") == 1  # --json is one line, not a token per line
    return json.loads(done.stdout)["tokens"]


@pytest.fixture(scope="module")
def models(trained_run, bundle_dir, bd3_run, bd3_bundle, ar_run, ar_bundle) -> dict[str, tuple[Path, Path]]:
    return {"mdlm": (trained_run, bundle_dir), "bd3": (bd3_run, bd3_bundle), "ar": (ar_run, ar_bundle)}


@pytest.mark.parametrize("family", ["mdlm", "bd3", "ar"])
def test_greedy_tokens_are_unchanged(models, family):
    run, bundle = models[family]
    got = {"torch": _greedy(run, "torch", family), "onnx": _greedy(bundle, "onnx", family)}
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("DLLM_WRITE_GOLDEN"):
        golden[family] = got
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    assert family in golden, f"no golden tokens for {family}; write them with DLLM_WRITE_GOLDEN=1"
    assert got == golden[family]
