"""The TensorRT block runner's plumbing, off the device: engine specs and keys for the two block graphs, and the
in-place cache write (a 2-D device-to-device copy per tensor) checked against numpy on a simulated pycuda."""

from types import SimpleNamespace

import numpy as np
import pytest

from jetson_dllm import engine as eng
from jetson_dllm.bundle import load_bundle
from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.runners.trt_blocks import _BlockSession

DEVICE = eng.Device("Orin", "8.7", "10.3.0", "36.4.3", 8 << 30, True)


def test_block_engines_have_their_own_specs_names_and_settings(bd3_bundle, bundle_dir):
    bundle = load_bundle(bd3_bundle)
    step = eng.engine_spec(bundle, "fp16", 1, 64, "block_step")
    commit = eng.engine_spec(bundle, "fp16", 1, 64, "commit")
    assert step.onnx_sha256 != commit.onnx_sha256
    s_step = eng.builder_settings("int8", DEVICE.total_memory, len(eng.fp32_layers(bundle, "block_step")), graph="block_step")
    s_commit = eng.builder_settings("int8", DEVICE.total_memory, len(eng.fp32_layers(bundle, "commit")), graph="commit")
    assert s_commit["outputs"] == ["k_new", "v_new"] and s_step["outputs"] == ["topk_logprobs", "topk_ids"]
    assert s_step["fp32_layers"] > 0 and s_commit["fp32_layers"] > 0  # norms, residuals, the cache plumbing
    names = {eng.engine_path(bundle, s, DEVICE, st).name for s, st in ((step, s_step), (commit, s_commit))}
    assert {n.split("-b1-")[0] for n in names} == {"fp16-block_step", "fp16-commit"}
    with pytest.raises(DllmError, match="no canvas graph"):
        eng.engine_spec(bundle, "fp16", 1, 64, "")
    with pytest.raises(DllmError, match="no commit graph"):
        eng.engine_spec(load_bundle(bundle_dir), "fp16", 1, 32, "commit")
    cfg = bundle.config
    assert eng.input_shapes(cfg, step.batch, step.canvas, step.graph) == {"tokens": (1, 16), "k_cache": (cfg.n_layer, 1, cfg.n_head, 64, cfg.head_dim),
                                           "v_cache": (cfg.n_layer, 1, cfg.n_head, 64, cfg.head_dim), "valid_len": (1,)}


def test_a_canvas_engine_keeps_its_key():
    """Engines built before block graphs existed are still found: a canvas spec hashes as it did."""
    import hashlib
    import json
    from dataclasses import asdict

    spec = eng.EngineSpec("fp16", 1, 128, "ab" * 32)
    settings = eng.builder_settings("fp16", DEVICE.total_memory)
    old = {"format": eng.ENGINE_FORMAT, "spec": {k: v for k, v in asdict(spec).items() if k != "graph"},
           "device": {k: v for k, v in asdict(DEVICE).items() if k != "total_memory"}, "settings": settings}
    assert eng.engine_key(spec, DEVICE, settings) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert eng.engine_key(eng.EngineSpec("fp16", 1, 128, "ab" * 32, "commit"), DEVICE, settings) != eng.engine_key(spec, DEVICE, settings)


class _Memory:
    """Simulated device memory: allocations at distinct addresses, bytes in numpy."""

    def __init__(self):
        self.blocks = {}

    def alloc(self, nbytes):
        address = 0x10000000 + len(self.blocks) * (1 << 24)
        self.blocks[address] = np.zeros(nbytes, np.uint8)
        return _Pointer(address)

    def at(self, pointer, nbytes):
        base = max(a for a in self.blocks if a <= int(pointer))
        offset = int(pointer) - base
        return self.blocks[base][offset : offset + nbytes]


class _Pointer(int):
    """A device pointer: int() gives the address, as pycuda's DeviceAllocation does."""


