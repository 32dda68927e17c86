"""On a real Jetson: the board is recognised and its unified memory is read the way the profiler and the TensorRT
runner report it. Marked `jetson`: skipped with the reason anywhere else."""

import pytest

from jetson_dllm.engine import read_l4t_release
from jetson_dllm.profiler import memory_plan, orin_nano_verdict, unified_memory

pytestmark = pytest.mark.jetson


def test_the_board_is_an_l4t_release_we_read():
    release = read_l4t_release()
    assert release and release.split(".")[0].isdigit() and int(release.split(".")[0]) >= 35


def test_unified_memory_has_the_gpu_share_and_agrees_with_the_plan():
    from jetson_dllm.config import ModelConfig

    mem = unified_memory()
    assert {"total", "available", "gpu_nvmap"} <= set(mem)
    assert 0 < mem["available"] <= mem["total"] and mem["gpu_nvmap"] >= 0
    plan = memory_plan(ModelConfig.from_name("tiny", vocab_size=8192), "fp16", 1, 256)
    assert orin_nano_verdict(plan, usable=mem["available"])["fits"]  # tiny fits any Jetson with the desktop stopped
