"""The cache directory as a whole: start it, resume it, refuse a mismatched one, start over.

Resume rule: a rerun with the same fingerprints keeps every committed shard and discards partial
ones; any differing fingerprint is refused with the field named, unless ``--overwrite``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .manifest import (
    atomic_write_bytes,
    fingerprint_diff,
    hash_file,
    load_manifest,
    new_manifest,
    save_manifest,
)
from .spec import (
    CHECKSUM,
    COMMITS_DIR,
    HEAD_FILE,
    LOCKS_DIR,
    MANIFEST,
    SHARDS_DIR,
    TMP_DIR,
    CacheError,
    shard_name,
)
from .tokenizer import TOKENIZER_DIR

# Everything a cache dir may hold; anything else means the dir is not (only) a cache.
_OURS = {MANIFEST, HEAD_FILE, SHARDS_DIR, COMMITS_DIR, LOCKS_DIR, TMP_DIR, "config.yaml",
         "skipped_rows.jsonl", TOKENIZER_DIR}


class CacheMismatchError(CacheError):
    """An existing cache made from different inputs than this run."""


def resumable_manifest(cache_dir: str | Path, fingerprints: dict[str, Any],
                       overwrite: bool, shown: str | None = None) -> dict[str, Any] | None:
    """The existing manifest if this run may continue it; None if the cache must be started
    (the dir is empty or new, or ``overwrite`` cleared it). Raises on a mismatch. ``shown``: the
    cache as the user gave it, for messages (a store URL, whose local view ``cache_dir`` is)."""
    d = Path(cache_dir)
    if not d.exists():
        return None
    if not d.is_dir():
        raise CacheError(f"--out {d} is a file; give a directory for the cache")
    strangers = sorted(p.name for p in d.iterdir() if p.name not in _OURS and not p.name.startswith("."))
    if strangers:
        raise CacheError(f"--out {d} holds files that are not part of a dskd cache "
                         f"({', '.join(strangers[:5])}); give an empty or new directory")
    if overwrite:
        wipe(d)
        return None
    if not (d / MANIFEST).is_file():
        # Leftovers of a start that died before its manifest, so nothing was committed. The head
        # file stays: a concurrent worker may be writing it (it is replaced atomically anyway).
        for name in (COMMITS_DIR, SHARDS_DIR, TMP_DIR):
            shutil.rmtree(d / name, ignore_errors=True)
        return None
    m = load_manifest(d)
    diff = fingerprint_diff(m["fingerprints"], fingerprints)
    if diff:
        raise CacheMismatchError(
            f"{shown or d} holds a cache made with a different configuration; differing fingerprint "
            f"field(s): {'; '.join(diff)}. Rerun with --overwrite to start over, or choose "
            "another --out")
    return m


def wipe(cache_dir: Path) -> None:
    """Remove a cache's contents (locks stay: the running writer holds one). The manifest goes
    first, so a wipe cut short leaves no manifest, i.e. no cache."""
    for name in [MANIFEST] + sorted(_OURS - {MANIFEST, LOCKS_DIR}):
        p = cache_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def start_cache(cache_dir: str | Path, fingerprints: dict[str, Any], teacher: dict[str, Any],
                layout: dict[str, Any], head: dict[str, Any],
                tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the manifest header (after the head and tokenizer files): the cache now exists, with
    no shards."""
    m = new_manifest(fingerprints, teacher, layout, head, tokenizer)
    save_manifest(cache_dir, m)
    return m


def write_head(cache_dir: str | Path, tensors: dict[str, torch.Tensor],
               info: dict[str, Any]) -> dict[str, Any]:
    """head.safetensors (atomic) and its manifest entry. ``info`` (logit scale, tied embeddings)
    goes into the file's metadata as one JSON string: safetensors writes a multi-key metadata map
    in hash order, which would make the file's bytes differ from run to run."""
    from safetensors.torch import save

    path = Path(cache_dir) / HEAD_FILE
    meta = {"dskd": json.dumps(info, sort_keys=True)}
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)
    return {
        "file": HEAD_FILE,
        "bytes": len(data),
        CHECKSUM: hash_file(path),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
    }


def discard_uncommitted(cache_dir: str | Path, shard_indices: list[int],
                        committed: dict[int, Any]) -> list[str]:
    """Delete partial leftovers of *these* shards (another worker's in-flight shards are not ours
    to touch). Returns what was removed."""
    d = Path(cache_dir)
    removed = []
    for i in shard_indices:
        if i in committed:
            continue
        name = shard_name(i)
        for p in [d / SHARDS_DIR / name, *(d / TMP_DIR).glob(f"{name}.*")]:
            if p.exists():
                shutil.rmtree(p)
                removed.append(str(p.relative_to(d)))
    return removed
