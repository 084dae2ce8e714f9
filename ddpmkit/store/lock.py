"""The writer's lock of a run directory: one training process at a time writes a run.

``RUN/train.lock`` is held with an exclusive ``fcntl.flock`` for as long as a training writes the run. The
operating system releases it when the process ends, however it ends (SIGKILL, a crash, a power cut), so a
lock file left behind by a dead process never blocks: only a live holder does. The file holds the holder's
pid and host, read to name the holder when a second writer is refused. Readers (``sample``, ``eval``,
``report``) take no lock and never wait.

The file itself is never removed (removing it would let a third process lock a fresh file while a second
still holds the old one).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from ..errors import CheckpointError
from ..files import reason

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = "train.lock"


class RunLockedError(CheckpointError):
    """Another live process trains this run."""


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir/train.lock``; :meth:`release` (or process exit) frees it."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot open the lock file {self.path}: {reason(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(f"{self.path.parent} is being trained by another process ({holder}); "
                                     "wait for it to end or stop it, then resume") from None
            raise CheckpointError(f"cannot lock {self.path}: {reason(e)}") from None
        try:  # name the holder for a second writer
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock is what counts; the text only names the holder
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)  # closing the descriptor releases the flock
            except OSError:
                pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
