"""manifest.json: the cache's index. Written atomically; a shard it does not list does not exist.

While a cache is being written, each committed shard also has a record in ``commits/`` (one small
JSON file per shard, written by the worker that wrote the shard, so ranks never contend for one
file). ``finalize`` folds those records into manifest.json and marks it complete. Its content is a
pure function of the cache's inputs (no timestamps, hosts or timings), so an interrupted and resumed
run ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import google_crc32c  # a zarr dependency (its shard-index checksum)
import numpy as np

from ..atomic import atomic_write_bytes
from .spec import (
    COMMITS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    READ_VERSIONS,
    CacheError,
    shard_name,
)


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def checksum_update(crc: int, data: Any) -> int:
    """Extend a running CRC-32C with a bytes-like object or a contiguous numpy array."""
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)
    elif not isinstance(data, bytes):
        data = np.frombuffer(data, dtype=np.uint8)
    return google_crc32c.extend(crc, data)


def checksum_hex(crc: int) -> str:
    return f"{crc:08x}"


def hash_file(path: Path) -> str:
    """The file's CHECKSUM (spec.CHECKSUM) as hex."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = checksum_update(crc, block)
    return checksum_hex(crc)


# --------------------------------------------------------------------------- manifest

def new_manifest(fingerprints: dict[str, Any], teacher: dict[str, Any], layout: dict[str, Any],
                 head: dict[str, Any], tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The header written when a cache is started; shards and totals come at finalize."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "fingerprints": fingerprints,
        "teacher": teacher,
        "layout": layout,
        "head": head,
        **({"tokenizer": tokenizer} if tokenizer else {}),
        "shards": [],
        "totals": None,
    }


def load_manifest(cache_dir: str | Path) -> dict[str, Any]:
    """The manifest of the cache at ``cache_dir`` (a dir, or a store URL: pulled into its view)."""
    from .remote import open_cache_location, store_of  # remote builds on this module

    path = open_cache_location(cache_dir) / MANIFEST
    store = store_of(path.parent)  # a store's view: messages name the URL, not the view
    shown = f"{store.url}/{MANIFEST}" if store else str(path)
    cache_dir = store.url if store else cache_dir
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no {MANIFEST}; this is not a dskd teacher cache "
                         "(or its first shard was never started, or a cache-teacher --overwrite was cut short). "
                         "Run `dskd cache-teacher` on it.")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{shown}: damaged, not valid JSON ({e}); rebuild with cache-teacher "
                         "--overwrite (the shards cannot be trusted without it)") from None
    if not isinstance(m, dict):
        raise CacheError(f"{shown}: damaged (not a JSON object); rebuild with cache-teacher --overwrite")
    stored = m.pop(SELF_CHECKSUM, None)
    if stored is not None and stored != _manifest_checksum(m):
        raise CacheError(f"{shown}: damaged (its checksum does not match its content: a changed "
                         "byte); rebuild with cache-teacher --overwrite")
    if m.get("format") != FORMAT_NAME:
        raise CacheError(f"{shown}: format {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("format_version") not in READ_VERSIONS:
        raise CacheError(f"{shown}: format version {m.get('format_version')!r}; this dskd reads "
                         f"versions {', '.join(map(str, READ_VERSIONS))}. Read it with the dskd "
                         "version that wrote it, or rebuild the cache with this one.")
    return m


SELF_CHECKSUM = "manifest_crc32c"


def _manifest_checksum(m: dict[str, Any]) -> str:
    """Checksum of the manifest's own content, so a flipped byte that still parses is caught."""
    return checksum_hex(checksum_update(0, dump_json({k: v for k, v in m.items() if k != SELF_CHECKSUM})))


def save_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    body = {k: v for k, v in manifest.items() if k != SELF_CHECKSUM}
    atomic_write_bytes(Path(cache_dir) / MANIFEST, dump_json({**body, SELF_CHECKSUM: _manifest_checksum(body)}))


def fingerprint_diff(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, one per differing fingerprint field, in field order."""
    out = []
    for key in list(cached) + [k for k in current if k not in cached]:
        a, b = cached.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: cache has {_short(a)}, this run has {_short(b)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# --------------------------------------------------------------------------- commit records

def commit_path(cache_dir: str | Path, index: int) -> Path:
    return Path(cache_dir) / COMMITS_DIR / f"{shard_name(index)}.json"


def write_commit(cache_dir: str | Path, record: dict[str, Any]) -> None:
    """The last step of writing a shard: from now on the shard exists."""
    atomic_write_bytes(commit_path(cache_dir, record["index"]), dump_json(record))


def load_commits(cache_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Committed shard records by shard index (a torn record cannot exist: they are renamed in)."""
    d = Path(cache_dir) / COMMITS_DIR
    out: dict[int, dict[str, Any]] = {}
    if d.is_dir():
        for p in sorted(d.glob("shard-*.json")):
            rec = json.loads(p.read_text(encoding="utf-8"))
            out[int(rec["index"])] = rec
    return out


def committed_shards(cache_dir: str | Path, manifest: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Every committed shard: the manifest's list once complete, else the commit records."""
    if manifest.get("complete"):
        return {int(s["index"]): s for s in manifest["shards"]}
    return load_commits(cache_dir)


def finalize(cache_dir: str | Path) -> dict[str, Any] | None:
    """Fold commit records into manifest.json if every planned shard is committed.

    Returns the complete manifest, or None while shards are missing (another worker is still
    writing). Safe to call from several workers at once: they write identical bytes.
    """
    m = load_manifest(cache_dir)
    if m["complete"]:
        return m
    commits = load_commits(cache_dir)
    n_shards = m["layout"]["n_shards"]
    if any(i not in commits for i in range(n_shards)):
        return None
    shards = [commits[i] for i in range(n_shards)]
    m["shards"] = shards
    m["totals"] = shard_totals(shards)
    m["complete"] = True
    save_manifest(cache_dir, m)
    return m


def shard_totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
    n_ex = sum(s["n_examples"] for s in shards)
    n_tok = sum(s["n_tokens"] for s in shards)
    n_rows = sum(s["n_rows"] for s in shards)
    fields: dict[str, int] = {}
    for s in shards:
        for k, v in s["field_bytes"].items():
            fields[k] = fields.get(k, 0) + v
    total = sum(s["bytes"] for s in shards)
    return {
        "n_examples": n_ex,
        "n_tokens": n_tok,
        "n_rows": n_rows,
        "bytes": total,
        "field_bytes": fields,
        # per teacher token row (the unit a student trains on); examples.arrow per token too
        "bytes_per_token": {k: round(v / max(1, n_rows), 3) for k, v in fields.items()}
        | {"total": round(total / max(1, n_rows), 3)},
    }