def fake_cuda(memory: _Memory):
    class Memcpy2D:
        src_x_in_bytes = dst_x_in_bytes = 0

        def set_src_device(self, p):
            self.src = int(p)

        def set_dst_device(self, p):
            self.dst = int(p)

        def __call__(self, stream):
            for r in range(self.height):
                src = memory.at(self.src + self.src_x_in_bytes + r * self.src_pitch, self.width_in_bytes)
                memory.at(self.dst + self.dst_x_in_bytes + r * self.dst_pitch, self.width_in_bytes)[:] = src

    return SimpleNamespace(
        Stream=lambda: SimpleNamespace(handle=7, synchronize=lambda: None),
        Event=lambda: SimpleNamespace(record=lambda s: None, time_since=lambda e: 0.5),
        mem_alloc=memory.alloc, Memcpy2D=Memcpy2D,
        memset_d32=lambda p, value, count: memory.at(p, 4 * count).fill(0),
        pagelocked_empty=lambda shape, dtype, mem_flags=0: np.zeros(shape, dtype),
        memcpy_htod_async=lambda p, host, s: memory.at(p, host.nbytes).__setitem__(slice(None), host.view(np.uint8).ravel()),
        memcpy_dtoh_async=lambda host, p, s: host.view(np.uint8).ravel().__setitem__(slice(None), memory.at(p, host.nbytes)),
        host_alloc_flags=SimpleNamespace(DEVICEMAP=1),
    )


class _Engine:
    """A commit engine that writes keys = token + 1000 x layer (values: the negative) for every head and dimension."""

    def __init__(self, names, memory, cfg, graph):
        self.names, self.memory, self.cfg, self.graph = names, memory, cfg, graph
        self.num_io_tensors = len(names)

    def get_tensor_name(self, i):
        return self.names[i]

    def create_execution_context(self):
        engine, addresses = self, {}

        def run(handle):
            c = engine.cfg
            tokens = engine.memory.at(addresses["tokens"], 4 * 2 * c.block_size).view(np.int32).reshape(2, c.block_size)
            if engine.graph == "commit":
                layer = np.arange(c.n_layer)[:, None, None, None, None] * 1000.0
                keys = np.broadcast_to(tokens[None, :, None, :, None] + layer, (c.n_layer, 2, c.n_head, c.block_size, c.head_dim))
                for name, sign in (("k_new", 1.0), ("v_new", -1.0)):
                    engine.memory.at(addresses[name], keys.size * 4)[:] = (sign * keys).astype(np.float32).view(np.uint8).ravel()
            return True

        return SimpleNamespace(set_input_shape=lambda name, shape: True, execute_async_v3=run,
                               set_tensor_address=lambda name, a: addresses.__setitem__(name, a) or True)


def _engines(memory, cfg) -> dict:
    return {"block_step": _Engine(["tokens", "k_cache", "v_cache", "valid_len", "topk_logprobs", "topk_ids"], memory, cfg, "block_step"),
            "commit": _Engine(["tokens", "k_cache", "v_cache", "valid_len", "k_new", "v_new"], memory, cfg, "commit")}


def test_a_commit_writes_the_block_into_the_cache_in_place():
    """Discrete-GPU buffers (the Jetson's zero-copy inputs differ only in where the small tensors live)."""
    cfg = ModelConfig(d_model=32, n_head=2, n_layer=3, vocab_size=64, canvas_len=32, mask_id=2, family="bd3", block_size=8)
    memory = _Memory()
    engines = _engines(memory, cfg)
    session = _BlockSession(fake_cuda(memory), cfg, engines, batch=2, k=4, integrated=False)
    blocks = [np.arange(16, dtype=np.int32).reshape(2, 8) + 100 * j for j in range(2)]
    session.commit(blocks[0], np.array([0, 0]))
    session.commit(blocks[1], np.array([8, 8]))
    shape = (cfg.n_layer, 2, cfg.n_head, cfg.canvas_len, cfg.head_dim)
    k = memory.at(session.device["k_cache"], 4 * int(np.prod(shape))).view(np.float32).reshape(shape)
    v = memory.at(session.device["v_cache"], 4 * int(np.prod(shape))).view(np.float32).reshape(shape)
    want = np.zeros(shape, np.float32)
    for j, block in enumerate(blocks):
        want[:, :, :, 8 * j : 8 * (j + 1)] = block[None, :, None, :, None] + np.arange(cfg.n_layer)[:, None, None, None, None] * 1000.0
    np.testing.assert_array_equal(k, want)  # each block at its valid length, every layer, sample and head
    np.testing.assert_array_equal(v, -want)
    lp, ids = session.step(blocks[0], np.array([16, 16]))
    assert lp.shape == ids.shape == (2, 8, 4) and session.gpu_ms == 0.5


