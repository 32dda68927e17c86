"""A family added from this one module plus its registry entry, with no edit to any package file: a toy that denoises
in a fixed random order (the canvas graph, MDLM's objective, its own sampler loop). It goes through train, export,
run on onnxruntime and torch, bench and --save-canvases, which shows that nothing else in the tree names a family.

This module is both the toy's runtime module and its host module (the registry names it twice)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import pytest

from jetson_dllm.families import FAMILIES, Family
from jetson_dllm.families.common import BenchRun
from jetson_dllm.runners.calls import Call, drive

TOY = Family("toy", "fixed-order toy", "bidirectional", ("canvas",), ("canvas",), left_to_right=False, cached=False,
             steps="positions unmasked per step, in a fixed random order", nll="bound", options=("steps",), int8=False,
             runtime=__name__, host=__name__)


# --- the runtime side: unmask `steps` positions a call, in an order fixed by the seed -----------------------------


@dataclass
class ToyGeneration:
    texts: list[str]
    tokens: np.ndarray
    calls: int
    seconds: float

    def to_json(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens.tolist(), "evaluations": self.calls}

    def summary(self) -> str:
        return f"toy: {self.calls} network calls"


def order_calls(tokens: np.ndarray, mask_id: int, per_call: int, seed: int) -> Generator[Call, dict, tuple[np.ndarray, int]]:
    canvas = tokens.copy()
    order = np.random.default_rng(seed).permutation(np.flatnonzero(canvas[0] == mask_id))
    calls = 0
    for start in range(0, len(order), per_call):
        out = yield Call("canvas", {"tokens": canvas})
        calls += 1
        where = order[start : start + per_call]
        canvas[:, where] = out["topk_ids"][:, where, 0]
    return canvas, calls


def complete(runner, prompt, length=0, num_samples=1, sampler=None, gap=12, on_step=None) -> ToyGeneration:
    tok = runner.tokenizer
    ids = tok.encode(prompt)
    canvas = np.full((num_samples, min(runner.canvas_lengths)), tok.mask_id, dtype=np.int32)
    canvas[:, : len(ids)] = ids
    tokens, calls = drive(runner, order_calls(canvas, tok.mask_id, max(1, sampler.steps), sampler.seed))
    return ToyGeneration([tok.decode(row) for row in tokens], tokens, calls, 0.0)


def quality_length(runner, prompt_ids, tokens):
    return tokens


def bench_generate(runner, name, batch, tokens, sampler) -> BenchRun:
    canvas = np.full((batch, tokens), runner.tokenizer.mask_id, dtype=np.int32)
    _, calls = drive(runner, order_calls(canvas, runner.tokenizer.mask_id, max(1, tokens // sampler.steps), 0))
    return BenchRun(0.001 * calls, [1.0] * calls, 0.0, calls)


# --- the host side: MDLM's objective and bound, the canvas graph's export ----------------------------------------

FIXED_RATIO_ACCURACY = False


def train_loss(model, x, run, t, noise, generator):
    from train_host.families import mdlm

    return mdlm.train_loss(model, x, run, t, noise, generator)


def nll_batch(model, x, ev):
    from train_host.families import mdlm

    return mdlm.nll_batch(model, x, ev)


def eval_extra(run) -> dict:
    return {"toy": 1.0}


def export(model, tokenizer, ckpt, out_dir, options):
    from train_host.canvas_export import export_canvas_bundle

    return export_canvas_bundle(model, tokenizer, ckpt, out_dir, options)


# --- the test ---------------------------------------------------------------------------------------------------


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FAMILIES, "toy", TOY)
    return TOY


def test_a_toy_family_goes_through_every_verb(toy, data_dir, tmp_path):
    from conftest import train_small

    from jetson_dllm import bench
    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.generate import CallRecorder, open_model
    from jetson_dllm.generate import complete as run_model
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    result = train_small(data_dir, tmp_path / "run", steps=2, eval_every=2, objective="toy")
    assert result["step"] == 2 and result["toy"] == 1.0  # its own evaluation extras, saved with the checkpoint
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle", parity_canvases=2)
    assert load_bundle(bundle.path).config.family == "toy" and bundle.manifest["parity"]["fp32"]["top1_agreement"] >= 0.999
    sampler = SamplerConfig(steps=8, seed=3)
    texts = {}
    for path in (tmp_path / "run", tmp_path / "bundle"):  # torch, then onnxruntime
        with CallRecorder(open_model(path)) as runner:
            gen = run_model(runner, "Once upon a time", num_samples=2, sampler=sampler)
            assert isinstance(gen, ToyGeneration) and runner.calls() == {"canvas": gen.calls} and gen.calls == -(-28 // 8)
            counts = runner.save(tmp_path / f"calls-{path.name}.npz")
        texts[path.name] = gen.tokens
        assert counts == {"canvas": gen.calls} and np.load(tmp_path / f"calls-{path.name}.npz")["tokens"].shape == (2 * gen.calls, 32)
    assert (texts["run"] == texts["bundle"]).mean() > 0.9  # the same model on two runners
    results, _, _ = bench.run_sweep([str(bundle.path)], ["onnx"], ["fp32"], steps=[4], canvases=[32], batches=[1],
                                    strategies=["confidence"], repeats=1, warmup=0, out_dir=tmp_path / "bench", isolate=False)
    assert results[0].evaluations == 4 and results[0].tokens_per_s > 0
