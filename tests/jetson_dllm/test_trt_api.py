"""Every TensorRT / pycuda name the code uses exists in TensorRT 10.3 / pycuda 2026.1; nothing TensorRT 10 removed is used.

TensorRT's runtime cannot be installed here, so the names are checked against lists taken from the real
bindings (tests/fixtures/api, copied from the shared name lists). Besides `trt.X` / `cuda.X`, chains
through attributes that hold the modules (`self.trt.X`) and parameters named after them are followed.
"""

import ast
from pathlib import Path

import pytest
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[2]
TRT = set((FIXTURES / "api" / "tensorrt-10.3-names.txt").read_text().split())
PYCUDA = set((FIXTURES / "api" / "pycuda-2026.1-names.txt").read_text().split())
REMOVED = {"execute_async_v2", "execute_async", "execute", "build_engine", "max_batch_size", "max_workspace_size",
           "num_bindings", "binding_is_input", "get_binding_index", "get_binding_name", "get_binding_shape",
           "get_binding_dtype", "set_binding_shape", "get_profile_shape", "get_binding_format",
           "get_binding_vectorized_dim", "min_timing_iterations", "is_shape_binding", "is_execution_binding"}


def chain(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node.id, parts[::-1]
    return None, parts[::-1]


def check_source(source: str) -> tuple[list[str], int]:
    """(problems, names checked) for one module's source."""
    tree = ast.parse(source)
    roots = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.name == "tensorrt":
                    roots[a.asname or "tensorrt"] = TRT
                elif a.name.startswith("pycuda"):
                    roots[a.asname or a.name.split(".")[0]] = PYCUDA
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("pycuda"):
            for a in n.names:
                roots[a.asname or a.name] = PYCUDA
    if not roots:
        return [], 0
    problems, checked = [], 0
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute):
            continue
        if n.attr in REMOVED:
            problems.append(f"line {n.lineno}: {n.attr} was removed in TensorRT 10")
        root, parts = chain(n)
        if root == "self" and parts and parts[0] in roots:  # self.trt.X, self.cuda.X
            root, parts = parts[0], parts[1:]
        if root in roots and parts and isinstance(n.ctx, ast.Load):
            for part in parts:
                checked += 1
                if part not in roots[root]:
                    problems.append(f"line {n.lineno}: {root}.{'.'.join(parts)}: {part!r} is not in the API")
    return problems, checked


def imports_tensorrt_or_pycuda(source: str) -> bool:
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Import) and any(a.name == "tensorrt" or a.name.startswith("pycuda") for a in n.names):
            return True
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("pycuda"):
            return True
    return False


def modules_using_tensorrt():
    return sorted(p for p in (ROOT / "jetson_dllm").rglob("*.py") if imports_tensorrt_or_pycuda(p.read_text()))


def test_the_trt_modules_are_found():
    names = {p.name for p in modules_using_tensorrt()}
    assert {"engine.py", "trt_runner.py"} <= names


@pytest.mark.parametrize("path", modules_using_tensorrt(), ids=lambda p: p.name)
def test_names_exist_in_tensorrt_10_3_and_pycuda_2026_1(path):
    problems, checked = check_source(path.read_text())
    assert not problems, "\n".join(problems)
    assert checked >= 1


def test_every_tensorrt_and_pycuda_name_is_checked_wherever_it_is_used():
    """No file reaches TensorRT or pycuda through a name the checker does not see (a module handed in by a
    parameter or an attribute without an import of its own): every such use sits in a checked module."""
    checked = set(modules_using_tensorrt())
    unchecked = []
    for folder in ("jetson_dllm", "train_host", "calibration", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            for n in ast.walk(ast.parse(path.read_text())):
                if isinstance(n, ast.Attribute):
                    root, parts = chain(n)
                    if root == "self" and parts:
                        root = parts[0]
                    if root in ("trt", "tensorrt", "cuda", "pycuda") and path not in checked:
                        unchecked.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    assert not unchecked, unchecked
    total = sum(check_source(p.read_text())[1] for p in checked)
    assert total > 45  # the builder and the runner together use this many names


def test_the_checker_catches_removed_and_unknown_names():
    bad = """
import tensorrt as trt
import pycuda.driver as cuda
engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"")
ctx = engine.create_execution_context()
ctx.execute_async_v2([], 0)
builder = trt.Builder(trt.Logger())
builder.build_engine(None, None)
x = trt.NoSuchThing
y = cuda.graph_capture_begin
"""
    problems, _ = check_source(bad)
    text = "\n".join(problems)
    assert "execute_async_v2 was removed" in text and "build_engine was removed" in text
    assert "NoSuchThing" in text and "graph_capture_begin" in text


def test_no_implicit_int8_calibrators():
    # Deprecated since TensorRT 10.1 and gone in 11: the INT8 route is explicit Q/DQ.
    for path in modules_using_tensorrt():
        source = path.read_text()
        for name in ("IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "int8_calibrator", "setDynamicRange", "set_dynamic_range"):
            assert name not in source, f"{path.name} uses {name}"
