"""Caches in object storage (``s3://``, ``gs://``, any fsspec URL), through fsspec.

A cache at a URL holds the same objects, with the same bytes, as a cache directory. Its small
objects (manifest, commit records, head, tokenizer, config) are mirrored into a local *view*
directory, so every part of dskd that reads a cache directory reads them unchanged; a marker file
in the view names the URL. Shard data is never mirrored: readers stream it (reader.py,
``RemoteRows``), and writers stage one shard on local disk (it is buffered in memory anyway) and
upload it (``Store.publish_shard``).

Commit protocol on a store without rename (docs/cache-format.md): a shard's objects are uploaded
first, then its commit record (one PUT: atomic), and the manifest, written last, lists every
shard with its checksums. An object under ``shards/`` that no commit record names does not
exist: resume overwrites it. ``file://`` URLs are plain local paths (the rename-based code path).

Credentials are the storage library's business (AWS_* variables, profiles, ``FSSPEC_S3_*``
storage options); nothing here reads, prints or records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write_bytes
from ..failpoints import failpoint
from .manifest import checksum_hex, checksum_update, dump_json, hash_file
from .spec import (
    CHECKSUM,
    COMMITS_DIR,
    HEAD_FILE,
    LOCKS_DIR,
    MANIFEST,
    SHARDS_DIR,
    TMP_DIR,
    CacheError,
)

MARKER = ".dskd-store.json"  # in a view dir: the URL it mirrors (no credentials)
VIEW_ENV = "DSKD_STORE_CACHE"  # where view dirs live [default: ~/.cache/dskd/store]
# Small objects mirrored into the view, besides manifest.json and commits/.
_SMALL = (HEAD_FILE, "tokenizer", "config.yaml", "skipped_rows.jsonl")
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "abfss": "adlfs"}


def is_url(location: str | os.PathLike) -> bool:
    """True for a store URL (``file://`` is a local path, not a store)."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """A local cache location (plain path or ``file://`` URL) as a Path."""
    s = str(location)
    return Path(s.removeprefix("file://")) if s.startswith("file://") else Path(s)


def open_cache_location(location: str | os.PathLike) -> Path:
    """The directory to read a cache at ``location`` from: the path itself, or for a URL the
    freshly pulled view of its small objects (readers then stream shards from the store)."""
    if not is_url(location):
        return local_path(location)
    store = Store(str(location))
    store.pull()
    return store.view


def store_of(cache_dir: str | Path) -> Store | None:
    """The store a view dir mirrors; None for a plain local cache."""
    marker = Path(cache_dir) / MARKER
    if not marker.is_file():
        return None
    return Store(json.loads(marker.read_text(encoding="utf-8"))["url"], view=Path(cache_dir))


def check_url(url: str) -> str | None:
    """A problem with a store URL, or None (checked before any compute)."""
    proto, _, rest = url.partition("://")
    if not rest.strip("/"):
        return f"{url}: no bucket or path after {proto}://"
    if "@" in rest.split("/", 1)[0]:
        return (f"{url}: credentials do not belong in the URL (they would be recorded in "
                "config.yaml); set them in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)")
    return None


@contextlib.contextmanager
def store_errors(url: str, doing: str) -> Iterator[None]:
    """Storage-library errors → one CacheError naming the URL and what to do."""
    try:
        yield
    except CacheError:
        raise
    except ImportError as e:
        proto = url.partition("://")[0]
        pkg = _PACKAGES.get(proto, f"the fsspec backend for {proto}://")
        raise CacheError(f"{url}: {doing} needs {pkg}, which is not installed; "
                         f"`pip install 'dskd[s3]'` or `pip install {pkg}` ({e})") from None
    except PermissionError as e:
        raise CacheError(f"{url}: {doing}: access denied ({e}); check that the credentials in "
                         "the environment may read and write this bucket") from None
    except FileNotFoundError as e:
        if e.filename and os.path.isabs(str(e.filename)):  # a local file of the view, not the store
            raise CacheError(f"{url}: {doing}: the local file {e.filename} is gone (did another "
                             "process remove it from this store's local view?); rerun the same "
                             "command") from None
        raise CacheError(f"{url}: {doing}: not found ({e}); check the bucket name, or create "
                         "the bucket first") from None
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp/gcsfs each raise their own types
        name = type(e).__name__
        if "Credential" in name or "credentials" in str(e).lower():
            raise CacheError(f"{url}: {doing}: no usable credentials ({name}); set "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE (S3), "
                             "GOOGLE_APPLICATION_CREDENTIALS (GCS), or fsspec storage options "
                             "(FSSPEC_S3_KEY, ...)") from None
        if "Connect" in name or "Endpoint" in name:
            raise CacheError(f"{url}: {doing}: cannot reach the store ({name}: {e}); check "
                             "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network") from None
        raise CacheError(f"{url}: {doing} failed ({name}: {e})") from None


def _known_checksums(manifest: bytes | None) -> dict[str, str]:
    """Relative path → checksum of the head and tokenizer files, as the manifest records them."""
    try:
        m = json.loads(manifest) if manifest else {}
        out = {HEAD_FILE: m["head"][CHECKSUM]} if CHECKSUM in (m.get("head") or {}) else {}
        tok = m.get("tokenizer") or {}
        out |= {f"{tok['dir']}/{n}": i[CHECKSUM] for n, i in (tok.get("files") or {}).items()}
        return out
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # damaged: load_manifest says so, naming the file


def _is_complete(manifest: bytes | None) -> bool:
    try:
        return bool(manifest) and json.loads(manifest).get("complete") is True
    except (ValueError, AttributeError):
        return False  # damaged: load_manifest says so, naming the file


def view_root() -> Path:
    return Path(os.environ.get(VIEW_ENV) or Path.home() / ".cache" / "dskd" / "store")


class Store:
    """A cache at a URL: its filesystem, its root path there, and its local view dir."""

    def __init__(self, url: str, view: Path | None = None, writer: str = ""):
        """``writer``: one writer's own view (e.g. ``"w1-of-2"``), so that several writers of one
        store on one host never share the dir they stage shards and commit records in; readers
        and a single writer share the plain view. A writer's own view is scratch: it mirrors
        only the manifest and commit records (not the head or tokenizer, which writers take from
        the teacher), and the stage deletes it when done."""
        if problem := check_url(url):
            raise CacheError(problem)
        self.url = url.rstrip("/")
        with store_errors(self.url, "opening the store"):
            import fsspec

            # no listings cache: the store moves on under us (other writers, a wipe, a repair),
            # and a stale listing once hid a deleted object; every listing asks the store
            self.fs, self.root = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        self.root = self.root.rstrip("/")
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16] + (f"-{writer}" if writer else "")
        self.view = view or view_root() / key
        self.writer = writer

    def path(self, *rel: str) -> str:
        return "/".join((self.root, *rel))

    def __str__(self) -> str:
        return self.url

    # ----------------------------------------------------------------- small objects

    def pull(self, for_write: bool = False) -> None:
        """Mirror the store's manifest and commit records into the view (replacing what the view
        had: the store is the truth), and the head/tokenizer/config when new or changed."""
        from .store import _OURS

        with store_errors(self.url, "reading the cache"):
            top = self._listing(self.root)  # raises first if the credentials are missing
            bucket = self.root.split("/", 1)[0]
            if not top and not self.fs.exists(bucket):
                raise CacheError(f"{self.url}: bucket {bucket!r} does not exist (or these "
                                 "credentials cannot see it); create it first, e.g. "
                                 f"`aws s3 mb {self.url.split('://')[0]}://{bucket}`")
            strangers = sorted(n for n in top if n not in _OURS and not n.startswith("."))
            if strangers and for_write:
                raise CacheError(f"--out {self.url} holds objects that are not part of a dskd "
                                 f"cache ({', '.join(strangers[:5])}); give an empty or new prefix")
            self.view.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.view / MARKER, json.dumps({"url": self.url}).encode())
            manifest = self.fs.cat_file(self.path(MANIFEST)) if MANIFEST in top else None
            # commit records matter only until the manifest is complete (it then lists them all)
            complete = _is_complete(manifest)
            commits = (self._listing(self.path(COMMITS_DIR))
                       if COMMITS_DIR in top and not complete else {})
            local = self.view / COMMITS_DIR
            for p in local.glob("*.json") if local.is_dir() and not complete else ():
                if p.name not in commits:
                    p.unlink()
            names = [n for n in sorted(commits) if n.endswith(".json")]
            blobs = self.fs.cat([self.path(COMMITS_DIR, n) for n in names]) if names else {}
            for n in names:
                atomic_write_bytes(local / n, blobs[self.path(COMMITS_DIR, n)])
            known = _known_checksums(manifest)
            for name in _SMALL if not self.writer else ():
                if name in top:
                    self._mirror(name, known)
            # the manifest last: a view never lists a shard whose record it lacks
            if manifest is not None:
                atomic_write_bytes(self.view / MANIFEST, manifest)
            else:
                (self.view / MANIFEST).unlink(missing_ok=True)

    def _listing(self, path: str) -> dict[str, int]:
        """Names directly under ``path`` → size (0 for a 'directory'); {} if there are none."""
        try:
            entries = self.fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}

    def _mirror(self, rel: str, known: dict[str, str]) -> None:
        """Copy one small object (or every object under a small prefix) into the view, unless
        the view's copy has the same size and the checksum the manifest records for it."""
        src = self.path(rel)
        files = ({src: self.fs.info(src)["size"]} if self.fs.isfile(src)
                 else {f: i["size"] for f, i in self.fs.find(src, detail=True).items()})
        for f, size in files.items():
            name = f[len(self.root) + 1:]
            dest = self.view / name
            if (dest.is_file() and dest.stat().st_size == size
                    and (name not in known or hash_file(dest) == known[name])):
                continue
            atomic_write_bytes(dest, self.fs.cat_file(f))

    def push(self, *rels: str) -> None:
        """Upload files (or whole dirs) of the view, in this order, one PUT per file."""
        with store_errors(self.url, "writing the cache"):
            for rel in rels:
                p = self.view / rel
                files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
                for f in files:
                    self.fs.put_file(str(f), self.path(f.relative_to(self.view).as_posix()))

    def remove(self, *rels: str) -> None:
        with store_errors(self.url, "deleting objects"):
            for rel in rels:
                if self.fs.exists(self.path(rel)):
                    self.fs.rm(self.path(rel), recursive=True)

    def publish_shard(self, record: dict[str, Any]) -> None:
        """Upload a shard the writer committed in the view: leftovers of an uncommitted attempt
        first removed, the shard's objects, then its commit record (from then on it exists). The
        view's copy of the shard is then deleted: shards live in the store only."""
        name = record["name"]
        with store_errors(self.url, f"uploading shard {name}"):
            prefix = self.path(SHARDS_DIR, name)
            if self.fs.exists(prefix):
                self.fs.rm(prefix, recursive=True)
            local = self.view / SHARDS_DIR / name
            for rel in record["files"]:
                self.fs.put_file(str(local / rel), f"{prefix}/{rel}")
            failpoint("shard.uploaded")  # objects in the store, commit record not yet
            # the record's bytes as the writer wrote them into the view (from memory: a pull
            # drops view records the store does not have yet)
            self.fs.pipe_file(self.path(COMMITS_DIR, f"{name}.json"), dump_json(record))
        shutil.rmtree(local, ignore_errors=True)

    def wipe(self) -> None:
        """Delete the cache's objects (not the locks), the manifest first: a wipe cut short
        leaves no cache. The view is cleared too."""
        with store_errors(self.url, "deleting the cache (--overwrite)"):
            if self.fs.exists(self.path(MANIFEST)):
                self.fs.rm_file(self.path(MANIFEST))
            failpoint("store.wipe.manifest_deleted")  # no cache any more; its objects remain
            for name in self._listing(self.root):
                if name not in (LOCKS_DIR,) and not name.startswith("."):
                    self.fs.rm(self.path(name), recursive=True)
        for name in (MANIFEST, COMMITS_DIR, SHARDS_DIR, TMP_DIR, *_SMALL):
            p = self.view / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ----------------------------------------------------------------- shard data

    def shard_files(self, name: str) -> dict[str, int]:
        """Every object under a shard's prefix (relative path → bytes)."""
        prefix = self.path(SHARDS_DIR, name)
        with store_errors(self.url, f"listing shard {name}"):
            try:
                found = self.fs.find(prefix, detail=True)
            except FileNotFoundError:
                return {}
        return {k[len(prefix) + 1:]: int(v["size"]) for k, v in found.items()}

    def get_shard(self, name: str, dest: Path) -> None:
        """Download every object of a shard into ``dest`` (verify reads them all anyway)."""
        dest.mkdir(parents=True, exist_ok=True)
        with store_errors(self.url, f"downloading shard {name}"):
            for rel in self.shard_files(name):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self.path(SHARDS_DIR, name, rel), str(dest / rel))

    def cat(self, rel: str) -> bytes:
        with store_errors(self.url, f"reading {rel}"):
            return self.fs.cat_file(self.path(rel))

    def cat_many(self, rels: list[str]) -> list[bytes]:
        """Whole objects, requested concurrently (one round trip for all, on an async backend
        such as s3fs/gcsfs), in the order asked."""
        if not rels:
            return []
        paths = [self.path(r) for r in rels]
        with store_errors(self.url, f"reading {rels[0]} and {len(rels) - 1} more"):
            got = self.fs.cat(paths, on_error="raise")
        return [got[p] for p in paths]

    def cat_ranges(self, rels: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges [start, end) of objects, requested concurrently, in the order asked."""
        if not rels:
            return []
        with store_errors(self.url, f"reading {rels[0]} and {len(rels) - 1} more"):
            return list(self.fs.cat_ranges([self.path(r) for r in rels], starts, ends,
                                           on_error="raise"))

    def checksum(self, rel: str, block: int = 16 << 20) -> str:
        """CRC-32C of one object, streamed in ``block``-byte reads."""
        crc = 0
        with store_errors(self.url, f"reading {rel}"), self.fs.open(self.path(rel), "rb",
                                                                    block_size=block) as f:
            while data := f.read(block):
                crc = checksum_update(crc, data)
        return checksum_hex(crc)

    def zarr_store(self, rel: str) -> Any:
        """A read-only zarr store on a prefix (zarr's own fsspec support; it makes its own
        asynchronous filesystem from the URL, with the same environment credentials)."""
        from zarr.storage import FsspecStore

        with store_errors(self.url, f"opening {rel}"):
            return FsspecStore.from_url(f"{self.url}/{rel}", read_only=True)


# --------------------------------------------------------------------------- streamed rows

_POOL: tuple[int, ThreadPoolExecutor] | None = None
READ_AHEAD = int(os.environ.get("DSKD_READ_AHEAD", "2"))  # inner chunks fetched ahead per array


def _pool() -> ThreadPoolExecutor:
    """One fetch pool per process (a forked DataLoader worker makes its own)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(8, thread_name_prefix="dskd-fetch"))
    return _POOL[1]


