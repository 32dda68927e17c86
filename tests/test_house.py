"""The house rules, checked: small files and functions, a thin CLI, no import circles, a runtime free of host code."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jetson_dllm", "train_host", "calibration")
# The one function allowed past 60 lines: the sampler's loop (a generator) reads best as one piece.
LONG_FUNCTIONS_ALLOWED = {("jetson_dllm/sampler.py", "sample_steps")}
# Runtime modules that may import host packages: the host verbs and the torch runner (lazily, inside functions).
HOST_BRIDGES = {"jetson_dllm/cli/host.py", "jetson_dllm/cli/device.py", "jetson_dllm/runners/torch_runner.py"}


def python_files(*folders):
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules a file imports (absolute names), at module level only or anywhere."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module)
            found |= {f"{n.module}.{a.name}" for a in n.names}
    return found


def parents(module: str) -> list[str]:
    """The packages above a module (a.b.c -> a, a.b)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_file_over_400_lines():
    long = {rel(p): n for p in python_files(*PACKAGES, "benchmarks", "tests") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_function_over_60_lines():
    long = []
    for p in python_files(*PACKAGES):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60 and (rel(p), n.name) not in LONG_FUNCTIONS_ALLOWED:
                long.append(f"{rel(p)}::{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_every_cli_command_body_is_at_most_15_lines():
    from jetson_dllm.cli import app

    too_long = []
    for command in app.registered_commands:
        fn = command.callback
        tree = ast.parse(Path(fn.__code__.co_filename).read_text())
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == fn.__name__)
        body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) else node.body
        lines = node.end_lineno - body[0].lineno + 1
        if lines > 15:
            too_long.append(f"{fn.__name__}: {lines} lines")
    assert len(app.registered_commands) == 12
    assert not too_long, too_long


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module level", "any level"])
def test_no_import_circles(top_level_only):
    """Arrows only go down, counting imports made inside functions too (a lazy import is still a dependency)."""
    from jetson_dllm.families import FAMILIES

    modules = {module_name(p): p for p in python_files(*PACKAGES)}
    graph = {m: {i for i in imports(p, top_level_only=top_level_only) if i in modules and i != m} for m, p in modules.items()}
    if not top_level_only:  # the registry imports family modules by name: a caller of host_module() depends on each
        for m, p in modules.items():
            text = p.read_text()
            graph[m] |= {f.host for f in FAMILIES.values() if "host_module()" in text} - {m}
            graph[m] |= {f.runtime for f in FAMILIES.values() if "runtime_module()" in text} - {m}
            graph[m] |= {f.network for f in FAMILIES.values() if f.network and "network_module()" in text} - {m}
    # importing a.b.c runs a/__init__ and a/b/__init__ first: a module depends on the packages above what it imports
    # too, so a circle through an __init__ counts like any other (no exemption for a package exposing its submodules)
    graph = {m: deps | {p for i in deps for p in parents(i) if p in modules and p != m and not m.startswith(p + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for dep in graph[m]:
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


# Where a family may be named: the registry, the families' own modules (runtime and host) and the maths and export
# modules each family's host module builds on; jetson_dllm/config.py checks a config against its family's record.
FAMILY_MODULES = ("jetson_dllm/families/", "train_host/families/", "train_host/bd3.py", "train_host/bd3_export.py",
                  "train_host/ar_export.py", "train_host/autoregressive.py", "train_host/diffusion.py", "calibration/blocks.py",
                  "jetson_dllm/config.py")


def family_names() -> set[str]:
    """Every family's name, from the registry (a new family is covered the day it is added), and every record value
    that is one: a comparison with any of them decides by the family instead of asking a field."""
    from jetson_dllm.families import FAMILIES

    return set(FAMILIES)


FAMILY_NAMES = family_names()


def family_branches(path: Path) -> list[str]:
    """Conditionals that decide by the family instead of asking its record: a test on `causal` / `block_size`,
    a comparison with a family's name or with a `family` / `objective` field, and `hasattr` on a runner."""
    found = []
    for n in ast.walk(ast.parse(path.read_text())):
        tests = [n.test] if isinstance(n, (ast.If, ast.IfExp, ast.While)) else list(n.ifs) if isinstance(n, ast.comprehension) else []
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr" and "runner" in ast.unparse(n.args[0]):
            found.append(f"line {n.lineno}: {ast.unparse(n)}")
        for t in tests:
            truths = [t] + (t.values if isinstance(t, ast.BoolOp) else []) + ([t.operand] if isinstance(t, ast.UnaryOp) else [])
            for m in ast.walk(t):
                named = isinstance(m, ast.Compare) and any(
                    (isinstance(o, ast.Constant) and o.value in FAMILY_NAMES) or (isinstance(o, ast.Attribute) and o.attr in ("family", "objective"))
                    for o in [m.left, *m.comparators])
                bare = m in truths and isinstance(m, ast.Attribute) and m.attr in ("causal", "block_size")
                if named or bare:
                    found.append(f"line {m.lineno}: {ast.unparse(t)}")
    return found


def test_no_code_branches_on_the_family_outside_the_registry_and_family_modules():
    offenders = {rel(p): b for p in python_files(*PACKAGES) if not rel(p).startswith(FAMILY_MODULES) and (b := family_branches(p))}
    assert not offenders, offenders


def test_the_branch_check_sees_a_branch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("if cfg.causal:\n    pass\nx = 1 if cfg.family == 'bd3' else 2\nif hasattr(runner, 'step'):\n    pass\n"
                     "if family.cached and 'canvas' in runner.graphs:\n    pass\n"
                     "if family_of(cfg).soft_inputs == 'sdd':\n    pass\nok = [f for f in fams if f.kind != 'continuous']\n")
    assert sorted(int(b.split(":")[0].split()[1]) for b in family_branches(probe)) == [1, 3, 4, 8, 10]


def test_no_runner_derives_from_another_runner():
    """One base (RunnerBase: closing as a context manager); no runner class inherits another's behaviour."""
    bases = {}
    for p in python_files("jetson_dllm/runners"):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ClassDef) and n.name.endswith("Runner") and n.name != "Runner":  # the Protocol itself
                bases[n.name] = [ast.unparse(b) for b in n.bases]
    assert {"TorchRunner", "OnnxRunner", "TrtRunner", "TrtBlockRunner"} <= set(bases)
    assert all(b == ["RunnerBase"] for b in bases.values()), bases


# The three layers (docs/architecture.md): the app on top, the host in the middle, the torch-free core at the bottom.
APP = ("jetson_dllm.cli", "jetson_dllm.serve", "jetson_dllm.bench", "jetson_dllm.bench_report", "jetson_dllm.tables",
       "jetson_dllm.live", "jetson_dllm.__main__")
# The core's one reach up: open_runner opens the torch runner (host) by name, lazily, as the family registry does.
LAYER_BRIDGES = {("jetson_dllm.runners.loaders", "jetson_dllm.runners.torch_runner")}


def layer(module: str) -> int:
    if module.startswith(APP):
        return 2
    if module.startswith(("train_host", "calibration")) or module == "jetson_dllm.runners.torch_runner":
        return 1
    return 0


def test_arrows_only_go_down_the_layers():
    """The core imports neither host nor app, the host not the app, at any level."""
    up = []
    for p in python_files(*PACKAGES):
        m = module_name(p)
        for i in imports(p, top_level_only=False):
            if i.startswith(PACKAGES) and layer(i) > layer(m) and (m, i) not in LAYER_BRIDGES:
                up.append(f"{m} -> {i}")
    assert not up, up


def test_the_runtime_imports_no_host_package_at_any_level():
    offenders = {}
    for p in python_files("jetson_dllm"):
        if rel(p) in HOST_BRIDGES:
            continue
        host = sorted(i for i in imports(p, top_level_only=False) if i.split(".")[0] in ("train_host", "calibration", "torch"))
        if host:
            offenders[rel(p)] = host
    assert not offenders, offenders


def test_calibration_imports_no_train_host():
    offenders = {rel(p): sorted(i for i in imports(p, False) if i.startswith("train_host")) for p in python_files("calibration")}
    assert not any(offenders.values()), offenders


def test_every_runtime_module_imports_with_host_packages_and_torch_blocked():
    names = [module_name(p) for p in python_files("jetson_dllm") if p.name != "__main__.py"]
    code = ("import sys, importlib\n"
            "for blocked in ('torch', 'train_host', 'calibration', 'onnx', 'tensorrt', 'pycuda'):\n"
            "    sys.modules[blocked] = None\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(len(sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(names) >= 20


@pytest.mark.parametrize("package", ["jetson_dllm", "train_host", "calibration"])
def test_tests_mirror_the_packages(package):
    assert (ROOT / "tests" / package).is_dir()
    assert list((ROOT / "tests" / package).glob("test_*.py")), f"tests/{package} holds no tests"


def test_a_slow_test_says_it_is_still_running(tmp_path):
    """`-q` prints a heartbeat for a test that runs past the interval (conftest's), so a slow test is not a hang."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_sleeps():\n    time.sleep(2.5)\n\n\n"
                                          "def test_capsys_is_untouched(capsys):\n    for i in range(30):\n        print(i)\n"
                                          "        time.sleep(0.1)\n    assert capsys.readouterr().out.split() == [str(i) for i in range(30)]\n")
    env = {**os.environ, "DLLM_TEST_HEARTBEAT_S": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_slow.py")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_sleeps still running: 1 s]" in out.stdout and "still running: 2 s]" in out.stdout
    assert "test_capsys_is_untouched still running" not in out.stdout and "2 passed" in out.stdout  # its output stays its own
