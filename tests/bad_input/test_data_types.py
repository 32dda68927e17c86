"""Data of the wrong type in JSONL and parquet, through the real `dllm data`: a record whose text is missing (null,
NaN) is skipped and counted; one whose text is a number, an object or a list, a line too deep or too long a number
for JSON, is refused with where it is; nothing is written."""

from __future__ import annotations

import json

import pytest
from refusal import assert_clean_failure, run

GOOD = '{"text": "Once upon a time there was a cat who liked to nap in the sun."}\n'


def test_records_without_text_are_skipped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD * 30 + '{"text": null}\n{"text": NaN}\n' + GOOD)
    code, out, err = run("data", path, "-o", tmp_path / "out", "--vocab-size", "300")
    assert code == 0, err
    assert "2 records with no text (null or NaN) skipped" in out
    manifest = json.loads((tmp_path / "out" / "data.json").read_text())
    assert manifest["skipped_empty_records"] == 2
    assert manifest["splits"]["train"]["docs"] + manifest["splits"]["val"]["docs"] == 31  # "None"/"nan" never became a story


@pytest.mark.parametrize("line, match", [
    ('{"text": 5}', "line 2: the 'text' field holds int"),
    ('{"text": {"a": 1}}', "holds dict"),
    ('{"text": ["a", "b"]}', "holds list"),
    ('{"text": 1.5}', "holds float"),
    ('{"text": ' + "9" * 5000 + "}", "line 2 cannot be read"),
    ('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}", "line 2 cannot be read"),
], ids=["number", "object", "list", "float", "5000-digit number", "200000-deep array"])
def test_text_of_another_type_is_refused_with_its_line(line, match, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(GOOD + line + "\n" + GOOD)
    code, _, err = run("data", path, "-o", tmp_path / "out", "--vocab-size", "300")
    assert_clean_failure(code, err, match)
    assert not (tmp_path / "out").exists()


def test_parquet_rows_of_another_type(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Tom had a red ball and a small dog."] * 30 + [None]}), tmp_path / "ok.parquet")
    code, out, err = run("data", tmp_path / "ok.parquet", "-o", tmp_path / "ok", "--vocab-size", "300")
    assert code == 0 and "1 records with no text" in out, err
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    code, _, err = run("data", tmp_path / "ints.parquet", "-o", tmp_path / "bad", "--vocab-size", "300")
    assert_clean_failure(code, err, "record 1: the 'text' field holds int")
    assert not (tmp_path / "bad").exists()


def test_shards_with_ids_outside_the_vocabulary_or_an_empty_split_are_refused(data_dir, tmp_path):
    """Token shards that parse but say the wrong thing (their hashes are of the index files, not the GBs of tokens)."""
    import shutil

    import numpy as np

    bad = tmp_path / "ids"
    shutil.copytree(data_dir, bad)
    tokens = np.memmap(bad / "train.bin", dtype=np.uint16, mode="r+")
    tokens[5] = 65000  # past the 512-token vocabulary
    tokens.flush()
    code, _, err = run("train", "--data", bad, "--out", tmp_path / "run", "--steps", "1", "--d-model", "32", "--n-layer", "1",
                       "--n-head", "2", "--canvas-len", "32", "--batch-size", "2")
    assert_clean_failure(code, err, "token id 65000, outside the vocabulary")
    assert not (tmp_path / "run").exists()
    from jetson_dllm.files import sha256_file
    from jetson_dllm.manifests import write_manifest

    empty = tmp_path / "empty"  # a consistent, sealed data folder whose validation split holds nothing
    shutil.copytree(data_dir, empty)
    (empty / "val.bin").write_bytes(b"")
    np.save(empty / "val.idx.npy", np.zeros(1, dtype=np.int64))
    manifest = json.loads((empty / "data.json").read_text())
    manifest["files"]["val.idx.npy"] = sha256_file(empty / "val.idx.npy")
    manifest["splits"]["val"] = {**manifest["splits"]["val"], "docs": 0, "tokens": 0}
    write_manifest(empty / "data.json", manifest)
    code, _, err = run("train", "--data", empty, "--out", tmp_path / "run2", "--steps", "1", "--d-model", "32", "--n-layer", "1",
                       "--n-head", "2", "--canvas-len", "32", "--batch-size", "2")
    assert_clean_failure(code, err, "the val split of")
    assert "is empty" in err and not (tmp_path / "run2").exists()


def test_save_canvases_into_a_missing_folder_or_onto_a_folder(bundle_dir, tmp_path):
    for target, match in [(tmp_path / "nowhere" / "c.npz", "does not exist"), (tmp_path, "is a folder")]:
        code, _, err = run("run", bundle_dir, "-p", "Once", "--length", "8", "--steps", "2", "--no-live", "--save-canvases", target)
        assert_clean_failure(code, err, match)
    assert not (tmp_path / "nowhere").exists()
