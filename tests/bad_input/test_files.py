"""Files that parse but say the wrong thing: every manifest mutated (and sealed again, so the schema and the checks
behind it are what must refuse it), paths that leave their folder, and folders a tool did not make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from refusal import assert_clean_failure, call, run, snapshot

from jetson_dllm.manifests import seal

HEX = "ab" * 32
# (dotted key, bad value): a key set to a value of the wrong type or out of range; None deletes the key
BUNDLE_MUTATIONS = [
    ("version", "2"), ("version", 1), ("version", 3), ("version", None), ("format", "other"), ("format", None),
    ("model", None), ("model", "tiny"), ("model.n_head", 0), ("model.n_head", 3), ("model.n_head", "2"), ("model.d_model", -64),
    ("model.canvas_len", 1000000), ("model.canvas_len", 4), ("model.vocab_size", 0), ("model.mask_id", 99999),
    ("model.rope_theta", "x"), ("model.norm_eps", 0), ("model.causal", "no"), ("model.extra_field", 1), ("model.n_layer", None),
    ("special_ids", None), ("special_ids.mask", -1), ("special_ids.mask", 99999), ("special_ids.mask", 5), ("special_ids.pad", "0"),
    ("canvas_lengths", []), ("canvas_lengths", [0]), ("canvas_lengths", [1000000]), ("canvas_lengths", "32"), ("canvas_lengths", None),
    ("heads.sampling.k", 0), ("heads.sampling.k", 100000), ("heads.sampling.k", "64"), ("heads", None),
    ("precisions", {}), ("precisions", None), ("precisions.fp99", {"file": "model.fp32.onnx"}),
    ("precisions.fp32.file", "../outside/x.onnx"), ("precisions.fp32.file", "/etc/passwd"), ("precisions.fp32.file", "nothere.onnx"),
    ("precisions.fp32.file", ""), ("precisions.fp32.file", 5), ("precisions.fp32", None),
    ("files", {}), ("files", None), ("files.tokenizer.json", "zz"), ("files.tokenizer.json", None), ("files.../secret.txt", HEX),
    ("files./etc/passwd", HEX), ("tokenizer_sha256", "x"), ("opset", "18"), ("fp32_nodes", "all"), ("files.model.fp32.onnx", HEX),
]
CHECKPOINT_MUTATIONS = [
    ("version", "2"), ("version", 1), ("format", "hf"), ("model.n_head", 0), ("model.canvas_len", 1000000), ("model", []),
    ("step", -1), ("step", "5"), ("metrics", None), ("special_ids.eot", "1"), ("files", {}), ("files.model.safetensors", None),
    ("files.../x", HEX), ("files./abs", HEX), ("files.model.safetensors", "00" * 32), ("files.tokenizer.json", 7),
]
DATA_MUTATIONS = [
    ("version", 1), ("vocab_size", 0), ("vocab_size", "512"), ("splits.train.tokens", -1), ("splits", None), ("special_ids.mask", None),
    ("tokenizer_sha256", 5), ("files", None), ("files.train.idx.npy", "00" * 32), ("files.tokenizer.json", None),
]


def mutate(data: dict, key: str, value):
    """A copy of `data` with the dotted `key` (whose last part may itself hold dots: file names) set or deleted."""
    data = json.loads(json.dumps(data))
    node, parts = data, key.split(".")
    while len(parts) > 1 and isinstance(node.get(parts[0]), dict):
        node, parts = node[parts[0]], parts[1:]
    name = ".".join(parts)
    if value is None:
        node.pop(name, None)
    else:
        node[name] = value
    return data


def rewrite(path: Path, data: dict) -> None:
    path.write_bytes(seal(data))


@pytest.mark.parametrize("key, value", BUNDLE_MUTATIONS, ids=[f"{k}={v!r}"[:50] for k, v in BUNDLE_MUTATIONS])
def test_a_bundle_manifest_that_says_the_wrong_thing_is_refused(key, value, bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    rewrite(copy / "manifest.json", mutate(json.loads((copy / "manifest.json").read_text()), key, value))
    for command in (["run", copy, "-p", "Once", "--steps", "2", "--no-live"], ["inspect", copy], ["profile", copy, "--canvas", "32"]):
        code, _, err = call(*command)
        assert_clean_failure(code, err)


@pytest.mark.parametrize("key, value", [("heads.sampling.k", 511), ("heads.sampling.k", 32)])
def test_what_only_the_graph_can_contradict_is_refused_when_it_is_opened(key, value, bundle_dir, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    rewrite(copy / "manifest.json", mutate(json.loads((copy / "manifest.json").read_text()), key, value))
    code, _, err = call("run", copy, "-p", "Once", "--steps", "2", "--no-live")
    assert_clean_failure(code, err, "top-")


@pytest.mark.parametrize("key, value", CHECKPOINT_MUTATIONS, ids=[f"{k}={v!r}"[:50] for k, v in CHECKPOINT_MUTATIONS])
def test_a_checkpoint_config_that_says_the_wrong_thing_is_refused(key, value, trained_run, data_dir, tmp_path):
    copy = tmp_path / "r"
    shutil.copytree(trained_run, copy)
    for ckpt in (copy / "checkpoints").iterdir():
        rewrite(ckpt / "config.json", mutate(json.loads((ckpt / "config.json").read_text()), key, value))
    for command in (["run", copy, "-p", "Once", "--steps", "2", "--no-live"], ["eval", copy, "--data", data_dir, "--canvases", "2"],
                    ["export", copy, "-o", tmp_path / "b"]):
        code, _, err = call(*command)
        assert_clean_failure(code, err)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("key, value", DATA_MUTATIONS, ids=[f"{k}={v!r}"[:50] for k, v in DATA_MUTATIONS])
def test_a_data_manifest_that_says_the_wrong_thing_is_refused(key, value, data_dir, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    rewrite(copy / "data.json", mutate(json.loads((copy / "data.json").read_text()), key, value))
    code, _, err = call("train", "--data", copy, "--out", tmp_path / "r", "--steps", "1", "--d-model", "32", "--n-layer", "1", "--n-head", "2")
    assert_clean_failure(code, err)
    assert not (tmp_path / "r" / "checkpoints").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())))
def test_any_junk_as_a_manifest_is_refused(junk, bundle_dir, tmp_path_factory):
    copy = tmp_path_factory.mktemp("junk") / "b"
    shutil.copytree(bundle_dir, copy)
    (copy / "manifest.json").write_bytes(junk)
    code, _, err = call("inspect", copy)
    assert_clean_failure(code, err)


def test_a_bad_shard_index_and_a_bad_calibration_file(data_dir, trained_run, tmp_path):
    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    np.save(copy / "val.idx.npy", np.array([5, 3], dtype=np.int64))
    code, _, err = call("eval", trained_run, "--data", copy, "--canvases", "2")
    assert_clean_failure(code, err, "val.idx.npy")
    (tmp_path / "calib.npz").write_bytes(b"not an npz")
    code, _, err = call("export", trained_run, "-o", tmp_path / "b", "--int8", "--calib-file", tmp_path / "calib.npz", "--calib-canvases", "8")
    assert_clean_failure(code, err, "calib.npz")
    assert not (tmp_path / "b").exists()


# --- the overwrite rule: a tool replaces only a folder it made itself, of the same kind -----------------------

KINDS = {"data": "data", "export": "bundle", "train": "run", "bench": None}  # what each command may replace (its own kind)
OVERWRITE_CASES = [(c, t) for c in KINDS for t in ("user-folder", "a-file", "run", "bundle", "data") if KINDS[c] != t]


@pytest.mark.parametrize("command, target", OVERWRITE_CASES, ids=[f"{c}-{t}" for c, t in OVERWRITE_CASES])
def test_no_flag_deletes_what_the_tool_did_not_make(command, target, trained_run, bundle_dir, data_dir, tmp_path):
    own = {"run": trained_run, "bundle": bundle_dir, "data": data_dir}
    if target == "user-folder":
        out = tmp_path / "thesis"
        out.mkdir()
        (out / "chapter1.txt").write_text("precious")
    elif target == "a-file":
        out = tmp_path / "notes.txt"
        out.write_text("precious")
    else:
        out = tmp_path / target
        shutil.copytree(own[target], out)
    before = snapshot(out)
    args = {"data": ["data", "-o", out, "--overwrite", "--builtin-stories", "50", "--vocab-size", "300"],
            "export": ["export", trained_run, "-o", out, "--overwrite"],
            "train": ["train", "--data", data_dir, "--out", out, "--steps", "1", "--d-model", "32", "--n-layer", "1", "--n-head", "2"],
            "bench": ["bench", bundle_dir, "--steps", "2", "--canvas", "32", "--repeats", "1", "--warmup", "0", "--out", out]}[command]
    code, _, err = call(*args)
    assert_clean_failure(code, err)
    assert snapshot(out) == before


def test_the_current_folder_is_never_emptied(tmp_path, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    code, _, err = run("data", "-o", ".", "--overwrite", "--builtin-stories", "50", "--vocab-size", "300")
    assert_clean_failure(code, err, "not a data folder")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_two_writers_to_one_output_the_second_is_refused(tmp_path):
    from filelock import FileLock

    lock = FileLock(str(tmp_path / ".d.lock"))
    with lock:  # as if another dllm were writing tmp_path/d right now
        code, _, err = call("data", "-o", tmp_path / "d", "--builtin-stories", "50", "--vocab-size", "300")
    assert_clean_failure(code, err, "another dllm is writing")
    assert not (tmp_path / "d").exists()


# Valid configs that contradict the graphs the bundle holds (issue: the manifest and its graphs can disagree).
GRAPH_CONTRADICTIONS = {
    "bd3": [("model.n_layer", 3), ("model.n_head", 1), ("model.canvas_len", 128), ("model.block_size", 32), ("heads.sampling.k", 32),
            ("model.family", "mdlm")],
    "ar": [("model.n_layer", 3), ("model.canvas_len", 128), ("heads.sampling.k", 32), ("model.family", "bd3")],
    "mdlm": [("model.vocab_size", 1024)],  # the canvas graph carries no layer count in its inputs or outputs
}


@pytest.mark.parametrize("family, key, value", [(f, k, v) for f, rows in GRAPH_CONTRADICTIONS.items() for k, v in rows],
                         ids=[f"{f}-{k}={v}" for f, rows in GRAPH_CONTRADICTIONS.items() for k, v in rows])
def test_a_manifest_that_contradicts_its_graphs_is_refused_by_run_and_inspect(family, key, value, bundle_dir, bd3_bundle, ar_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree({"mdlm": bundle_dir, "bd3": bd3_bundle, "ar": ar_bundle}[family], copy)
    rewrite(copy / "manifest.json", mutate(json.loads((copy / "manifest.json").read_text()), key, value))
    for command in (["run", copy, "-p", "Once", "--length", "8", "--no-live"], ["inspect", copy]):
        code, _, err = call(*command)
        assert_clean_failure(code, err)
        assert "Traceback" not in err and "onnxruntime" not in err.lower().replace("onnxruntime could not", "")


@pytest.mark.parametrize("meta", ["[1, 2]", '"text"', '{"spec": 5}', '{"spec": {"precision": ["fp16"], "graph": {}}}', "\xff\xfe"])
def test_engine_metadata_that_is_not_ours_is_reported_not_a_traceback(meta, bd3_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bd3_bundle, copy)
    (copy / "engines").mkdir(exist_ok=True)
    (copy / "engines" / "fp16-block_step-b1-c64-x.plan").write_bytes(b"not an engine")
    (copy / "engines" / "fp16-block_step-b1-c64-x.json").write_bytes(meta.encode("utf-8", "surrogateescape") if meta != "\xff\xfe" else b"\xff\xfe")
    code, out, err = call("inspect", copy)
    assert code == 0 and "Traceback" not in err and "metadata missing or unreadable" in out.replace("\n", " ") or "another ONNX" in out, (code, out, err)


@pytest.mark.parametrize("which", ["bd3", "ar"])
def test_a_topk_the_vocabulary_cannot_hold_is_refused_before_any_export(which, bd3_run, ar_run, tmp_path):
    run_dir = {"bd3": bd3_run, "ar": ar_run}[which]
    for k in ("512", "3839"):
        code, _, err = call("export", run_dir, "-o", tmp_path / "b", "--topk", k)
        assert_clean_failure(code, err, "--topk must be in 1..511")
        assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".b")]
