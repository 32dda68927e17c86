"""The state a run resumes from is checked as the weights are (issue 27, class 5): a trainer file that is not JSON,
not an object, missing a count, a truncated optimizer file, an optimizer tensor of another shape, or trainer files
dropped from the hash list, each with the config's hashes (and seal) updated to match, so only the structure check can
catch it. `dllm train --resume` (a real subprocess) refuses each in one line, non-zero, and leaves the run as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from refusal import assert_clean_failure, run, snapshot

FLAGS = ["--d-model", "64", "--n-layer", "2", "--n-head", "2", "--canvas-len", "64", "--batch-size", "8", "--steps", "40",
         "--eval-every", "10", "--eval-canvases", "16", "--warmup", "5", "--lr", "3e-3", "--threads", "1", "--resume"]


def _rehash(ckpt: Path, drop: tuple[str, ...] = ()) -> None:
    """Re-seal the checkpoint's config with its files' current hashes (as one who 'fixed' the hashes would)."""
    from jetson_dllm.files import sha256_file
    from jetson_dllm.manifests import SEAL, write_manifest

    config = json.loads((ckpt / "config.json").read_text())
    config.pop(SEAL, None)
    config["files"] = {f.name: sha256_file(f) for f in sorted(ckpt.iterdir()) if f.name != "config.json" and f.name not in drop}
    write_manifest(ckpt / "config.json", config)


def _json(text: str):
    def change(ckpt: Path) -> None:
        (ckpt / "trainer.json").write_text(text)
    return change


def _meta(**changes):
    def change(ckpt: Path) -> None:
        meta = json.loads((ckpt / "trainer.json").read_text())
        meta.update(changes)
        (ckpt / "trainer.json").write_text(json.dumps(meta))
    return change


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "trainer.safetensors").read_bytes()
    (ckpt / "trainer.safetensors").write_bytes(data[: len(data) // 2])


def _reshape(ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "trainer.safetensors"))
    name = next(k for k in tensors if k.startswith("opt.") and k.endswith("exp_avg"))
    tensors[name] = tensors[name].flatten()[:3].clone()
    save_file(tensors, str(ckpt / "trainer.safetensors"))


CASES = {
    "not JSON": (_json("{\"step\": 10,"), "trainer.json is not JSON"),
    "not an object": (_json("[1, 2]"), "not an object"),
    "step missing": (_meta(step=None), "step is 'None', not a count"),
    "negative count": (_meta(samples_seen=-5), "samples_seen"),
    "optimizer record": (_meta(optimizer={"param_groups": "x"}), "param_groups"),
    "truncated tensors": (_truncate, "trainer.safetensors"),
    "tensor of another shape": (_reshape, "another shape"),
}


@pytest.fixture(scope="module")
def resumable(data_dir, tmp_path_factory) -> Path:
    from tests.conftest import train_small

    out = tmp_path_factory.mktemp("resumable") / "run"
    train_small(data_dir, out, steps=10, pause_after=10)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_trainer_state_is_refused(resumable, data_dir, tmp_path, case):
    from train_host.checkpoint import list_checkpoints

    change, match = CASES[case]
    copy = tmp_path / "run"
    shutil.copytree(resumable, copy)
    ckpt = list_checkpoints(copy)[-1]
    change(ckpt)
    _rehash(ckpt)
    before = snapshot(copy)
    code, _, err = run("train", "--data", data_dir, "--out", copy, *FLAGS)
    assert_clean_failure(code, err, match)
    assert snapshot(copy) == before


def test_trainer_files_dropped_from_the_hash_list_are_refused(resumable, data_dir, tmp_path):
    from train_host.checkpoint import list_checkpoints

    copy = tmp_path / "run"
    shutil.copytree(resumable, copy)
    _rehash(list_checkpoints(copy)[-1], drop=("trainer.json", "trainer.safetensors"))
    before = snapshot(copy)
    code, _, err = run("train", "--data", data_dir, "--out", copy, *FLAGS)
    assert_clean_failure(code, err, "is not hashed in the config")
    assert snapshot(copy) == before


def test_an_intact_state_resumes(resumable, data_dir, tmp_path):
    """The check refuses only what is wrong: the untouched copy resumes and trains on."""
    copy = tmp_path / "run"
    shutil.copytree(resumable, copy)
    code, out, err = run("train", "--data", data_dir, "--out", copy, *FLAGS[:-3], "--steps", "12", "--threads", "1", "--resume", timeout=300)
    assert code == 0, err[-2000:]
    assert "resuming" in err and "from step 10" in err