class RemoteRows:
    """The rows of one remote Zarr shard file in the writer's layout (rows in order, one inner
    chunk of ``chunk`` rows after another): a slice fetches the inner chunks it touches, one
    ranged GET each, and starts fetching the next ``READ_AHEAD`` chunks in the background, so a
    reader walking a shard finds the next block already in memory."""

    def __init__(self, store: Store, rel: str, dtype: np.dtype, shape: tuple[int, ...],
                 chunk: int):
        self.store, self.rel, self.dtype, self.shape, self.chunk = store, rel, dtype, shape, chunk
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self.n_chunks = -(-shape[0] // chunk)
        self._fetching: dict[int, Future] = {}
        self._lock = threading.Lock()

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        a, b, step = key.indices(self.shape[0])
        if step != 1:
            raise IndexError("RemoteRows takes contiguous row slices")
        if b <= a:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        c0, c1 = a // self.chunk, (b - 1) // self.chunk
        for c in range(c1 + 1, min(self.n_chunks, c1 + 1 + READ_AHEAD)):
            self._start(c)
        parts = [self._start(c).result() for c in range(c0, c1 + 1)]
        with self._lock:  # keep only the chunks ahead: memory stays at READ_AHEAD chunks
            for k in [k for k in self._fetching if not c1 < k <= c1 + READ_AHEAD]:
                del self._fetching[k]
        rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return rows[a - c0 * self.chunk:b - c0 * self.chunk]

    def _start(self, c: int) -> Future:
        with self._lock:
            fut = self._fetching.get(c)
            if fut is None:
                fut = self._fetching[c] = _pool().submit(self._fetch, c)
            return fut

    def _fetch(self, c: int) -> np.ndarray:
        start = c * self.chunk * self.row_bytes
        n = min(self.chunk, self.shape[0] - c * self.chunk)
        with store_errors(self.store.url, f"reading {self.rel}"):
            data = self.store.fs.cat_file(self.store.path(self.rel), start=start,
                                          end=start + n * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(n, *self.shape[1:])
