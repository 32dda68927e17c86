"""Running `dllm` on bad input, in-process and as a real subprocess, and checking it fails cleanly and changes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

DLLM = [sys.executable, "-c", "from jetson_dllm.cli import entry; entry()"]


def call(*args) -> tuple[int, str, str]:
    """main() in this process, with stdout and stderr captured."""
    from jetson_dllm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run(*args, timeout: float = 120) -> tuple[int, str, str]:
    """The real `dllm` entry point in a subprocess (the installed typer and its click, as a user gets them)."""
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run([*DLLM, *[str(a) for a in args]], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def assert_clean_failure(code: int, err: str, match: str | None = None) -> None:
    """Non-zero exit, no traceback, and one clean message: `error: ...` in one line, or a usage error whose last
    line is `Error: ...` (after the usage)."""
    assert code != 0, f"accepted with exit 0: {err}"
    assert "Traceback" not in err and 'File "' not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no message at all"
    if code == 2:
        assert lines[-1].startswith("Error: ") or "Usage:" in err, err
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
    if match is not None:
        assert match in err, (match, err)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders and its sha256 (to prove a refused command changed no byte)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else [Path(folder)]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
