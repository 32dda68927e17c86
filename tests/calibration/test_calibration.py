import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration.data import CalibrationReader, load_recorded, stratified_masking
from calibration.quantize import qdq_problems, quantizable_nodes
from calibration.report import BUCKETS, mean_accuracy_drop
from jetson_dllm.errors import DllmError
from jetson_dllm.parity import compare_logits


def test_stratified_masking_covers_every_noise_level():
    canvases = np.full((200, 64), 7, dtype=np.int32)
    canvases[:, 50:] = 0  # padding
    masked = stratified_masking(canvases, mask_id=2, pad_id=0, seed=1)
    assert (masked[:, 50:] == 0).all()  # padding is never masked
    ratios = (masked[:, :50] == 2).mean(1)
    counts, _ = np.histogram(ratios, bins=5, range=(0, 1))
    assert counts.min() >= 30  # 200 canvases spread over all five buckets
    assert ratios.max() > 0.95 and ratios.min() < 0.05


def test_reader_is_a_plain_iterable_of_named_arrays():
    reader = CalibrationReader(np.arange(8 * 16, dtype=np.int64).reshape(8, 16))
    items = list(reader)
    assert len(items) == 8 and set(items[0]) == {"tokens"}
    assert items[0]["tokens"].dtype == np.int32 and items[0]["tokens"].shape == (1, 16)
    assert reader.get_next()["tokens"][0, 0] == 0 and reader.get_next()["tokens"][0, 0] == 16
    reader.rewind()
    assert reader.get_next()["tokens"][0, 0] == 0
    with pytest.raises(DllmError, match="at least 8"):
        CalibrationReader(np.zeros((3, 16)))


def test_recorded_canvases_are_checked(tmp_path):
    good = tmp_path / "c.npz"
    np.savez(good, tokens=np.full((4, 32), 5, dtype=np.int32), tokenizer_sha256="abc")
    assert load_recorded(good, "abc", 100, 64).shape == (4, 32)
    with pytest.raises(DllmError, match="another tokenizer"):
        load_recorded(good, "xyz", 100, 64)
    with pytest.raises(DllmError, match="longer than"):
        load_recorded(good, "abc", 100, 16)
    np.savez(tmp_path / "ids.npz", tokens=np.full((4, 32), 500, dtype=np.int32), tokenizer_sha256="abc")
    with pytest.raises(DllmError, match="outside the vocabulary"):
        load_recorded(tmp_path / "ids.npz", "abc", 100, 64)
    np.save(tmp_path / "plain.npy", np.zeros((4, 32)))
    with pytest.raises(DllmError, match="not a calibration file"):
        load_recorded(tmp_path / "plain.npy", "abc", 100, 64)


def test_int8_graph_follows_tensorrt_q_dq_rules(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.int8.onnx"))
    assert qdq_problems(model) == []
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 10
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    per_channel = [n for n in qdq if consts[n.input[1]].size > 1]
    assert per_channel  # weights are per-channel
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    d = manifest["model"]["d_model"]
    for n in per_channel:
        assert consts[n.input[1]].shape[0] in (3 * d, d, manifest["model"]["d_ff"], manifest["model"]["vocab_size"])


def test_the_q_dq_checker_catches_violations(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and numpy_helper.to_array(inits[n.input[1]]).size == 1)
    zp = inits[q.input[2]]
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zp.name))
    scale = inits[q.input[1]]
    scale.CopyFrom(numpy_helper.from_array(np.array(-0.1, dtype=np.float32), scale.name))
    problems = " | ".join(qdq_problems(model))
    assert "zero point must be int8 0" in problems and "non-positive scale" in problems


