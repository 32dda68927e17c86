"""File helpers for writes that must survive a crash: hashing, fsync, atomic file and folder writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import threading
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
    restore = _terminate_as_exception()
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
    finally:
        restore()


def _terminate_as_exception():
    """While a folder is being written, SIGTERM raises SystemExit(143) so the cleanup runs (as Ctrl-C does);
    returns the function that puts the old handler back. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handle)
    return lambda: signal.signal(signal.SIGTERM, old)


def check_makeable(folder: Path) -> None:
    """An output folder can be made where it is named: no file stands where a folder of its path must be (`-o
    notes.txt/out`). One line naming the file otherwise, before anything is written."""
    for above in [folder, *folder.parents]:
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise DllmError(f"{folder}: {above} is a file, not a folder; choose an output folder that is not under a file")
            return


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder for the whole write: a second writer is refused at once, with a
    message, instead of both finishing and the last one winning. The lock file sits beside the folder."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    check_makeable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder.parent / f".{folder.name}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DllmError(f"another dllm is writing {folder} right now; wait for it to finish or choose another output") from None
    try:
        yield
    finally:
        lock.release()
