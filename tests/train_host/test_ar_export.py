"""The autoregressive baseline on the runtime: its decode graph with a KV cache agrees with torch, token by token,
and `dllm bench` measures it next to the diffusion models."""

import numpy as np
import pytest

from jetson_dllm.errors import DllmError
from jetson_dllm.families.ar import decode_calls


def decode_tokens(step, *args, **kwargs):
    """The decode loop driven by a stand-in network `step(tokens, valid)`."""
    loop = decode_calls(*args, **kwargs)
    try:
        call = next(loop)
        while True:
            lp, ids = step(call.feeds["tokens"], int(call.feeds["valid_len"]))
            call = loop.send({"topk_logprobs": lp, "topk_ids": ids})
    except StopIteration as done:
        return done.value


def test_decoding_reads_each_token_once_at_its_position_and_stops_at_the_end():
    """A stand-in network that always ranks end-of-text (id 1) first, then ids 5 and 6."""
    seen = []

    def step(tokens, valid):
        seen.append((tokens[:, 0].tolist(), valid))
        B = tokens.shape[0]
        return np.tile(np.log([[0.6, 0.3, 0.1]]), (B, 1, 1)).astype(np.float32), np.tile([[1, 5, 6]], (B, 1, 1))

    free = decode_tokens(step, [7, 8], 4, bos=1, eot=1, pad=0, max_len=32, num_samples=2)
    assert free.new_tokens == 1 and free.tokens.tolist() == [[7, 8, 1, 0, 0, 0]] * 2  # greedy: the end at once, padding after
    assert seen == [([1, 1], 0), ([7, 7], 1), ([8, 8], 2)]  # start token, then the prompt, one position each
    seen.clear()
    fixed = decode_tokens(step, [7], 4, bos=1, eot=1, pad=0, max_len=32, stop_at_end=False)
    assert fixed.new_tokens == 4 and fixed.tokens.tolist() == [[7, 5, 5, 5, 5]]  # end-of-text banned: the next best
    assert [v for _, v in seen] == [0, 1, 2, 3, 4] and len(fixed.step_ms) == 5  # 2 reads of the prompt, 3 of new tokens
    with pytest.raises(DllmError, match="the model takes 2"):
        decode_tokens(step, [7, 8], 4, bos=1, eot=1, pad=0, max_len=2)


def test_the_decode_graph_runs_the_baseline_as_torch_does(ar_run, ar_bundle, tmp_path):
    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig

    parity = load_bundle(ar_bundle).manifest["decode_parity"]
    assert parity["fp32"]["max_abs_logprob_diff"] < 1e-3 and parity["fp16"]["top1_agreement"] > 0.9
    greedy = SamplerConfig(temperature=0.0)
    with open_model(ar_run) as on_torch, open_model(ar_bundle) as on_onnx:
        a = complete(on_torch, "Once upon a time", length=24, num_samples=2, sampler=greedy)
        b = complete(on_onnx, "Once upon a time", length=24, num_samples=2, sampler=greedy)
        assert on_onnx.graphs == ("decode", "verify") and on_onnx.memory()["cache"] > 0
    assert (a.tokens == b.tokens).all() and a.result.new_tokens == b.result.new_tokens



