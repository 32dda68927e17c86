"""INT8 for block diffusion: calibration feeds cover every noise level and cache length, both graphs are quantized
by TensorRT's rules, and the accuracy report sees errors that reach the block step through the cache."""

import numpy as np
import onnx
import pytest

from calibration.blocks import BlockFeeds, block_report, block_runner, text_blocks
from calibration.quantize import qdq_problems
from jetson_dllm.bundle import load_bundle
from train_host.onnx_tools import validation_canvases


@pytest.fixture(scope="module")
def graphs(bd3_bundle):
    cfg = load_bundle(bd3_bundle).config
    return block_runner(bd3_bundle / "block_step.fp32.onnx", bd3_bundle / "commit.fp32.onnx", cfg)


@pytest.fixture(scope="module")
def canvases(bd3_bundle, data_dir):
    bundle = load_bundle(bd3_bundle)
    return validation_canvases(bundle.tokenizer(), bundle.config.canvas_len, 16, str(data_dir))[0]


def test_feeds_cover_the_noise_levels_and_the_cache_lengths(graphs, canvases):
    tok_mask, pad = graphs.cfg.mask_id, int(canvases[0, -1])
    steps = list(BlockFeeds(canvases, graphs, tok_mask, pad, "step", seed=3))
    commits = list(BlockFeeds(canvases, graphs, tok_mask, pad, "commit", seed=3))
    assert len(steps) == len(commits) == len(canvases)
    shares, positions = [], set()
    for canvas, feed, clean in zip(canvases, steps, commits):
        assert feed["valid_len"].shape == (1,)  # one per row, as the graphs take it
        valid = int(feed["valid_len"][0])
        assert valid % 16 == 0 and valid // 16 < text_blocks(canvas, 16, pad) and int(clean["valid_len"][0]) == valid
        assert np.abs(feed["k_cache"][:, :, :, :valid]).sum() > 0 or valid == 0  # the clean prefix is cached ...
        past = {**feed, "k_cache": feed["k_cache"].copy(), "v_cache": feed["v_cache"].copy()}
        past["k_cache"][:, :, :, valid:], past["v_cache"][:, :, :, valid:] = 7.0, -7.0  # past the valid length: never read
        a, b = (graphs.sessions["block_step"].run(None, f)[0] for f in (feed, past))
        np.testing.assert_array_equal(a, b)
        assert not (clean["tokens"] == tok_mask).any()  # the commit graph sees clean blocks
        text = canvas[valid : valid + 16] != pad
        shares.append((feed["tokens"][0][text] == tok_mask).mean() if text.any() else np.nan)
        positions.add(valid)
    assert len(positions) > 1  # more than one cache length
    shares = np.array(shares)[~np.isnan(shares)]
    assert shares.min() < 0.3 and shares.max() > 0.7  # light and heavy noise both


def test_the_report_sees_a_broken_cache(graphs, canvases, bd3_bundle):
    class ForgetfulCommit:  # a runner of its own whose commits write nothing: the block step attends to zeros
        def __init__(self, runner):
            self.runner, self.cfg = runner, runner.cfg

        def run(self, graph, feeds, outputs=None):
            return {} if graph == "commit" else self.runner.run(graph, feeds, outputs)

    broken = ForgetfulCommit(block_runner(bd3_bundle / "block_step.fp32.onnx", bd3_bundle / "commit.fp32.onnx", graphs.cfg))
    rows = block_report(graphs, {"same": graphs, "broken": broken}, canvases, graphs.cfg.mask_id, int(canvases[0, -1]))
    assert all(r["top1_agreement"] == 1.0 and r["accuracy"] == r["accuracy_ref"] for r in rows["same"].values())
    assert all(r["positions"] > 0 and r["max_abs_logprob_diff"] == 0.0 for r in rows["same"].values())
    # a barely trained model leans little on its context, but the log-probabilities move and top-1 picks change
    assert min(r["max_abs_logprob_diff"] for r in rows["broken"].values()) > 1e-2
    assert np.mean([r["top1_agreement"] for r in rows["broken"].values()]) < 1.0


def test_both_graphs_are_int8_by_tensorrts_rules(bd3_bundle):
    bundle = load_bundle(bd3_bundle)
    entry, c = bundle.manifest["precisions"]["int8"], bundle.manifest["calibration"]
    for name in (entry["file"], entry["commit"]):
        model = onnx.load(str(bd3_bundle / name))
        assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0 and qdq_problems(model) == []
    assert c["quantized"] > 0 and set(c["report"]["int8"]) == {"0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1"}
    assert all(r["positions"] > 0 for r in c["report"]["int8"].values())
    assert bundle.manifest["block_parity"]["int8"]["top1_agreement"] >= 0.9  # against the torch cache


def test_generation_runs_on_the_int8_graphs(bd3_bundle):
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig

    with open_model(bd3_bundle, precision="int8") as runner:
        gen = complete(runner, "Once upon a time", length=30, num_samples=2, sampler=SamplerConfig(steps=4, temperature=0.0))
    assert runner.precision == "int8" and gen.new_tokens == 30 and gen.commits >= 1
    assert all(t.startswith("Once upon a time") for t in gen.texts)


def test_inspect_shows_the_block_parity_and_the_int8_report(bd3_bundle):
    from rich.console import Console

    from jetson_dllm.engine import bundle_report
    from jetson_dllm.tables import bundle_tables

    console = Console(record=True, width=200)
    for t in bundle_tables(bundle_report(bd3_bundle)):
        console.print(t)
    text = console.export_text()
    assert "block_step (int8)" in text and "commit_step (fp32)" in text and "0.8-1" in text and "accuracy drop" in text
