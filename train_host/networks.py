"""The network of a model config: its family's own (`Family.network`), or the Denoiser."""

from __future__ import annotations

import torch.nn as nn

from jetson_dllm.config import ModelConfig
from jetson_dllm.families import family_of
from train_host.model import Denoiser


def build_model(cfg: ModelConfig) -> nn.Module:
    """The family's `Network` (continuous diffusion's) or the Denoiser, with fresh weights."""
    module = family_of(cfg).network_module()
    return module.Network(cfg) if module is not None else Denoiser(cfg)
