"""File helpers for writes that must survive a crash: hashing, fsync, atomic file and folder writes, manifests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from jetson_dllm.errors import DllmError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file so that readers see the old content or the new, never a mix (temp name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_manifest(path: Path, fmt: str, max_version: int, what: str, remedy: str) -> dict:
    """A JSON manifest carrying `format` and `version` (checkpoint config, bundle manifest, data manifest),
    or one line saying what is wrong and what to do."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        raise DllmError(f"{path} is truncated or corrupt; {remedy}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise DllmError(f"{Path(path).parent} is not a jetson-dllm {what} (format {found!r})")
    if data.get("version", 0) > max_version:
        raise DllmError(f"{Path(path).parent} was written by a newer jetson-dllm ({what} format {data['version']}, "
                        f"this one reads {max_version}); upgrade jetson-dllm")
    return data


@contextlib.contextmanager
def atomic_folder(final: Path, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a hidden temporary name beside `final`, then rename it into place.

    Yields the temporary folder. On success every file is fsynced and the folder renamed to `final`
    (an existing `final` is swapped out and deleted when `replace` is set, else refused); on any
    failure, Ctrl-C included, the temporary folder is removed and `final` is untouched.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        old = None
        if final.exists():
            if not replace:
                raise DllmError(f"{final} appeared while it was being written; nothing was replaced")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
