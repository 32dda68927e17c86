"""One parity test over every runner available here: the same masked canvases through each, against PyTorch."""

import numpy as np
import pytest

from jetson_dllm.parity import compare_runners, masked_views, summarize
from jetson_dllm.runners.loaders import open_runner

# (runner, precision) -> worst max |logit diff| and lowest mean top-1 agreement allowed against the torch model
RUNNERS = {
    ("torch", "fp32"): (1e-5, 1.0),
    ("onnx", "fp32"): (1e-2, 0.999),
    ("onnx", "fp16"): (0.5, 0.95),
    ("onnx", "int8"): (None, 0.8),
    ("onnx", "int8-dynamic"): (None, 0.8),
    ("trt", "fp16"): (None, 0.95),
}


def _canvases(runner, n=6):
    tok = runner.tokenizer
    rows = [tok.encode("Once upon a time there was a little dog who liked to play in the park.")[:31] + [tok.eot_id]] * n
    out = np.full((n, 32), tok.pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@pytest.mark.parametrize("kind, precision", list(RUNNERS), ids=[f"{k}-{p}" for k, p in RUNNERS])
def test_every_runner_agrees_with_pytorch(kind, precision, trained_run, bundle_dir):
    if kind == "trt":
        pytest.importorskip("tensorrt", reason="TensorRT is not installed (JetPack or an NVIDIA GPU machine)")
    max_diff, min_top1 = RUNNERS[(kind, precision)]
    with open_runner("torch", trained_run) as reference, open_runner(kind, trained_run if kind == "torch" else bundle_dir, precision=precision) as runner:
        assert runner.cfg == reference.cfg and runner.topk == reference.topk and runner.tokenizer.sha256 == reference.tokenizer.sha256
        canvases = _canvases(reference)
        if kind == "trt":  # engines carry the sampling head only: compare the top-1 ids
            for _, z, score in masked_views(canvases, (0.5,), reference.cfg.mask_id, reference.tokenizer.pad_id):
                want = reference.run("canvas", {"tokens": z})["topk_ids"][..., 0][score]
                got = runner.run("canvas", {"tokens": z})["topk_ids"][..., 0][score]
                assert (want == got).mean() >= min_top1
            return
        row = summarize(compare_runners(reference, {"r": runner}, canvases, (0.15, 0.5, 0.9), reference.cfg.mask_id,
                                        reference.tokenizer.pad_id)["r"])
    assert row["top1_agreement"] >= min_top1, row
    if max_diff is not None:
        assert row["max_abs_logit_diff"] <= max_diff, row


def test_a_non_finite_runner_fails_every_gate(trained_run):
    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def run(self, graph, feeds, outputs=None):
            out = self.inner.run(graph, feeds, outputs)
            return {k: np.full_like(v, np.nan) for k, v in out.items()}

    with open_runner("torch", trained_run) as reference:
        row = summarize(compare_runners(reference, {"nan": Broken(reference)}, _canvases(reference), (0.5,),
                                        reference.cfg.mask_id, reference.tokenizer.pad_id)["nan"])
    assert not row["max_abs_logit_diff"] <= 1e-2 and row["top1_agreement"] == 0.0
