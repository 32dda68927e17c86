"""Block diffusion's block-step and commit graphs: onnxruntime on them gives what the torch model gives, with the
cache allocated once at its largest length and garbage past its valid length."""

import numpy as np
import pytest
import torch

from jetson_dllm.config import ModelConfig
from train_host.bd3_export import export_block_graphs
from train_host.cached_graphs import block_step, commit
from train_host.model import Denoiser, KVCache

ort = pytest.importorskip("onnxruntime")


def test_the_graphs_agree_with_the_torch_cache(tmp_path):
    torch.manual_seed(0)
    model = Denoiser(ModelConfig(d_model=32, n_head=2, n_layer=2, vocab_size=64, canvas_len=32, mask_id=2, family="bd3", block_size=8)).eval()
    paths = export_block_graphs(model, tmp_path, k=8)
    step, commit_graph = ort.InferenceSession(str(paths["block_step"])), ort.InferenceSession(str(paths["commit"]))
    x = torch.randint(3, 64, (2, 32))
    rng = np.random.default_rng(0)
    k_cache = rng.random((2, 2, 2, 32, 16), dtype=np.float32)  # allocated once; garbage past valid_len must not matter
    v_cache = rng.random((2, 2, 2, 32, 16), dtype=np.float32)
    with torch.no_grad():
        cache = KVCache(model.cfg, 2, 32, "cpu")
        for j in range(3):
            block = x[:, j * 8 : (j + 1) * 8]
            z = block.clone()
            z[:, ::2] = 2  # half masked
            feeds = {"tokens": z.numpy().astype(np.int32), "k_cache": k_cache, "v_cache": v_cache, "valid_len": np.full(2, j * 8, np.int32)}
            logprobs, ids, entropy = step.run(None, feeds)
            want_lp, want_ids = block_step(model, cache, z, 8)
            np.testing.assert_allclose(logprobs, want_lp.numpy(), atol=1e-5)
            assert (ids == want_ids.numpy()).all()
            assert entropy.shape == (2, 8) and (entropy > 0).all()  # the whole distribution's (test_onnx_runner checks its value)
            k_new, v_new = commit_graph.run(None, {**feeds, "tokens": block.numpy().astype(np.int32)})
            k_cache[:, :, :, j * 8 : (j + 1) * 8], v_cache[:, :, :, j * 8 : (j + 1) * 8] = k_new, v_new  # in place
            commit(model, cache, block)
            np.testing.assert_allclose(k_cache[:, :, :, : (j + 1) * 8], cache.k[:, :, :, : (j + 1) * 8].numpy(), atol=1e-5)
    assert logprobs.shape == (2, 8, 8)  # the vocabulary-sized work only for the block's positions
    import onnx

    for path in paths.values():  # what TensorRT's parser needs: no int64 inputs, default-domain ops
        graph = onnx.load(str(path)).graph
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.INT64 for i in graph.input)
        assert all(n.domain in ("", "ai.onnx") for n in graph.node)
