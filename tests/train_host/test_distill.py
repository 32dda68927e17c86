"""Distillation toward the autoregressive parent (`dllm train --distill A`, issue 23): the parent's next-token
distributions as soft targets at the masked positions, read at the position the shifted child reads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from jetson_dllm.config import ModelConfig
from train_host.autoregressive import shift_right
from train_host.bd3 import bd3_loss
from train_host.model import Denoiser
from train_host.parent import parent_targets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bad_input"))
from refusal import assert_clean_failure, call  # noqa: E402

PAD, BOS, MASK = 0, 1, 3


def _pair(block: int):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_head=2, n_layer=2, vocab_size=50, canvas_len=16, mask_id=MASK, family="ar")
    parent = Denoiser(cfg).eval()
    child = Denoiser(ModelConfig.from_dict({**cfg.to_dict(), "family": "bd3", "block_size": block, "shift": True}))
    child.load_state_dict(parent.state_dict())
    return parent, child


def _text(n=4, length=16, end=11):
    x = torch.randint(5, 50, (n, length), generator=torch.Generator().manual_seed(1))
    x[:, end] = BOS
    x[:, end + 1 :] = PAD
    return x


def test_a_child_that_is_its_parent_scores_the_parents_entropy():
    """At block size 1 a shifted child built from the parent predicts what the parent does at every position, so the
    cross-entropy against the parent's distributions is the parent's own entropy there: the targets are read at the
    right positions (one position off, they would not match and score higher)."""
    parent, child = _pair(block=1)
    child.eval()
    x = _text()
    t = torch.ones(4, 16)  # every position masked, weight 1: the loss is the plain sum
    with torch.no_grad():
        hard, st = bd3_loss(child, x, MASK, 1, t=t, shift_bos=BOS, unscored=PAD)
        soft, _ = bd3_loss(child, x, MASK, 1, t=t, shift_bos=BOS, unscored=PAD, teacher=parent, distill=1.0)
        half, _ = bd3_loss(child, x, MASK, 1, t=t, shift_bos=BOS, unscored=PAD, teacher=parent, distill=0.5)
    shifted = shift_right(x, BOS)  # the loss scores the shifted canvas's tokens past the start token
    text = shifted != PAD
    text[:, 0] = False
    with torch.no_grad():  # the parent reads the shifted canvas; its position i - 1 predicts the token at i
        logp = parent(shifted, torch.ones_like(x, dtype=torch.bool)).view(4, 16, -1).log_softmax(-1)
    entropy = float(-(logp.exp() * logp).sum(-1)[:, :-1][text[:, 1:]].sum())
    assert int(st["masked"]) == int(text.sum())
    assert float(soft) * x.numel() == pytest.approx(entropy, rel=1e-4)
    assert float(soft) < float(hard)  # a random parent's entropy is below its NLL of random text
    assert float(half) == pytest.approx((float(hard) + float(soft)) / 2, rel=1e-5)


def test_complementary_rows_take_the_same_texts_targets():
    parent, _ = _pair(block=4)
    x = shift_right(_text(n=2), BOS)
    masked = torch.rand(4, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    masked[:, 0] = False
    probs = parent_targets(parent, x, masked)
    assert probs.shape == (int(masked.sum()), 50)
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)))
    with torch.no_grad():
        full = parent(x, torch.ones_like(x, dtype=torch.bool)).view(2, 16, -1).softmax(-1)
    pos = int(masked[3].nonzero()[0])  # row 3: the second copy of text 1; its first masked position
    index = int(masked[:3].sum())  # the row-major order of the masked positions
    assert torch.allclose(probs[index], full[1, pos - 1], atol=1e-6)


def test_distillation_moves_a_block_child_toward_its_parent():
    """A block-4 child differs from its parent (its neighbours are masked); training on the parent's distributions
    alone (--distill 1) lowers its divergence from them on the same canvases."""
    parent, child = _pair(block=4)
    with torch.no_grad():  # a confident parent (a random one is near uniform, and so is its child)
        parent.norm.weight.mul_(8)
    same = Denoiser(ModelConfig.from_dict({**parent.cfg.to_dict(), "family": "bd3", "block_size": 1, "shift": True}))
    same.load_state_dict(parent.state_dict())  # predicts what the parent does: its soft loss is the parent's entropy alone
    x = _text(n=8)
    g = torch.Generator().manual_seed(0)
    t, noise = torch.full((8, 4), 0.7), torch.rand(8, 16, generator=g)  # one noise level: the same positions masked at any block size
    with torch.no_grad():
        entropy, _ = bd3_loss(same.eval(), x, MASK, 1, t=torch.full((8, 16), 0.7), noise=noise, shift_bos=BOS, unscored=PAD,
                              teacher=parent, distill=1.0)

    def divergence():  # the soft loss less the parent's entropy: KL(parent || child), weighted
        with torch.no_grad():
            soft, _ = bd3_loss(child.eval(), x, MASK, 4, t=t, noise=noise, shift_bos=BOS, unscored=PAD, teacher=parent, distill=1.0)
        return float(soft - entropy)

    before = divergence()
    opt = torch.optim.Adam(child.parameters(), lr=3e-3)
    for _ in range(20):
        child.train()
        loss, _ = bd3_loss(child, x, MASK, 4, t=t, noise=noise, shift_bos=BOS, unscored=PAD, teacher=parent, distill=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 0.01
    assert divergence() < 0.5 * before
    assert all(p.grad is None for p in parent.parameters())  # the parent stays frozen


def test_train_with_distillation_runs_and_records_it(ar_run, data_dir, tmp_path):
    from tests.conftest import train_small

    result = train_small(data_dir, tmp_path / "d", steps=2, eval_every=2, objective="bd3", block_size=4, t_min=0.3, t_max=0.8,
                         shift=True, complementary=True, init=str(ar_run), distill=0.5)
    assert result["val_nll"] > 0
    import json

    assert json.loads((tmp_path / "d" / "train_config.json").read_text())["train"]["distill"] == 0.5


@pytest.mark.parametrize("extra,match", [
    ([], "give the parent with --init, and --shift"),  # no parent
    (["--distill", "1.5"], "--distill"),
    (["--distill", "nan"], "--distill"),
])
def test_distill_refusals(data_dir, tmp_path, extra, match):
    out = tmp_path / "r"
    args = ["train", "--data", data_dir, "-o", out, "--family", "bd3", "--block-size", "4", "--steps", "1"]
    code, _, err = call(*args, *(extra or ["--distill", "0.5"]))
    assert_clean_failure(code, err, match)
    assert not out.exists()


def test_distill_refuses_a_parent_that_is_not_autoregressive(ar_run, data_dir, tmp_path):
    """A shifted BD3 --init can be trained on, but it is no autoregressive parent to learn distributions from."""
    from tests.conftest import train_small

    train_small(data_dir, tmp_path / "child", steps=1, eval_every=1, objective="bd3", block_size=4, t_min=0.3, t_max=0.8,
                shift=True, init=str(ar_run))
    code, _, err = call("train", "--data", data_dir, "-o", tmp_path / "r", "--family", "bd3", "--block-size", "4", "--steps", "1",
                        "--canvas-len", "64", "--shift", "--init", tmp_path / "child", "--distill", "0.5")
    assert_clean_failure(code, err, "--distill learns from an autoregressive parent; --init")
    assert not (tmp_path / "r").exists()


def test_distill_is_block_diffusions_option(data_dir, tmp_path):
    code, _, err = call("train", "--data", data_dir, "-o", tmp_path / "r", "--family", "mdlm", "--steps", "1", "--distill", "0.5")
    assert_clean_failure(code, err, "--distill")
    assert not (tmp_path / "r").exists()

