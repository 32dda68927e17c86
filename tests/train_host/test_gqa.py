"""Grouped-query attention (n_kv_head < n_head), as real pretrained checkpoints have it: the same function as
multi-head attention with each key/value head copied to its group, a KV cache of n_kv_head heads, and graphs that
export and run with it on onnxruntime exactly as torch does."""

import numpy as np
import pytest
import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from train_host.model import Denoiser

BASE = dict(d_model=64, n_head=4, n_layer=2, vocab_size=100, canvas_len=32, mask_id=2)


@pytest.mark.parametrize("family, extra", [("mdlm", {}), ("ar", {}), ("bd3", {"block_size": 8})])
def test_gqa_is_multi_head_attention_with_each_kv_head_shared_by_its_group(family, extra):
    torch.manual_seed(0)
    gqa = Denoiser(ModelConfig(**BASE, n_kv_head=2, family=family, **extra)).eval()
    mha = Denoiser(ModelConfig(**BASE, family=family, **extra)).eval()
    state = gqa.state_dict()
    d, hd = 64, 16
    for i in range(2):  # rows [q; k; v]: repeat each kv head's rows for the two query heads it serves
        w = state[f"blocks.{i}.attn.wqkv.weight"]
        q, k, v = w[:d], w[d : d + 2 * hd], w[d + 2 * hd :]
        expand = lambda t: t.view(2, hd, d).repeat_interleave(2, dim=0).reshape(4 * hd, d)  # noqa: E731
        state[f"blocks.{i}.attn.wqkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    x = torch.randint(3, 100, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)
    assert gqa.cfg.num_params() == sum(p.numel() for p in gqa.parameters()) < mha.cfg.num_params()


def test_a_config_whose_heads_do_not_group_is_refused():
    with pytest.raises(DllmError, match="not a multiple of n_kv_head"):
        ModelConfig(**BASE, n_kv_head=3)
    old = ModelConfig(**BASE).to_dict()
    del old["n_kv_head"]  # written before grouped-query attention: one key/value head per head
    assert ModelConfig.from_dict(old).n_kv_head == 4


@pytest.mark.parametrize("objective, extra", [("ar", {}), ("bd3", {"block_size": 16, "t_min": 0.3, "t_max": 0.8})])
def test_a_gqa_model_trains_exports_and_runs_the_same_on_onnxruntime(objective, extra, data_dir, tmp_path):
    from conftest import train_small

    from jetson_dllm.bundle import load_bundle
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    train_small(data_dir, tmp_path / "run", steps=2, eval_every=2, objective=objective, n_head=4, n_kv_head=1, **extra)
    bundle = export_bundle(tmp_path / "run", tmp_path / "bundle")
    assert bundle.config.n_kv_head == 1 and bundle.config.n_head == 4
    parity = bundle.manifest["decode_parity" if objective == "ar" else "block_parity"]["fp32"]
    assert parity["max_abs_logprob_diff"] < 1e-3 and parity["top1_agreement"] >= 0.999
    greedy = SamplerConfig(steps=4, temperature=0.0)
    with open_model(tmp_path / "run") as on_torch, open_model(load_bundle(tmp_path / "bundle").path) as on_onnx:
        a = complete(on_torch, "Once upon a time", length=20, num_samples=2, sampler=greedy)
        b = complete(on_onnx, "Once upon a time", length=20, num_samples=2, sampler=greedy)
        cache = on_onnx.memory()["cache"]
    assert np.array_equal(a.tokens, b.tokens)
    cfg = bundle.config
    assert cache == 2 * 4 * cfg.n_layer * 2 * 1 * cfg.canvas_len * cfg.head_dim  # k and v, float32, batch 2, one kv head
