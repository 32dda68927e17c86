"""Every single-byte change in any file of a checkpoint or a bundle is refused, with the file named, by every command
that reads it (`run`, `eval`, `export` on a checkpoint; `run`, `inspect` on a bundle). Positions are sampled in every
file: the first and last bytes, and random ones between."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from refusal import assert_clean_failure, call, snapshot

POSITIONS_PER_FILE = 4


def flips(folder: Path, seed: int):
    """(relative file, position) pairs: the first and last byte and random ones, for every file (engines aside)."""
    rng = random.Random(seed)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "engines" not in p.parts):
        size = path.stat().st_size
        for pos in sorted({0, size - 1, *(rng.randrange(size) for _ in range(POSITIONS_PER_FILE - 2))}):
            yield path.relative_to(folder), pos


def flipped(src: Path, dst: Path, rel: Path, pos: int) -> None:
    shutil.copytree(src, dst)
    data = bytearray((dst / rel).read_bytes())
    data[pos] ^= 0x20 if data[pos] in range(0x41, 0x7B) else 0x01  # a letter changes case; anything else changes its low bit
    (dst / rel).write_bytes(bytes(data))


def test_every_file_of_a_checkpoint(trained_run, data_dir, tmp_path):
    from train_host.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(trained_run)
    cases = list(flips(ckpt, seed=1))
    assert len({rel for rel, _ in cases}) == 5 and len(cases) >= 18  # model, tokenizer, trainer (2), config
    for i, (rel, pos) in enumerate(cases):
        copy = tmp_path / f"c{i}"
        flipped(ckpt, copy, rel, pos)
        before = snapshot(copy)
        for command in (["run", copy, "-p", "Once", "--steps", "2", "--no-live"], ["eval", copy, "--data", data_dir, "--canvases", "2"],
                        ["export", copy, "-o", tmp_path / f"b{i}"]):
            code, _, err = call(*command)
            assert_clean_failure(code, err, rel.name)
        assert snapshot(copy) == before and not (tmp_path / f"b{i}").exists()
        shutil.rmtree(copy)


def test_every_file_of_a_bundle(bundle_dir, tmp_path):
    cases = list(flips(bundle_dir, seed=2))
    assert len({rel for rel, _ in cases}) == 6 and len(cases) >= 22  # manifest, tokenizer, four graphs
    for i, (rel, pos) in enumerate(cases):
        copy = tmp_path / f"b{i}"
        flipped(bundle_dir, copy, rel, pos)
        for command in (["run", copy, "-p", "Once", "--steps", "2", "--no-live"], ["inspect", copy]):
            code, _, err = call(*command)
            assert_clean_failure(code, err, rel.name)
        shutil.rmtree(copy)


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json", "model.fp32.onnx"])
def test_a_file_swapped_for_a_link_outside_is_refused(name, bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(copy / name, outside / name)
    (copy / name).unlink()
    (copy / name).symlink_to(outside / name)
    for command in (["run", copy, "-p", "Once", "--steps", "2", "--no-live"], ["inspect", copy]):
        code, _, err = call(*command)
        assert_clean_failure(code, err, name)
