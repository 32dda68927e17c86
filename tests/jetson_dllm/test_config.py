import pytest
import torch

from jetson_dllm.config import SIZES, ModelConfig, canvas_for
from jetson_dllm.errors import DllmError
from train_host.model import Denoiser


def module_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # no memory, so xxlarge costs nothing
        model = Denoiser(cfg)
    return sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once


@pytest.mark.parametrize("name", list(SIZES))
def test_param_count_matches_the_module(name):
    cfg = ModelConfig.from_name(name, vocab_size=8192)
    assert cfg.num_params() == module_params(cfg)


def test_untied_head_counts_twice():
    tied = ModelConfig.from_name("tiny", vocab_size=1000)
    untied = ModelConfig.from_name("tiny", vocab_size=1000, tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 1000 * 256
    assert untied.num_params() == module_params(untied)


def test_sizes_follow_the_design_table():
    expected = {"tiny": (256, 4, 4), "small": (384, 6, 6), "medium": (512, 8, 8), "large": (640, 10, 10),
                "xlarge": (768, 12, 12), "xxlarge": (1024, 16, 16)}
    for name, (d, h, n) in expected.items():
        cfg = ModelConfig.from_name(name)
        assert (cfg.d_model, cfg.n_head, cfg.n_layer) == (d, h, n)
    # the tiny model: embedding 8192*256 + 4 blocks of (4*256^2 + 3*256*704 + 2*256) + final norm
    assert ModelConfig.from_name("tiny").num_params() == 8192 * 256 + 4 * (4 * 256**2 + 3 * 256 * 704 + 512) + 256


def test_weight_bytes_per_precision():
    cfg = ModelConfig.from_name("small")
    assert cfg.weight_bytes("fp32") == 2 * cfg.weight_bytes("fp16")
    assert cfg.weight_bytes("int8") < cfg.weight_bytes("fp16")
    with pytest.raises(DllmError):
        cfg.weight_bytes("int4")


def test_bad_configs_are_refused():
    with pytest.raises(DllmError, match="unknown config"):
        ModelConfig.from_name("huge")
    with pytest.raises(DllmError, match="divisible"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(DllmError, match="mask_id"):
        ModelConfig(vocab_size=10, mask_id=10)
    with pytest.raises(DllmError, match="unknown fields"):
        ModelConfig.from_dict({"d_model": 64, "n_head": 2, "n_layer": 1, "flash": True})


def test_canvas_buckets_and_rounding():
    cfg = ModelConfig.from_name("tiny", canvas_len=256)
    assert cfg.canvas_buckets() == [32, 64, 128, 256]
    assert canvas_for(65, cfg.canvas_buckets()) == 128
    assert canvas_for(32, cfg.canvas_buckets()) == 32
    with pytest.raises(DllmError, match="longest canvas"):
        canvas_for(257, cfg.canvas_buckets())
    assert ModelConfig.from_name("tiny", canvas_len=100).canvas_buckets() == [32, 64, 100]
