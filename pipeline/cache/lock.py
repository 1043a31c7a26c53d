"""Writer locks: refuse a second writer on the same cache dir.

Each writer process holds an exclusive ``flock`` on ``locks/worker-<i>-of-<W>.lock`` for its slot
(one slot per torchrun rank x ``--worker-index``). The kernel drops a flock when its process dies,
SIGKILL included, so a crashed run never leaves a stale lock behind. A writer also refuses to start
while any writer with a *different* split (another W) is alive, since the two would write the same
shards.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Self

from .spec import LOCKS_DIR, CacheError


class CacheLockedError(CacheError):
    """Another live process is writing this cache."""


class WriterLock:
    def __init__(self, cache_dir: str | Path, worker: int = 0, num_workers: int = 1):
        self.dir = Path(cache_dir) / LOCKS_DIR
        self.path = self.dir / f"worker-{worker:05d}-of-{num_workers:05d}.lock"
        self.num_workers = num_workers
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        for other in sorted(self.dir.glob("worker-*-of-*.lock")):
            if other.name.endswith(f"-of-{self.num_workers:05d}.lock"):
                continue
            if _is_held(other):
                raise CacheLockedError(
                    f"{self.dir.parent}: a writer with a different split is running "
                    f"({_holder(other)}, {other.name}); wait for it to finish or stop it")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheLockedError(
                f"{self.dir.parent} is already being written by {_holder(self.path)}; wait for it "
                "to finish or stop it (its lock frees itself when that process exits)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _is_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')}"
    except (OSError, ValueError):
        return "another process"
