"""Shard writer: buffer one shard in memory, write it once under a temp name, rename, commit.

One shard is written by exactly one writer, whole: Zarr sharded arrays lose data when two writers
share a shard, and many small appends are ~100x slower than one write. Teachers hand the writer
finished rows (``ExampleRows``); the writer knows nothing of models.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c  # a zarr dependency (its shard-index checksum)
import numpy as np
import pyarrow as pa
import zarr
from zarr.storage import LocalStore

from ..failpoints import failpoint
from .manifest import checksum_hex, checksum_update, hash_file, write_commit
from .sampled import encode as encode_sampled
from .spec import (
    CHECKSUM,
    EXAMPLES_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    SHARDS_DIR,
    TMP_DIR,
    TOKEN_OFFSETS,
    TOKEN_OFFSETS_DTYPE,
    V1_TOPK,
    CacheError,
    TopkStorage,
    chunk_rows,
    input_fields,
    sampled_dtypes,
    shard_name,
    token_fields,
)
from .topk import encode_topk


@dataclass
class ExampleRows:
    """Everything the cache keeps for one example. ``tokens`` maps each per-token field name
    (spec.token_fields with the default top-k storage) to an array of n - 1 rows: hidden states
    already encoded (on the teacher's device), top-k as int32 ids and float32 log-probs (the
    writer encodes them per the cache's top-k storage), sampled targets as padded (n - 1, N)
    int32 ids and counts (spec.input_fields)."""

    example_id: str
    index: int  # position in the dataset; fixes the shard and the row
    prompt: str
    response: str
    input_ids: Sequence[int]  # (n,)
    prompt_len: int
    offsets: Sequence[tuple[int, int]]  # (n, 2)
    tokens: dict[str, np.ndarray]


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of one cache shares (from the manifest's ``layout``)."""

    hidden_dtype: str
    top_k: int
    hidden_size: int
    topk: TopkStorage = V1_TOPK
    sampled: int = 0  # draws per row of sampled targets (0: none)
    vocab_size: int = 0  # V (sets the sampled ids' dtype)

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> ShardLayout:
        lay = m["layout"]
        return cls(lay["hidden_dtype"], lay["top_k"], lay["hidden_size"],
                   TopkStorage.from_layout(lay), int(lay.get("sampled_targets", 0)),
                   int(lay["vocab_size"]))


class ShardWriter:
    """Collects the examples of one shard (any order), then ``commit()`` writes and records it."""

    def __init__(self, cache_dir: str | Path, index: int, example_range: tuple[int, int],
                 layout: ShardLayout, fsync: bool = True):
        self.cache_dir = Path(cache_dir)
        self.index = index
        self.start, self.end = example_range
        self.layout = layout
        self.fsync = fsync
        self.inputs = input_fields(layout.hidden_dtype, layout.top_k, layout.sampled)
        self.fields = token_fields(layout.hidden_dtype, layout.top_k, layout.topk,  # stored
                                   layout.sampled, layout.vocab_size)
        self._rows: dict[int, ExampleRows] = {}

    def add(self, ex: ExampleRows) -> None:
        if not self.start <= ex.index < self.end:
            raise CacheError(f"{shard_name(self.index)}: example index {ex.index} is outside "
                             f"this shard's range [{self.start}, {self.end})")
        n_rows = len(ex.input_ids) - 1
        for f in self.inputs:
            arr = ex.tokens.get(f.name)
            if arr is None:
                raise CacheError(f"{shard_name(self.index)}: example {ex.example_id} lacks {f.name!r}")
            want = f.shape(n_rows, self.layout.hidden_size, self.layout.top_k)
            if arr.shape != want or arr.dtype != f.dtype:
                raise CacheError(f"{shard_name(self.index)}: example {ex.example_id} field {f.name!r} "
                                 f"is {arr.dtype}{arr.shape}, expected {f.dtype}{want}")
        tok = dict(ex.tokens)  # compact fields are encoded now, so the buffered shard stays small
        if self.layout.top_k and self.layout.topk != V1_TOPK:
            tok.update(encode_topk(tok.pop("topk_ids"), tok.pop("topk_logprobs"), self.layout.topk))
        if self.layout.sampled:
            counts = tok["sampled_counts"]
            if (counts < 0).any() or (counts.sum(1) != self.layout.sampled).any():
                raise CacheError(f"{shard_name(self.index)}: example {ex.example_id}: sampled "
                                 f"counts must be ≥ 0 and sum to {self.layout.sampled} per row")
            tok.update(encode_sampled(tok.pop("sampled_ids"), tok.pop("sampled_counts"),
                                      *sampled_dtypes(self.layout.sampled, self.layout.vocab_size)))
        ex = dataclasses.replace(ex, tokens=tok)
        self._rows[ex.index] = ex

    @property
    def complete(self) -> bool:
        return len(self._rows) == self.end - self.start

    def commit(self) -> dict[str, Any]:
        """Write the shard to a temp dir, rename it into ``shards/``, then write its commit record.

        A crash at any point leaves either no shard or an uncommitted one, which resume discards.
        """
        if not self.complete:
            missing = [i for i in range(self.start, self.end) if i not in self._rows][:5]
            raise CacheError(f"{shard_name(self.index)}: cannot commit, examples {missing} "
                             "were never added")
        name = shard_name(self.index)
        rows = [self._rows[i] for i in range(self.start, self.end)]
        tmp = self.cache_dir / TMP_DIR / f"{name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files: dict[str, dict[str, Any]] = {}  # relative path -> bytes, checksum
        field_bytes = self._write_tokens(tmp, rows, files)
        failpoint("shard.mid_write")  # token arrays written, examples table not yet
        field_bytes["examples"] = _write_file(tmp, EXAMPLES_FILE, [_arrow_file(rows)], files)
        for p in sorted(q for q in tmp.rglob("*") if q.is_file()):  # the small zarr.json files
            rel = p.relative_to(tmp).as_posix()
            if rel not in files:
                files[rel] = {"bytes": p.stat().st_size, CHECKSUM: hash_file(p)}
        files = dict(sorted(files.items()))
        if self.fsync:  # durable before the commit record says the shard exists
            _fsync_all([tmp / rel for rel in files])
        final = self.cache_dir / SHARDS_DIR / name
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)  # an uncommitted leftover of a crashed run
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(final.parent)
        failpoint("shard.renamed")  # shard in place, commit record not yet written
        n_tokens = sum(len(r.input_ids) for r in rows)
        record = {
            "index": self.index,
            "name": name,
            "example_start": self.start,
            "example_end": self.end,
            "n_examples": len(rows),
            "n_tokens": n_tokens,
            "n_rows": n_tokens - len(rows),
            "bytes": sum(f["bytes"] for f in files.values()),
            "field_bytes": field_bytes,
            "files": files,
        }
        write_commit(self.cache_dir, record)
        self._rows.clear()
        return record

    def _write_tokens(self, out: Path, rows: list[ExampleRows],
                      files: dict[str, dict[str, Any]]) -> dict[str, int]:
        """One Zarr v3 group; each array is a single Zarr shard (one file) of inner chunks."""
        counts = np.array([len(r.input_ids) - 1 for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=TOKEN_OFFSETS_DTYPE)
        np.cumsum(counts, out=offsets[1:])
        group = zarr.open_group(LocalStore(out), mode="w", zarr_format=3, attributes={
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "shard": self.index,
            "example_start": self.start, "example_end": self.end,
            "hidden_dtype": self.layout.hidden_dtype, "top_k": self.layout.top_k,
        })
        sizes = {TOKEN_OFFSETS: _write_array(group, out, TOKEN_OFFSETS, [offsets], offsets.shape,
                                             TOKEN_OFFSETS_DTYPE, {}, files)}
        n_rows = int(offsets[-1])
        for f in self.fields:
            n = sum(len(r.tokens[f.name]) for r in rows) if f.ragged else n_rows
            shape = f.shape(n, self.layout.hidden_size, self.layout.top_k)
            attrs = {"storage": self.layout.hidden_dtype} if f.name == "hidden" else {}
            sizes[f.name] = _write_array(group, out, f.name, [r.tokens[f.name] for r in rows],
                                         shape, f.dtype, attrs, files)
        return sizes


def examples_table(rows: list[ExampleRows]) -> pa.Table:
    ids = [np.asarray(r.input_ids, dtype=np.int32) for r in rows]
    n = [len(x) for x in ids]
    return pa.table({
        "example_id": pa.array([r.example_id for r in rows], pa.string()),
        "index": pa.array([r.index for r in rows], pa.int64()),
        "prompt": pa.array([r.prompt for r in rows], pa.string()),
        "response": pa.array([r.response for r in rows], pa.string()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "prompt_len": pa.array([r.prompt_len for r in rows], pa.int32()),
        "response_mask": pa.array([np.arange(k) >= r.prompt_len for k, r in zip(n, rows)],
                                  pa.list_(pa.bool_())),
        "offsets": pa.array([np.asarray(r.offsets, dtype=np.int32).reshape(-1) for r in rows],
                            pa.list_(pa.int32())),
        "n_tokens": pa.array(n, pa.int32()),
    })


def _write_array(group: zarr.Group, out: Path, name: str, parts: list[np.ndarray],
                 shape: tuple[int, ...], dtype: np.dtype, attrs: dict[str, Any],
                 files: dict[str, dict[str, Any]]) -> int:
    """A Zarr array stored as one Zarr shard: every row in one file of inner chunks, indexed at
    its end. Zarr writes the metadata; the shard file is written here, straight from the
    per-example arrays, because that is one sequential write (and a checksum computed on the way)
    instead of zarr-python's concatenate, copy, write and re-read. The bytes are exactly the ones
    zarr-python writes (tests/pipeline/cache/test_writer_reader.py compares them)."""
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    rows = chunk_rows(row_bytes, shape[0])
    n_chunks = max(1, -(-shape[0] // rows))
    group.create_array(name, shape=shape, dtype=dtype, chunks=(rows,) + shape[1:],
                       shards=(n_chunks * rows,) + shape[1:], compressors=None, fill_value=0,
                       attributes=attrs)
    size = (out / name / "zarr.json").stat().st_size
    if shape[0]:  # an empty array has no shard file; readers see the fill value
        key = "c/" + "/".join("0" * len(shape))
        parts = [np.ascontiguousarray(p, dtype=dtype) for p in parts]
        size += _write_file(out, f"{name}/{key}", parts + [_shard_tail(n_chunks, rows, row_bytes,
                                                                        shape[0])], files)
    return size


def _shard_tail(n_chunks: int, rows: int, row_bytes: int, n_rows: int) -> bytes:
    """What follows the data in a Zarr v3 ``sharding_indexed`` file with a plain ``bytes`` codec:
    zero padding of the last inner chunk to full size, then the index (offset, length) as
    little-endian uint64 per inner chunk, then the index's crc32c (little-endian uint32)."""
    chunk_bytes = rows * row_bytes
    index = np.empty((n_chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(n_chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    ib = index.tobytes()
    pad = n_chunks * chunk_bytes - n_rows * row_bytes
    return b"\0" * pad + ib + np.uint32(google_crc32c.value(ib)).astype("<u4").tobytes()


def _arrow_file(rows: list[ExampleRows]) -> memoryview:
    # IPC *file* format, uncompressed: readers memory-map it and slice without copying.
    table = examples_table(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return memoryview(sink.getvalue())


def _write_file(root: Path, rel: str, parts: list[Any], files: dict[str, dict[str, Any]]) -> int:
    """Write ``parts`` one after another, checksumming them on the way; record the file."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    crc, size = 0, 0
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
            crc = checksum_update(crc, part)
            size += memoryview(part).nbytes
    files[rel] = {"bytes": size, CHECKSUM: checksum_hex(crc)}
    return size


def _fsync_all(paths: list[Path]) -> None:
    """fsync many files at once: concurrent fsyncs share journal commits, so 20 files cost about
    what one does (sequentially they cost ~5 ms each on ext4)."""
    with ThreadPoolExecutor(min(16, max(1, len(paths)))) as pool:
        list(pool.map(_fsync, paths))


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(d: Path) -> None:
    try:
        _fsync(d)
    except OSError:  # some filesystems refuse fsync on directories; the data files are synced
        pass
