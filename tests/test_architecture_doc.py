"""docs/architecture.md checked against the code where a test can check it: its family table names the registry's
families, its graph table the contract's graphs, its module table files that exist (and every package module is in
it), and the functions its walk-through says every family module has, every family module has."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from jetson_dllm.families import FAMILIES
from jetson_dllm.runners.graphs import GRAPHS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "architecture.md").read_text()
PACKAGES = {"jetson_dllm/": "jetson_dllm", "train_host/": "train_host", "calibration/": "calibration"}


def table_after(heading: str) -> list[list[str]]:
    part = DOC[DOC.index(heading):]
    rows, started = [], False
    for line in part.splitlines()[1:]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif started:
            break
    return rows


def test_family_table_names_every_registered_family():
    header = table_after("## Model families: one registry")[0]
    assert header[1:] == list(FAMILIES)


def test_graph_table_names_every_graph():
    rows = table_after("## Runners execute named graphs")[2:]
    assert [r[0].strip("`") for r in rows] == list(GRAPHS)


def documented_modules() -> dict[str, set[str]]:
    """package -> the module paths (relative to it) the "What is where" table names."""
    out, package = {}, None
    for row in table_after("## What is where")[2:]:
        first, parent = row[0], ""
        bold = re.fullmatch(r"\*\*`(\w+)/`\*\*", first)
        if bold:
            package = PACKAGES.get(bold.group(1) + "/")
            continue
        if package is None:
            continue
        for name in re.findall(r"`([\w/.]+)`", first):
            if "/" in name:
                parent = name.rsplit("/", 1)[0] + "/" if name.endswith(".py") else name
            elif parent:
                name = parent + name
            out.setdefault(package, set()).add(name)
    return out


def test_module_table_names_files_that_exist_and_every_module():
    named = documented_modules()
    assert set(named) == set(PACKAGES.values())
    for package, names in named.items():
        missing = sorted(n for n in names if not (ROOT / package / n).exists())
        assert not missing, f"docs/architecture.md names {package}/{missing}, which do not exist"
        modules = {str(p.relative_to(ROOT / package)) for p in (ROOT / package).rglob("*.py")}
        covered = {m for m in modules if m in names or any(m.startswith(n) for n in names if n.endswith("/"))}
        left = sorted(m for m in modules - covered if not m.endswith(("__init__.py", "__main__.py")) and not m.startswith("cli/"))
        assert not left, f"docs/architecture.md's module table leaves out {package}/{left}"


def test_every_family_module_has_what_the_walk_through_names():
    walk = DOC[DOC.index("## How to add a family"):DOC.index("## What is where")]
    runtime = re.findall(r"`(\w+)\(runner", walk[walk.index("2. **The runtime module**"):walk.index("3. **The host module**")])
    host = re.findall(r"`(\w+)\(", walk[walk.index("3. **The host module**"):walk.index("4. If it needs")])
    assert {"complete", "bench_generate", "serve_calls"} <= set(runtime) and {"train_loss", "nll_batch", "export"} <= set(host)
    for family in FAMILIES.values():
        rt, hs = importlib.import_module(family.runtime), importlib.import_module(family.host)
        assert [f for f in runtime if not hasattr(rt, f)] == [], family.name
        assert [f for f in host if not hasattr(hs, f) and f != "Network"] == [], family.name
