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