def test_int8_for_the_baseline_is_dynamic_weights_for_the_cpu(ar_run, data_dir, tmp_path):
    """--int8 writes the decode graph with INT8 weights (onnxruntime's CPU provider; nothing calibrated), checked
    against torch like the others; calibration options or --data with it are refused, nothing written."""
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    bundle = export_bundle(ar_run, tmp_path / "int8", precisions=("fp32", "int8"))
    entry = bundle.manifest["precisions"]["int8-dynamic"]
    assert entry["file"] == "decode.int8-dynamic.ort" and entry["verify"] == "verify.int8-dynamic.ort" and "int8" not in bundle.manifest["precisions"]
    parity = bundle.manifest["decode_parity"]["int8-dynamic"]
    # the same INT8 weights, but activations quantized per call: k tokens share one dynamic scale where k single calls
    # have one each, so verify is k decode calls only up to that (0.977 measured on this flat-distribution model)
    assert parity["verify_vs_decode"]["top1_agreement"] > 0.9
    # a 2-layer, width-64 model over random tokens (flat distributions, near ties): 0.75 measured; chance is 1/512
    assert parity["top1_agreement"] > 0.5 and parity["max_abs_logprob_diff"] < 2.0
    assert not any(p.name.startswith(".") for p in bundle.path.iterdir())  # the work folder is gone
    with open_model(bundle.path, backend="onnx", precision="int8-dynamic") as q:
        text = complete(q, "Once upon a time", length=8, sampler=SamplerConfig(temperature=0.0)).texts[0]
        assert q.precision == "int8-dynamic" and text.startswith("Once upon a time")
    for extra in ({"data_dir": str(data_dir)}, {"calibration_given": frozenset({"calib_canvases"})}):
        with pytest.raises(DllmError, match="nothing is calibrated"):
            export_bundle(ar_run, tmp_path / "refused", precisions=("fp32", "int8"), **extra)
        assert not (tmp_path / "refused").exists()


def test_the_tied_head_gets_a_constant_weight_for_the_dynamic_quantizer(ar_bundle, tmp_path):
    """The decode graph reaches its tied head through Transpose(embedding); folding it gives the head MatMul a
    constant weight of its own (which the dynamic quantizer can take) and changes no output."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from calibration.dynamic import fold_weight_transposes

    def through_transpose(model):
        inits = {i.name for i in model.graph.initializer}
        made = {o: n for n in model.graph.node for o in n.output}
        return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in made
                and made[n.input[1]].op_type == "Transpose" and made[n.input[1]].input[0] in inits]

    model = onnx.load(str(ar_bundle / "decode.fp32.onnx"))
    assert len(through_transpose(model)) == 1  # the head (attention's K transposes are of activations, not weights)
    assert fold_weight_transposes(model) == 1 and through_transpose(model) == []
    onnx.save(model, str(tmp_path / "folded.onnx"))
    before, after = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (ar_bundle / "decode.fp32.onnx", tmp_path / "folded.onnx"))
    rng = np.random.default_rng(0)
    feeds = {}
    for i in before.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = (rng.integers(0, 100, shape) if "int" in i.type else rng.standard_normal(shape)).astype(
            np.int64 if "int64" in i.type else np.int32 if "int32" in i.type else np.float32)
    for a, b in zip(before.run(None, feeds), after.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_bench_measures_the_baseline_token_by_token(ar_bundle, tmp_path):
    from jetson_dllm import bench

    results, _, _ = bench.run_sweep([str(ar_bundle)], ["onnx"], ["fp32"], steps=[8], canvases=[40], batches=[1],
                                    strategies=["confidence"], repeats=2, warmup=0, out_dir=tmp_path / "b", isolate=False,
                                    quality=True, quality_samples=2, judge=lambda texts: 7.0)
    (r,) = results
    assert r.evaluations == 40 and r.step_ms_median > 0 and r.tokens_per_s > 0  # one call per token
    assert r.gen_ppl == 7.0 and r.repetition is not None


def test_inspect_shows_the_decode_parity_and_build_refuses(ar_bundle):
    from rich.console import Console

    from jetson_dllm import engine as eng
    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.tables import bundle_tables

    console = Console(record=True, width=200)
    for t in bundle_tables(eng.bundle_report(ar_bundle)):
        console.print(t)
    text = console.export_text()
    assert "decode (fp32)" in text and "decode (fp16)" in text
    with pytest.raises(DllmError, match="autoregressive baseline; TensorRT engines"):
        eng.engine_spec(load_bundle(ar_bundle), "fp16", 1, 64)
