"""CPU threads: the default count, the quiet waiting `dllm` sets before torch loads, and onnxruntime's spinning to
match (the speeds themselves are measured by benchmarks/threads.py, not here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jetson_dllm import threads


def test_the_default_is_the_usable_cores_shared_by_the_processes(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.auto_threads() == 8 and threads.auto_threads(processes=3) == 2 and threads.auto_threads(processes=16) == 1
    assert threads.resolve(0) == 8 and threads.resolve(3) == 3  # a count the user gives is taken as given


def test_usable_cores_follow_the_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert threads.usable_cores() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(os.cpu_count() or 1)))
    assert 1 <= threads.usable_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("env, spins, policy", [({}, "3000", None), ({"OMP_WAIT_POLICY": "active"}, None, "active"),
                                               ({"GOMP_SPINCOUNT": "1000"}, "1000", None)])
def test_quiet_waiting_leaves_a_users_choice(monkeypatch, env, spins, policy):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    threads.quiet_waiting()
    assert os.environ.get("GOMP_SPINCOUNT") == spins and os.environ.get("OMP_WAIT_POLICY") == policy
    assert threads.spinning() == (policy == "active")


def test_the_dllm_command_sets_it_before_torch_loads():
    """`dllm` itself, in a real process: by the time a verb imports torch, the policy is in the environment."""
    code = ("import os, sys\nfrom unittest import mock\nimport jetson_dllm.cli as cli\n"
            "with mock.patch.object(cli, 'main', lambda: print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules) or 0):\n"
            "    try:\n        cli.entry()\n    except SystemExit:\n        pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["3000", "False"], out.stderr


@pytest.mark.parametrize("policy, spin", [(None, "0"), ("ACTIVE", "1")])
def test_onnxruntime_spins_only_when_asked(monkeypatch, tmp_path, policy, spin):
    import onnx
    from onnx import TensorProto, helper

    from jetson_dllm.runners.onnx_runner import session_from_onnx

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "g.onnx"))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    if policy:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    session = session_from_onnx(tmp_path / "g.onnx", threads=0)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spin
    assert options.intra_op_num_threads == threads.auto_threads()