def test_only_weight_matmuls_are_quantized(bundle_dir):
    model = onnx.load(str(bundle_dir / "model.int8.onnx"))
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Softmax":  # attention BMMs around the softmax stay in floating point
            assert producer[producer[n.input[0]].input[1]].op_type != "DequantizeLinear"
    fp32 = onnx.load(str(bundle_dir / "model.fp32.onnx"))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    cal = manifest["calibration"]
    assert cal["quantizable"] >= 5 * manifest["model"]["n_layer"]  # qkv, o, w1, w3, w2 per block
    assert cal["quantized"] == cal["quantizable"] - len(cal["excluded"])
    assert len(quantizable_nodes(fp32)) <= cal["quantizable"]


def test_report_per_noise_level_in_the_manifest(bundle_dir):
    cal = json.loads((bundle_dir / "manifest.json").read_text())["calibration"]
    labels = [f"{lo:g}-{hi:g}" for lo, hi in BUCKETS]
    assert list(cal["report"]["int8"]) == labels and list(cal["report"]["fp16"]) == labels
    for row in cal["report"]["int8"].values():
        assert 0 <= row["accuracy"] <= 1 and row["positions"] > 0 and 0 <= row["top1_agreement"] <= 1
    assert cal["accuracy_drop_points"] == pytest.approx(mean_accuracy_drop(cal["report"]["int8"]))
    assert cal["calibration_canvases"] >= 8 and cal["method"] == "minmax"


def test_compare_logits_counts_what_it_should():
    ref = np.zeros((1, 3, 5))
    ref[0, :, 3] = 5.0  # predicts token 3
    got = ref.copy()
    got[0, 2, 4] = 9.0  # disagrees at position 2
    targets = np.array([[3, 3, 4]])
    row = compare_logits(ref, got, targets, np.array([[True, True, True]]), mask_id=2)
    assert row["top1_agreement"] == pytest.approx(2 / 3) and row["accuracy"] == pytest.approx(1.0)
    assert row["accuracy_ref"] == pytest.approx(2 / 3) and row["max_abs_logit_diff"] == 9.0


def test_exclusion_search_keeps_the_most_sensitive_layers_out():
    from calibration.quantize import search_exclusions

    cost = {"head": 3.0, "l0.qkv": 0.2, "l0.o": 0.1, "l1.w2": 1.5, "l1.w1": 0.05, "l1.w3": 0.05}
    calls = []

    def drop_of(exclude, tag):  # each quantized layer costs its points of accuracy
        calls.append(tag)
        return sum(c for n, c in cost.items() if n not in exclude)

    result = search_exclusions(list(cost), drop_of, budget=1.0)
    assert result["excluded"] == ["head", "l1.w2"] and result["drop"] == pytest.approx(0.4)
    assert result["sensitivity"]["head"] == pytest.approx(3.0) and len(result["sensitivity"]) == 6
    assert [t["excluded"] for t in result["trajectory"]] == [0, 1, 2]
    assert search_exclusions(list(cost), drop_of, budget=10.0)["excluded"] == []  # within budget: nothing measured
    unreachable = search_exclusions(list(cost), drop_of, budget=0.0, max_share=0.5)
    assert len(unreachable["excluded"]) == 3 and unreachable["drop"] > 0  # capped: the best set, still over budget


@pytest.mark.slow
def test_over_budget_keeps_the_best_model_and_exits_nonzero(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    import calibration.quantize as q
    from jetson_dllm.cli import main

    monkeypatch.setattr(q, "mean_accuracy_drop", lambda rows: 5.0)  # as if INT8 lost 5 points whatever stays FP32
    args = ["export", str(trained_run), "-o", str(tmp_path / "b"), "--int8", "--data", str(data_dir),
            "--calib-canvases", "8", "--parity-canvases", "4", "--int8-budget", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "over the 1-point budget" in err and "--allow-over-budget" in err
    cal = json.loads((tmp_path / "b" / "manifest.json").read_text())["calibration"]
    assert not cal["within_budget"] and cal["sensitivity_points"] and (tmp_path / "b" / "model.int8.onnx").is_file()
    shutil.rmtree(tmp_path / "b")
    assert main(args + ["--allow-over-budget"]) == 0
    assert main(args[:-1] + ["-1"]) == 1 and "must not be negative" in capsys.readouterr().err
