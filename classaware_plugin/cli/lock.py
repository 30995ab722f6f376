"""One run per directory: an exclusive lock held by the process that writes into a run directory.

The lock is an advisory ``flock`` on ``.classaware-run.lock`` inside the run directory, taken without waiting. The
kernel releases it when the process exits, however it exits (``kill -9`` included), so a file left behind by a killed
run never blocks a later ``--resume``; the file only records who held it last, for the message a second process
gets.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..core.validation import ClassAwareError

LOCK = ".classaware-run.lock"


class RunDirectoryLocked(ClassAwareError):
    """Another process holds the run directory's lock."""


class RunLock:
    """``with RunLock(run_dir):`` the block runs while this process alone may write into ``run_dir``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with RunLock(d):
        ...     RunLock(d).acquire()
        Traceback (most recent call last):
        ...
        classaware_plugin.cli.lock.RunDirectoryLocked: ...
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunDirectoryLocked` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise RunDirectoryLocked(
                f"The run directory {str(self.path.parent)!r} is in use by {_holder(self.path)}: two processes must not "
                "write one run. Wait for it to end (or stop it), then resume; or choose another directory.")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime(
            "%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return (f"process {info.get('pid')} on {info.get('host')} (since {info.get('since')}: "
            f"{info.get('command') or 'unknown command'})")


if os.name == "nt":  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