def test_rows_at_different_positions_commit_each_at_its_own():
    """Two requests' rows in one commit (the server): each row's keys land at its own valid length, no other row's."""
    cfg = ModelConfig(d_model=32, n_head=2, n_layer=3, vocab_size=64, canvas_len=32, mask_id=2, family="bd3", block_size=8)
    memory = _Memory()
    engines = _engines(memory, cfg)
    session = _BlockSession(fake_cuda(memory), cfg, engines, batch=2, k=4, integrated=False)
    block = np.arange(16, dtype=np.int32).reshape(2, 8)
    session.commit(block, np.array([0, 16]))
    shape = (cfg.n_layer, 2, cfg.n_head, cfg.canvas_len, cfg.head_dim)
    k = memory.at(session.device["k_cache"], 4 * int(np.prod(shape))).view(np.float32).reshape(shape)
    want = np.zeros(shape, np.float32)
    layers = np.arange(cfg.n_layer)[:, None, None, None] * 1000.0
    want[:, 0, :, 0:8] = block[0][None, None, :, None] + layers
    want[:, 1, :, 16:24] = block[1][None, None, :, None] + layers
    np.testing.assert_array_equal(k, want)


def test_a_pool_call_runs_every_row_and_commits_only_its_own():
    """The server's rows on TensorRT: a call on slot 1 of a 2-row pool runs the engines on both rows (no cache copy)
    and writes keys into row 1 only; row 0, another request's, keeps what it had."""
    from jetson_dllm.runners.trt_blocks import TrtBlockRunner

    cfg = ModelConfig(d_model=32, n_head=2, n_layer=3, vocab_size=64, canvas_len=32, mask_id=2, family="bd3", block_size=8)
    memory = _Memory()
    engines = _engines(memory, cfg)
    runner = TrtBlockRunner.__new__(TrtBlockRunner)  # the runner's own logic over the simulated device
    runner.cfg, runner.width, runner.graphs, runner.topk = cfg, 8, ("block_step", "commit"), 4
    runner.cuda, runner.device, runner.sessions = fake_cuda(memory), SimpleNamespace(integrated=False), {}
    runner.trt_engines = SimpleNamespace(engine=lambda batch, canvas, graph: engines[graph])
    assert runner.open_slots(2) > 0
    first = np.arange(16, dtype=np.int32).reshape(2, 8)
    runner.run("commit", {"tokens": first, "valid_len": np.array([0, 0], np.int32), "slots": np.array([0, 1], np.int32)})
    block = np.full((1, 8), 50, np.int32)
    assert runner.run("commit", {"tokens": block, "valid_len": np.array([8], np.int32), "slots": np.array([1], np.int32)}) == {}
    shape = (cfg.n_layer, 2, cfg.n_head, cfg.canvas_len, cfg.head_dim)
    k = memory.at(runner.pool.device["k_cache"], 4 * int(np.prod(shape))).view(np.float32).reshape(shape)
    layers = np.arange(cfg.n_layer)[:, None, None, None] * 1000.0
    want = np.zeros(shape, np.float32)
    want[:, 0, :, :8] = first[0][None, None, :, None] + layers
    want[:, 1, :, :8] = first[1][None, None, :, None] + layers
    want[:, 1, :, 8:16] = 50 + layers
    np.testing.assert_array_equal(k, want)  # row 0's second block untouched by the padding row's commit
    got = runner.run("block_step", {"tokens": block, "valid_len": np.array([16], np.int32), "slots": np.array([1], np.int32)})
    assert got["topk_ids"].shape == (1, 8, 4)
