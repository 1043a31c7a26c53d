"""Writer locks: refuse a second writer on the same cache dir.

Each writer process holds an exclusive ``flock`` on ``locks/worker-<i>-of-<W>.lock`` for its slot
(one slot per torchrun rank x ``--worker-index``). The kernel drops a flock when its process dies,
SIGKILL included, so a crashed run never leaves a stale lock behind. A writer also refuses to start
while any writer with a *different* split (another W) is alive, since the two would write the same
shards.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Self

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

    def check(self) -> None:
        """A flock cannot be lost while its process lives (ObjectLock's can)."""

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


# --------------------------------------------------------------------------- object stores

LOCK_TTL_ENV = "DSKD_LOCK_TTL"  # seconds a store lock lives unrefreshed [default 120]


class ObjectLock:
    """The writer lock of a cache in object storage, where there are no file locks: an object
    ``locks/worker-<i>-of-<W>.lock`` holding {owner, host, pid, expires}. It is created only if
    absent (a conditional PUT where the store has one), refreshed every ttl/3 while the writer
    runs, and deleted on release. A lock whose holder stopped refreshing it (expired), or whose
    holder is a dead process on this host, is taken over with a message, by a PUT conditional on
    the expired object's ETag where the store has one (S3 ``If-Match``: of several writers taking
    over at once exactly one wins); a live one refuses the second writer, naming it. Refreshes
    are conditional on the ETag too, so a paused writer never overwrites its successor's lock. Before a shard is committed the writer checks it still holds the
    lock (``check``), so a writer that was paused past its expiry stops instead of racing."""

    def __init__(self, store: Any, worker: int = 0, num_workers: int = 1,
                 ttl: float | None = None, say: Any = None):
        self.store = store
        self.name = f"worker-{worker:05d}-of-{num_workers:05d}.lock"
        self.num_workers = num_workers
        self.ttl = float(ttl or os.environ.get(LOCK_TTL_ENV) or 120)
        self.owner = uuid.uuid4().hex
        self.say = say or (lambda msg: print(msg, file=sys.stderr))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _rel(self, name: str) -> str:
        return f"{LOCKS_DIR}/{name}"

    def _path(self, name: str) -> str:
        return self.store.path(self._rel(name))

    def _read(self, name: str) -> dict[str, Any] | None:
        return self._stat(name)[0]

    def _stat(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """The lock object's content and its ETag (None, None when absent). The ETag is read
        first: if the object changes in between, the content is the newer one and a write
        conditional on the older ETag fails, which is the safe side."""
        fs, path = self.store.fs, self._path(name)
        try:
            etag = fs.info(path).get("ETag")
            body = fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        try:
            info = json.loads(body)
        except ValueError:  # a torn or foreign object: treat as expired
            info = None
        return (info if isinstance(info, dict) else {"expires": 0}), etag

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl}).encode()

    def acquire(self) -> ObjectLock:
        from .remote import store_errors

        with store_errors(self.store.url, "taking the writer lock"):
            for name in self._lock_names():
                if name == self.name or name.endswith(f"-of-{self.num_workers:05d}.lock"):
                    continue
                info = self._read(name)
                if info and _alive(info):
                    raise CacheLockedError(
                        f"{self.store.url}: a writer with a different split is running "
                        f"({_who(info)}, {name}); wait for it to finish or stop it")
            for _ in range(3):  # again only if the lock vanished between reading and taking it
                info, etag = self._stat(self.name)
                if info is None and self._create():
                    break
                if _alive(info):
                    raise CacheLockedError(
                        f"{self.store.url} is already being written by {_who(info)} (lock "
                        f"{self._rel(self.name)}, refreshed until {_when(info)}); wait for it to "
                        "finish or stop it. If that process is gone, the lock expires by then, or "
                        "delete the lock object to take over at once")
                if self._take_over(etag):
                    self.say(f"taking over the stale writer lock of {_who(info)} on "
                             f"{self.store.url} ({self._rel(self.name)}: expired, or its process "
                             "has exited)")
                    break
            else:
                raise CacheLockedError(f"{self.store.url}: the writer lock {self._rel(self.name)} "
                                       "keeps changing hands; is another writer starting? Retry")
            if (self._read(self.name) or {}).get("owner") != self.owner:  # a store without
                raise self._raced()  # conditional writes: the last writer won; we did not
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name="dskd-lock-refresh")
        self._thread.start()
        return self

    def _raced(self) -> CacheLockedError:
        info = self._read(self.name) or {}
        return CacheLockedError(f"{self.store.url}: another writer ({_who(info)}) took the writer "
                                f"lock {self._rel(self.name)} at the same moment; wait for it to "
                                "finish or stop it")

    def _lock_names(self) -> list[str]:
        try:
            return [p.rsplit("/", 1)[-1] for p in
                    self.store.fs.ls(self.store.path(LOCKS_DIR), detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    def _create(self) -> bool:
        """Create the lock object if it is absent (True); raises if another writer created it
        first. A store without a conditional create is written unconditionally (acquire reads
        the object back)."""
        path = self._path(self.name)
        try:
            with self.store.fs.open(path, "xb") as f:  # S3: PUT with If-None-Match: *
                f.write(self._body())
        except FileExistsError:
            raise self._raced() from None
        except (NotImplementedError, ValueError, TypeError):  # no conditional create
            self.store.fs.pipe_file(path, self._body())  # acquire reads it back
        return True

    def _take_over(self, etag: str | None) -> bool:
        """Replace an expired lock object by this writer's, atomically where the store can
        (S3: PUT with If-Match: <the expired object's ETag>, so of several writers taking over at
        once exactly one succeeds). False if the object vanished meanwhile (take it afresh);
        raises if another writer replaced it first."""
        path = self._path(self.name)
        if etag and conditional_writes(self.store.fs):
            try:
                self.store.fs.pipe_file(path, self._body(), IfMatch=etag)
                return True
            except FileNotFoundError:
                return False
            except OSError as e:
                if _precondition_failed(e):
                    raise self._raced() from None
                if not _unsupported(e):
                    raise
        # No conditional overwrite: delete, then create if absent. Two writers that both read
        # the expired lock can both get here; the read-back in acquire catches most such races,
        # and the loser stops at its next shard commit (``check``) when its refresh finds the
        # lock taken (docs/cache-format.md §7.1).
        self.store.fs.rm_file(path)
        return self._create()

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 3) and self._refresh_once():
            pass

    def _refresh_once(self) -> bool:
        """Push the expiry forward; False (and ``lost`` set) when another writer holds it now."""
        try:
            info, etag = self._stat(self.name)
            if info is None or info.get("owner") != self.owner:
                self._lose(info)
                return False
            path = self._path(self.name)
            if etag and conditional_writes(self.store.fs):
                try:  # only over our own object: never over a writer that just took over
                    self.store.fs.pipe_file(path, self._body(), IfMatch=etag)
                    return True
                except OSError as e:  # FileNotFoundError included: it was deleted
                    if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                        self._lose(self._read(self.name))
                        return False
                    if not _unsupported(e):
                        raise
            self.store.fs.pipe_file(path, self._body())
        except Exception as e:  # noqa: BLE001 - a network blip: retry at the next tick
            self.say(f"could not refresh the writer lock on {self.store.url}: {e}")
        return True

    def _lose(self, info: dict[str, Any] | None) -> None:
        self.lost = (f"{self.store.url}: this writer lost its lock "
                     f"({self._rel(self.name)}) to {_who(info or {})}")

    def check(self) -> None:
        """Raise if another writer has taken the lock (this one was paused past its expiry)."""
        if self.lost:
            raise CacheLockedError(self.lost + "; stopping before committing anything more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if (self._read(self.name) or {}).get("owner") == self.owner:
                self.store.fs.rm_file(self.store.path(self._rel(self.name)))
        except Exception as e:  # noqa: BLE001 - it expires by itself
            self.say(f"could not delete the writer lock on {self.store.url} ({e}); it expires "
                     f"within {self.ttl:.0f} s")

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def conditional_writes(fs: Any) -> bool:
    """Whether ``fs`` makes a PUT conditional on an ETag (``If-Match``): s3fs does (AWS S3 and
    the S3-compatible stores that implement conditional writes)."""
    proto = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in proto


def _precondition_failed(e: BaseException) -> bool:
    """The store refused a conditional write: S3's 412 PreconditionFailed, or 409
    ConditionalRequestConflict while another conditional write to the key is in flight."""
    return _error_code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _unsupported(e: OSError) -> bool:
    """The store does not implement conditional writes (501 NotImplemented; s3fs: ENOSYS)."""
    return _error_code(e) == "NotImplemented" or e.errno == errno.ENOSYS


def _error_code(e: BaseException) -> str | None:
    """The S3 error code behind an s3fs OSError (botocore's ``response``), if any."""
    cause = e.__cause__ or e
    return (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")


def _alive(info: dict[str, Any]) -> bool:
    """Held: not expired, and not a dead process on this host."""
    if float(info.get("expires", 0)) <= time.time():
        return False
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def _who(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}"


def _when(info: dict[str, Any]) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(float(info.get("expires", 0))))
