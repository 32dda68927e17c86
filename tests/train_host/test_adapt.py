"""Block diffusion adapted from an autoregressive parent (issue 23): the token shift, complementary masks, and a
shifted model on every runner. The end-to-end check: at block size 1 the shifted model built from an AR parent *is*
its parent (the same NLL, the same greedy text)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jetson_dllm.config import ModelConfig
from train_host.autoregressive import ar_nll
from train_host.bd3 import bd3_loss, bd3_nll_bound, shift_sources
from train_host.model import Denoiser

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bad_input"))
from refusal import run  # noqa: E402

PAD, BOS, MASK = 0, 1, 3


def _parent_and_child(block: int, canvas: int = 16):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_head=2, n_layer=2, vocab_size=50, canvas_len=canvas, mask_id=MASK, family="ar")
    parent = Denoiser(cfg).eval()
    child = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": "bd3", "block_size": block, "shift": True})).eval()
    child.load_state_dict(parent.state_dict())
    return parent, child


def _canvases(n=4, length=16, end=11):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(5, 50, (n, length), generator=g)
    x[:, end] = BOS  # end-of-text (the start token doubles as it, as in our tokenizers)
    x[:, end + 1 :] = PAD
    return x


def test_shift_sources_read_the_position_before():
    src = shift_sources(8, 4).tolist()
    # inside a block: the noised copy's previous position; a block's start: the clean copy's previous position (8 + i - 1)
    assert src == [0, 0, 1, 2, 8 + 3, 4, 5, 6]


def test_shifted_block_one_scores_its_parents_exact_nll():
    parent, child = _parent_and_child(block=1)
    x = _canvases()
    exact = ar_nll(parent, x, BOS, PAD)
    with torch.no_grad():  # every position masked at t = 1, where the bound's weight is 1: the sum of the cross-entropies
        loss, stats = bd3_loss(child, x, MASK, 1, t=torch.ones(4, 16), shift_bos=BOS, unscored=PAD)
    assert int(stats["masked"]) == exact["tokens"]
    assert float(loss) * x.numel() == pytest.approx(exact["nll"], rel=1e-5)
    bound = bd3_nll_bound(child, x, PAD, MASK, 1, n_t=64, shift_bos=BOS, generator=torch.Generator().manual_seed(0))
    assert bound["tokens"] == exact["tokens"]  # the same tokens counted: the text and its end-of-text
    assert bound["nll"] / bound["tokens"] == pytest.approx(exact["nll"] / exact["tokens"], rel=0.05)  # Monte Carlo


def test_the_shift_is_what_makes_a_trained_parent_usable(ar_run, data_dir):
    """On real text: the trained parent's weights as a shifted block-size-1 model score the parent's NLL; the same
    weights unshifted (the head read at the wrong position) score worse."""
    from train_host import checkpoint as ck
    from train_host.data import CanvasDataset

    cfg, weights, tok, _ = ck.load_checkpoint(str(ar_run))
    parent = Denoiser(cfg).eval()
    ck.load_weights(parent, weights, "parent")
    x = torch.as_tensor(CanvasDataset(data_dir, "val", cfg.canvas_len, tok.pad_id).batch(np.arange(8)), dtype=torch.long)
    x[:, -1] = tok.pad_id  # the shifted model's input ends one token earlier: compare on the same tokens
    exact = ar_nll(parent, x, tok.bos_id, tok.pad_id)
    per_token = {}
    for shift in (True, False):
        child = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": "bd3", "block_size": 1, "shift": shift})).eval()
        ck.load_weights(child, weights, "child")
        with torch.no_grad():
            loss, st = bd3_loss(child, x, tok.mask_id, 1, t=torch.ones(x.shape), shift_bos=tok.bos_id if shift else None, unscored=tok.pad_id)
        per_token[shift] = float(loss) * x.numel() / int(st["masked"])
    assert per_token[True] == pytest.approx(exact["nll"] / exact["tokens"], rel=1e-4)
    assert per_token[False] > per_token[True]  # (a 30-step parent is near its unigram: the gap is small here, 13 nats vs 3.6 on TinyStories)


@pytest.mark.parametrize("block", [1, 4, 16])
def test_complementary_masks_score_every_text_token_once_per_pair(block):
    _, child = _parent_and_child(block=block)
    x = _canvases()
    _, stats = bd3_loss(child, x, MASK, block, shift_bos=BOS, complementary=True, unscored=PAD, generator=torch.Generator().manual_seed(3))
    masked = stats["masked_at"]
    assert masked.shape == (8, 16)
    text = (stats["x"][:4] != PAD)
    text[:, 0] = False  # the start token is given
    assert torch.equal(masked[:4] | masked[4:], text)  # every token scored in one copy ...
    assert not (masked[:4] & masked[4:]).any()  # ... and only one


def test_padding_is_never_scored_but_is_noised():
    _, child = _parent_and_child(block=4)
    x = _canvases()
    _, stats = bd3_loss(child, x, MASK, 4, t=torch.ones(4, 4), shift_bos=BOS, unscored=PAD)
    assert not (stats["masked_at"] & (stats["x"] == PAD)).any()


def _runner(model, tokenizer):
    from jetson_dllm.runners.torch_runner import TorchRunner

    return TorchRunner(model, tokenizer, threads=1)


def test_shifted_block_one_writes_its_parents_greedy_text(ar_run):
    """The whole loop (bos first, each block's first token from the commit before, the commit folded or not):
    at block size 1 the shifted child writes token for token what its AR parent writes."""
    from jetson_dllm.families import ar, bd3
    from jetson_dllm.sampler import SamplerConfig
    from train_host import checkpoint as ck

    cfg, weights, tokenizer, _ = ck.load_checkpoint(str(ar_run))
    parent = Denoiser(cfg).eval()
    ck.load_weights(parent, weights, "parent")
    child = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": "bd3", "block_size": 1, "shift": True})).eval()
    ck.load_weights(child, weights, "child")
    greedy = SamplerConfig(steps=1, temperature=0.0)
    want = ar.complete(_runner(parent, tokenizer), "Once upon a time", length=24, sampler=greedy)
    runner = _runner(child, tokenizer)
    got = bd3.complete(runner, "Once upon a time", length=24, sampler=greedy)
    assert got.tokens.tolist() == want.tokens.tolist()
    assert got.texts == want.texts
    runner.graphs = ("block_step", "commit")  # no commit step: each block's first token from the commit's output
    assert bd3.complete(runner, "Once upon a time", length=24, sampler=greedy).tokens.tolist() == want.tokens.tolist()
    empty = bd3.complete(_runner(child, tokenizer), "", length=12, sampler=greedy)  # the start token alone
    assert empty.tokens.tolist() == ar.complete(_runner(parent, tokenizer), "", length=12, sampler=greedy).tokens.tolist()


def test_train_refuses_a_shift_its_parent_cannot_give(data_dir, trained_run, tmp_path):
    from jetson_dllm.errors import DllmError
    from tests.conftest import train_small

    with pytest.raises(DllmError, match="--shift needs a parent that predicts the next token"):
        train_small(data_dir, tmp_path / "a", steps=1, objective="bd3", block_size=4, shift=True, init=str(trained_run))
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(DllmError, match="token shift is block diffusion's"):
        train_small(data_dir, tmp_path / "b", steps=1, objective="mdlm", shift=True)
    assert not (tmp_path / "b").exists()


def test_adapted_model_records_the_shift_and_refuses_to_lose_it(adapted_run, data_dir, tmp_path):
    from jetson_dllm.errors import DllmError
    from tests.conftest import train_small
    from train_host import checkpoint as ck

    cfg = ck.load_checkpoint(str(adapted_run))[0]
    assert (cfg.family, cfg.block_size, cfg.shift) == ("bd3", 4, True)
    with pytest.raises(DllmError, match="trained with --shift"):
        train_small(data_dir, tmp_path / "c", steps=1, objective="bd3", block_size=4, init=str(adapted_run))


def test_adapted_model_exports_and_runs_the_same_on_onnxruntime(adapted_run, data_dir, tmp_path):
    """The shifted graphs (block step, commit with its top-K, commit step) pass the export's parity check against
    torch at FP32, FP16 and INT8 (calibrated), onnxruntime writes the torch runner's greedy tokens, and every verb
    takes the adapted model (eval, bench)."""
    from calibration.quantize import Int8Options
    from jetson_dllm.families import bd3
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    bundle = export_bundle(adapted_run, tmp_path / "bundle", precisions=("fp32", "fp16", "int8"), data_dir=str(data_dir),
                           int8=Int8Options(n_canvases=16, eval_canvases=16, budget=100.0))
    assert bundle.manifest["graphs"]["commit"]["outputs"] == ["topk_logprobs", "topk_ids"]
    greedy = SamplerConfig(steps=4, temperature=0.0)
    with open_runner("torch", adapted_run, threads=1) as t, open_runner("onnx", tmp_path / "bundle") as o:
        want = bd3.complete(t, "Once upon a time", length=20, sampler=greedy)
        got = bd3.complete(o, "Once upon a time", length=20, sampler=greedy)
        o.graphs = ("block_step", "commit")  # TensorRT's pair: the first token from the commit's own output
        again = bd3.complete(o, "Once upon a time", length=20, sampler=greedy)
    assert got.tokens.tolist() == want.tokens.tolist() == again.tokens.tolist()
    assert np.asarray(got.tokens).shape[1] >= 20
    code, out, err = run("run", tmp_path / "bundle", "--precision", "int8", "-p", "Once upon a time", "--length", "8", "--no-live")
    assert code == 0 and out.startswith("Once upon a time"), err
    code, out, err = run("eval", adapted_run, "--data", data_dir, "--canvases", "4")
    assert code == 0 and "bound" in out, err
    code, out, err = run("bench", tmp_path / "bundle", "--steps", "4", "--repeats", "1", "--canvas", "16", timeout=300)
    assert code == 0, err
    code, out, err = run("inspect", tmp_path / "bundle")
    assert code == 0 and "(block 4, token shift: adapted from an AR parent)" in " ".join(out.split()), err
    assert "of them the embedding of its vocabulary" in " ".join(out.split())


def test_sub_blocks_fill_each_block_left_to_right(adapted_run):
    """`--span` on block diffusion (Fast-dLLM v2's sub-blocks): inside each block, no position of a later sub-block
    is committed while an earlier one still holds a mask; with threshold decoding several commit per call."""
    from jetson_dllm.families import bd3
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    seen = []
    with open_runner("torch", adapted_run, threads=1) as runner:
        mask = runner.tokenizer.mask_id
        sampler = SamplerConfig(steps=4, strategy="threshold", threshold=0.5, span=2, temperature=0.0)
        bd3.complete(runner, "", length=16, sampler=sampler, on_step=lambda view, step: seen.append(view[0].copy()))
    checked = 0
    for view in seen:
        if len(view) < 7:  # the first block holds the start token: its spans count from the first free position
            continue
        tail = view[-4:]  # a whole free block (the view ends with it): sub-blocks [0, 2) and [2, 4)
        if (tail[2:] != mask).any():
            assert (tail[:2] != mask).all(), view
            checked += 1
    assert checked and any((view[-4:] == mask).any() for view in seen)


def test_an_adapted_run_resumes_without_its_parent(ar_run, data_dir, tmp_path):
    """The shape an adapted run took from its parent is recorded: resuming needs the run, not the parent."""
    import shutil

    from tests.conftest import train_small

    parent = tmp_path / "parent"
    shutil.copytree(ar_run, parent)
    adapt = dict(steps=4, eval_every=2, objective="bd3", block_size=4, t_min=0.3, t_max=0.8, shift=True, init=str(parent))
    assert train_small(data_dir, tmp_path / "child", pause_after=2, **adapt)["step"] == 2
    shutil.rmtree(parent)
    assert train_small(data_dir, tmp_path / "child", resume=True, **adapt)["step"] == 4
