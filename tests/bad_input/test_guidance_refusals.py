"""Guidance and pairs through the real `dllm` entry point: guidance on a family without a condition, a corpus without pairs, a pairs file that holds none; one line, a non-zero exit, nothing written. And a
guided run that works, on onnxruntime (the logits of a 2-row call)."""

from __future__ import annotations

import json

import pytest
from refusal import assert_clean_failure, run

from jetson_dllm.errors import DllmError


def test_a_guided_run_on_onnxruntime(bundle_dir):
    code, out, err = run("run", bundle_dir, "--backend", "onnx", "-p", "Once upon a time", "--steps", "4", "--length", "8",
                         "--guidance", "2", "--guidance-schedule", "late", "--json", "--no-live")
    assert code == 0, err
    got = json.loads(out)
    assert got["texts"][0].startswith("Once upon a time") and got["evaluations"] <= 4
    assert got["sampler"]["guidance"] == 2.0 and got["sampler"]["guidance_schedule"] == "late"


def test_guidance_on_a_family_without_a_condition(bd3_bundle, ar_bundle):
    """(No prompt at all is refused before guidance is read: `dllm run` needs one; the server's case is in test_serve.)"""
    for bundle, match in ((bd3_bundle, "--guidance on a block-diffusion model pulls toward a condition, and this one was trained without one"),
                          (ar_bundle, "--guidance does not apply to the autoregressive")):
        code, _, err = run("run", bundle, "-p", "Once", "--guidance", "1", "--no-live")
        assert_clean_failure(code, err, match)


def test_a_corpus_without_pairs_writes_nothing(tmp_path):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(f"a story with no end {i}" for i in range(40)) + "\n")
    out = tmp_path / "d"
    code, _, err = run("data", corpus, "--format", "lines", "--pairs", "-o", out, "--vocab-size", "300", "--val-fraction", "0.1")
    assert_clean_failure(code, err, "no train document has a first sentence")
    assert not out.exists()


def test_a_pairs_file_without_pairs_is_refused_with_its_line(tmp_path):
    from train_host.pairs import read_pairs

    path = tmp_path / "pairs.val.jsonl"
    for text, match in [("", "holds no pairs"), ('{"condition": "A.", "text": ""}\n', "line 1 is not a pair"),
                        ('{"condition": "A.", "text": "B."}\nnot json\n', "line 2 is not UTF-8 JSON"), ("[1, 2]\n", "line 1 is not a pair")]:
        path.write_text(text)
        with pytest.raises(DllmError, match=match):
            read_pairs(path)
    with pytest.raises(DllmError, match="does not exist"):
        read_pairs(tmp_path / "nowhere.jsonl")
