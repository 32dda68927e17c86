"""Training and the torch runner on a CUDA GPU (what benchmarks/adapt_pretrained.py --device cuda uses). Marked
`gpu`: they skip without one, with the reason."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)")]


def test_distilled_adaptation_trains_on_the_gpu_in_bf16(ar_run, data_dir, tmp_path):
    from tests.conftest import train_small

    result = train_small(data_dir, tmp_path / "d", steps=4, eval_every=4, objective="bd3", block_size=4, t_min=0.3, t_max=0.8,
                         shift=True, complementary=True, init=str(ar_run), distill=0.5, device="cuda", dtype="bf16")
    assert 0 < result["val_nll"] < 20


def test_the_torch_runner_writes_the_same_greedy_tokens_on_the_gpu(ar_run):
    from jetson_dllm.families import ar
    from jetson_dllm.runners.loaders import open_runner
    from jetson_dllm.sampler import SamplerConfig

    greedy = SamplerConfig(temperature=0.0)
    with open_runner("torch", ar_run, threads=1) as cpu, open_runner("torch", ar_run, device="cuda") as gpu:
        a = ar.complete(cpu, "Once upon a time", length=24, sampler=greedy).tokens.tolist()
        b = ar.complete(gpu, "Once upon a time", length=24, sampler=greedy).tokens.tolist()
    assert a == b


@pytest.mark.parametrize("objective", ["mdlm", "sdd", "continuous"])
def test_a_canvas_family_trains_and_evaluates_on_the_gpu(objective, data_dir, tmp_path):
    """The evaluation's bound on the GPU (MDLM's once indexed a CPU weight with a GPU mask and stopped the run)."""
    from tests.conftest import train_small

    result = train_small(data_dir, tmp_path / objective, steps=4, eval_every=4, objective=objective, device="cuda")
    assert 0 < result["val_nll" if objective == "mdlm" else "val_loss"] < 20
