"""Cache reader for stage 2: iterate examples (all, or some shards for a rank/worker), look one up
by id, resume from a (shard, row) position. Per-example text and ids are zero-copy views of the
memory-mapped Arrow file; per-token arrays are memory-mapped Zarr shard files (read through zarr
when a layout does not allow it), sliced a block of examples at a time.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zarr

from .manifest import committed_shards, hash_file, load_manifest
from .quant import decode_hidden
from .remote import RemoteRows, Store, open_cache_location, store_of
from .sampled import decode as decode_sampled
from .spec import (
    CHECKSUM,
    EMBED_WEIGHT,
    EXAMPLES_FILE,
    HEAD_FILE,
    HEAD_WEIGHT,
    SHARDS_DIR,
    TOKEN_OFFSETS,
    CacheError,
    TopkStorage,
    chunk_rows,
    layout_fields,
)
from .topk import decode_ids, decode_logprobs

# Per-token fields a reader can ask for; each brings the arrays it is decoded from along
# (hidden: its fp8 scale; top-k: the high id bits, the q8 bounds).
READABLE = ("hidden", "topk_ids", "topk_logprobs", "lse", "tail_logprob", "next_logprob",
            "sampled_ids", "sampled_counts")


@dataclass
class CachedExample:
    """One cached example. Per-token arrays have n - 1 rows; row k predicts input_ids[k + 1].
    A field not requested from the reader is None. Arrays other than ``hidden`` and a compact
    top-k (decoded to fresh arrays) are read-only views of memory-mapped files: copy before writing."""

    example_id: str
    index: int  # position in the dataset
    prompt: str
    response: str
    input_ids: np.ndarray  # (n,) int32
    prompt_len: int
    response_mask: np.ndarray  # (n,) bool, per token of input_ids
    offsets: np.ndarray  # (n, 2) int32 char spans in prompt + response
    shard: int  # (shard, row) is this example's position, for checkpointing a trainer
    row: int
    hidden: np.ndarray | None = None  # (n-1, D_t) float32, dequantized
    topk_ids: np.ndarray | None = None  # (n-1, k) int32, decoded
    topk_logprobs: np.ndarray | None = None  # (n-1, k) float32, decoded
    lse: np.ndarray | None = None  # (n-1,) float32
    tail_logprob: np.ndarray | None = None  # (n-1,) float32
    next_logprob: np.ndarray | None = None  # (n-1,) float32
    sampled_ids: np.ndarray | None = None  # (n-1, W) int32 distinct sampled ids, decoded
    sampled_counts: np.ndarray | None = None  # (n-1, W) int32 their counts (0: padding)

    @property
    def label_mask(self) -> np.ndarray:
        """(n-1,) bool: row k is supervised (its target s[k+1] is a response token)."""
        return self.response_mask[1:]


def open_array(path: Path, use_mmap: bool = True) -> np.ndarray | zarr.Array:
    """A shard's Zarr array, memory-mapped when its layout allows (the writer's layout always
    does: one Zarr shard of uncompressed full-width inner chunks stored in order, so the file
    starts with the rows in row-major order), else opened through zarr. Either way, slicing gives
    numpy rows; the mmap path copies nothing until you do."""
    meta = json.loads((path / "zarr.json").read_text())
    plain = _plain_layout(meta)
    if use_mmap and plain is not None:
        f = path / "c" / "/".join("0" * len(plain[1]))
        if plain[1][0] == 0:
            return np.zeros(plain[1], plain[0])
        if _index_is_plain(f.stat().st_size, *plain, lambda start, end: _read_range(f, start, end)):
            return np.memmap(f, dtype=plain[0], mode="r", shape=plain[1])
    return zarr.open_array(str(path), mode="r", zarr_format=3)


def open_remote_shard(store: Store, rel: str, names: Sequence[str], files: dict[str, Any],
                      whole: Collection[str] = ()) -> tuple[bytes, dict[str, Any]]:
    """(examples.arrow bytes, arrays) of a shard in object storage, opened in two concurrent
    rounds of requests (the Arrow file and every ``zarr.json``; then every shard index) instead
    of two sequential requests per array. Rows of an array in the writer's layout stream by
    ranged reads with read-ahead (RemoteRows); arrays in ``whole`` (small: token offsets) come
    back as numpy arrays, fetched whole in the second round; any other layout opens through
    zarr's own FsspecStore."""
    table, *metas = store.cat_many([f"{rel}/{EXAMPLES_FILE}",
                                    *(f"{rel}/{n}/zarr.json" for n in names)])
    out: dict[str, Any] = {}
    todo: list[tuple[str, str, np.dtype, tuple[int, ...], int, int, int]] = []
    for name, raw in zip(names, metas):
        plain = _plain_layout(json.loads(raw))
        if plain is None:
            continue
        dtype, shape, rows = plain
        if shape[0] == 0:
            out[name] = np.zeros(shape, dtype)
            continue
        data = f"{name}/c/" + "/".join("0" * len(shape))  # relative to the shard dir
        size = (files.get(data) or {}).get("bytes", -1)
        span = _index_span(size, dtype, shape, rows)
        if span is not None:
            start = 0 if name in whole else span[0]
            todo.append((name, f"{rel}/{data}", dtype, shape, rows, start, span[1]))
    got = store.cat_ranges([t[1] for t in todo], [t[5] for t in todo], [t[6] for t in todo])
    for (name, data, dtype, shape, rows, start, end), buf in zip(todo, got):
        index_bytes = _index_bytes(shape, rows)
        if not _plain_index(buf[-(index_bytes - 4):], dtype, shape, rows):
            continue
        if name in whole:
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(buf, dtype, count=n).reshape(shape)
        else:
            out[name] = RemoteRows(store, data, dtype, shape, rows)
    for name in names:
        if name not in out:
            out[name] = zarr.open_array(store=store.zarr_store(f"{rel}/{name}"), mode="r",
                                        zarr_format=3)
    return table, out


def _plain_layout(meta: dict[str, Any]) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, rows per inner chunk) when the array is one Zarr shard of uncompressed,
    full-width, little-endian inner chunks indexed at its end; else None."""
    shape = tuple(meta["shape"])
    codecs = meta["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed" or meta["fill_value"] != 0:
        return None
    conf = codecs[0]["configuration"]
    inner = conf["codecs"]
    if (len(inner) != 1 or inner[0]["name"] != "bytes"
            or inner[0].get("configuration", {}).get("endian", "little") != "little"
            or conf.get("index_location", "end") != "end"):
        return None
    if (list(conf["chunk_shape"][1:]) != list(shape[1:])
            or meta["chunk_grid"]["configuration"]["chunk_shape"][0] < shape[0]):
        return None
    return np.dtype(meta["data_type"]).newbyteorder("<"), shape, conf["chunk_shape"][0]


def _index_bytes(shape: tuple[int, ...], rows: int) -> int:
    """Bytes of a Zarr shard index at the file's end: (offset, nbytes) uint64 pairs + crc32c."""
    return -(-shape[0] // rows) * 16 + 4


def _index_span(size: int, dtype: np.dtype, shape: tuple[int, ...], rows: int
                ) -> tuple[int, int] | None:
    """Where the index (without its checksum) sits in a shard file of ``size`` bytes holding
    full inner chunks in order; None when the size says the file is laid out otherwise."""
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    n_chunks = -(-shape[0] // rows)
    index_bytes = _index_bytes(shape, rows)
    if size != n_chunks * rows * row_bytes + index_bytes:
        return None
    return size - index_bytes, size - 4


def _plain_index(raw: bytes, dtype: np.dtype, shape: tuple[int, ...], rows: int) -> bool:
    """The index lists the inner chunks in order, full size, from offset 0 (so row r sits at
    r * row_bytes)."""
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    n_chunks = -(-shape[0] // rows)
    index = np.frombuffer(raw, "<u8").reshape(n_chunks, 2)
    chunk = rows * row_bytes
    return bool(np.array_equal(index[:, 0], np.arange(n_chunks, dtype=np.uint64) * chunk)
                and (index[:, 1] == chunk).all())


def _index_is_plain(size: int, dtype: np.dtype, shape: tuple[int, ...], rows: int,
                    read: Any) -> bool:
    """The shard file holds its inner chunks in order, full size, at offset 0; ``read(start,
    end)`` reads bytes of it."""
    span = _index_span(size, dtype, shape, rows)
    return span is not None and _plain_index(read(*span), dtype, shape, rows)


def _read_range(f: Path, start: int, end: int) -> bytes:
    with open(f, "rb") as fh:
        fh.seek(start)
        return fh.read(end - start)


class _Shard:
    """Open handles of one shard: the mmapped Arrow table and the per-token arrays."""

    def __init__(self, path: Path, record: dict[str, Any], layout: dict[str, Any],
                 fields: Collection[str], use_mmap: bool = True, store: Store | None = None):
        self.record = record
        self.hidden_dtype = hidden_dtype = layout["hidden_dtype"]
        self.topk = TopkStorage.from_layout(layout)
        stored = {f.name for f in layout_fields(layout)}
        if store is None:
            self.table = pa.ipc.open_file(pa.memory_map(str(path / EXAMPLES_FILE), "r")).read_all()
            def opener(name: str) -> Any:
                return open_array(path / name, use_mmap)
        names = set(fields) | ({"hidden_scale"} if "hidden" in fields and hidden_dtype == "fp8"
                               else set())
        companions = {"topk_ids": "topk_ids_hi", "topk_logprobs": "topk_logprob_bounds"}
        names |= {c for f, c in companions.items() if f in fields and c in stored}
        self.sampled = bool({"sampled_ids", "sampled_counts"} & set(fields))
        if self.sampled:  # ragged: a row's entries start at the running sum of sampled_n
            names |= {"sampled_n", "sampled_ids", "sampled_counts"}
        if store is None:
            self.arrays = {n: opener(n) for n in sorted(names)}
            self.token_offsets = np.asarray(opener(TOKEN_OFFSETS)[:])
        else:  # two concurrent request rounds; text and ids (small) are fetched whole
            rel = f"{SHARDS_DIR}/{record['name']}"
            table, self.arrays = open_remote_shard(store, rel, [*sorted(names), TOKEN_OFFSETS],
                                                   record.get("files") or {},
                                                   whole=(TOKEN_OFFSETS, "sampled_n"))
            self.table = pa.ipc.open_file(pa.py_buffer(table)).read_all()
            self.token_offsets = np.asarray(self.arrays.pop(TOKEN_OFFSETS)[:])
        # bytes of one token row over the arrays read (for the reader's byte count; the ragged
        # sampled entries are not counted)
        self.row_bytes = sum(a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
                             for n, a in self.arrays.items()
                             if n not in ("sampled_ids", "sampled_counts"))
        self.mapped = all(isinstance(a, np.memmap) or a.shape[0] == 0 for a in self.arrays.values())
        if self.sampled:
            n = np.asarray(self.arrays["sampled_n"][:], dtype=np.int64)
            self.sampled_start = np.concatenate([[0], np.cumsum(n)])
        self.ids = self.table.column("example_id").to_pylist()
        # Column buffers flattened once; each example is a slice (no copy).
        self._input_ids = self.table.column("input_ids").combine_chunks()
        self._mask = self.table.column("response_mask").combine_chunks()
        self._offsets = self.table.column("offsets").combine_chunks()

    def __len__(self) -> int:
        return len(self.ids)

    def examples(self, rows: range, fields: Collection[str], shard_index: int) -> list[CachedExample]:
        """Examples ``rows`` (a contiguous range), reading each token field once for the block."""
        a, b = int(self.token_offsets[rows.start]), int(self.token_offsets[rows.stop])
        block: dict[str, np.ndarray] = {}
        if self.sampled:
            e0, e1 = int(self.sampled_start[a]), int(self.sampled_start[b])
            block["sampled_ids"], block["sampled_counts"] = decode_sampled(
                self.arrays["sampled_n"][a:b], self.arrays["sampled_ids"][e0:e1],
                self.arrays["sampled_counts"][e0:e1])
        for name in fields:
            if name in block:
                continue
            if name == "hidden":
                codes = self.arrays["hidden"][a:b]
                scale = self.arrays["hidden_scale"][a:b] if self.hidden_dtype == "fp8" else None
                block[name] = decode_hidden(codes, self.hidden_dtype, scale)
            elif name == "topk_ids":
                high = self.arrays["topk_ids_hi"][a:b] if self.topk.hi_bits else None
                block[name] = decode_ids(self.arrays[name][a:b], high, self.topk)
            elif name == "topk_logprobs":
                bounds = (self.arrays["topk_logprob_bounds"][a:b] if self.topk.logprobs == "q8"
                          else None)
                block[name] = decode_logprobs(self.arrays[name][a:b], self.topk.logprobs, bounds)
            else:
                block[name] = self.arrays[name][a:b]
        cols = {c: self.table.column(c) for c in ("example_id", "index", "prompt", "response",
                                                  "prompt_len")}
        out = []
        for r in rows:
            lo, hi = int(self.token_offsets[r]) - a, int(self.token_offsets[r + 1]) - a
            out.append(CachedExample(
                example_id=self.ids[r],
                index=cols["index"][r].as_py(),
                prompt=cols["prompt"][r].as_py(),
                response=cols["response"][r].as_py(),
                input_ids=_list_values(self._input_ids, r),
                prompt_len=cols["prompt_len"][r].as_py(),
                response_mask=_list_values(self._mask, r),
                offsets=_list_values(self._offsets, r).reshape(-1, 2),
                shard=shard_index, row=r,
                **{name: arr[lo:hi] for name, arr in block.items() if name in fields},
            ))
        return out


def _list_values(col: pa.ListArray, r: int) -> np.ndarray:
    start, end = col.offsets[r].as_py(), col.offsets[r + 1].as_py()
    values = col.values.slice(start, end - start)
    # Bools are bit-packed in Arrow, so they cannot be zero-copy; ints are.
    return values.to_numpy(zero_copy_only=not pa.types.is_boolean(values.type))


class CacheReader:
    """Read a complete cache. ``fields`` limits which per-token arrays are read (a sparse-KD
    student can skip ``hidden``, by far the largest)."""

    def __init__(self, path: str | Path, fields: Collection[str] | None = None,
                 allow_incomplete: bool = False, max_open_shards: int = 4, use_mmap: bool = True,
                 verify_checksums: bool = False):
        # a URL: its small objects are pulled into a local view; shards stream from the store
        self.path = open_cache_location(path)
        self.store = store_of(self.path)
        # Checked once per shard per process, when first opened: a trainer must never learn from a
        # flipped bit. One sequential CRC-32C pass per shard, next to the reads it does anyway.
        self._verify = verify_checksums
        self._verified: set[int] = set()
        # Bytes of per-token arrays this reader has sliced, and bytes it has checksummed:
        # what the loader benchmark adds up per epoch (Arrow example columns are not counted).
        self.bytes_read = 0
        self.bytes_verified = 0
        self.manifest = load_manifest(self.path)
        if not self.manifest["complete"] and not allow_incomplete:
            lay = self.manifest["layout"]
            done = len(committed_shards(self.path, self.manifest))
            raise CacheError(f"{self.path}: the cache is incomplete ({done} of {lay['n_shards']} "
                             "shards committed); rerun the same `dskd cache-teacher` command to "
                             "finish it")
        self.layout = self.manifest["layout"]
        stored = {f.name for f in layout_fields(self.layout)}
        wanted = READABLE if fields is None else tuple(fields)
        bad = [f for f in wanted if f not in READABLE]
        if bad:
            raise CacheError(f"unknown cache field(s) {bad}; readable fields are {list(READABLE)}")
        missing = [f for f in wanted if f not in stored]
        if missing and fields is not None:
            fix = ("--sampled-targets N" if any(f.startswith("sampled") for f in missing)
                   else "--top-k > 0")
            raise CacheError(f"{self.path}: fields {missing} are not in this cache "
                             f"(top_k={self.layout['top_k']}, sampled_targets="
                             f"{self.layout.get('sampled_targets', 0)}); rebuild it with {fix}")
        self.fields = tuple(f for f in wanted if f in stored)
        records = committed_shards(self.path, self.manifest)
        self.shards = [records[i] for i in sorted(records)]
        self._by_index = {s["index"]: s for s in self.shards}
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[int, threading.Lock] = {}
        self._max_open = max_open_shards
        self._use_mmap = use_mmap
        self._id_index: dict[str, tuple[int, int]] | None = None
        # Examples per read: about one inner chunk of the widest array.
        row_bytes = self.layout["hidden_size"] * 2
        self._block_rows = chunk_rows(row_bytes)

    @property
    def fingerprints(self) -> dict[str, Any]:
        return self.manifest["fingerprints"]

    def __len__(self) -> int:
        return sum(s["n_examples"] for s in self.shards)

    def __iter__(self) -> Iterator[CachedExample]:
        return self.iter_examples()

    def shard_indices(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's share of the shards (round-robin), for data-parallel readers."""
        return [s["index"] for s in self.shards][rank::world_size]

    def iter_examples(self, shards: Sequence[int] | None = None,
                      start: tuple[int, int] | None = None) -> Iterator[CachedExample]:
        """Examples in shard order, then row order. ``start=(shard, row)`` resumes at that example
        (the position a checkpoint saved), skipping everything before it in ``shards``."""
        order = [s["index"] for s in self.shards] if shards is None else list(shards)
        if start is not None and start[0] not in order:
            raise CacheError(f"resume position {start}: shard {start[0]} is not among {order}")
        skipping = start is not None
        for si in order:
            if skipping and si != start[0]:
                continue
            first = start[1] if skipping else 0
            skipping = False
            sh = self._shard(si)
            r = first
            while r < len(sh):
                stop = self._block_end(sh, r)
                yield from sh.examples(range(r, stop), self.fields, si)
                r = stop

    def at(self, shard: int, row: int) -> CachedExample:
        sh = self._shard(shard)
        if not 0 <= row < len(sh):
            raise CacheError(f"{self.path}: shard {shard} has {len(sh)} rows, asked for row {row}")
        return sh.examples(range(row, row + 1), self.fields, shard)[0]

    def get(self, example_id: str) -> CachedExample:
        """Random access by example id (the index is built on first use from the id columns)."""
        if self._id_index is None:
            self._id_index = {eid: (s["index"], r) for s in self.shards
                              for r, eid in enumerate(self._shard(s["index"]).ids)}
        if example_id not in self._id_index:
            raise KeyError(f"example {example_id!r} is not in cache {self.path}")
        return self.at(*self._id_index[example_id])

    def block_bounds(self, shard: int) -> np.ndarray:
        """Row boundaries of a shard's read blocks (each about one Zarr chunk of token rows):
        block j is rows ``bounds[j]:bounds[j+1]``. Reading a whole block costs about what one of
        its rows does, so loaders with an LRU of blocks should cache by these bounds."""
        sh = self._shard(shard)
        bounds, r = [0], 0
        while r < len(sh):
            r = self._block_end(sh, r)
            bounds.append(r)
        return np.asarray(bounds)

    def read_rows(self, shard: int, rows: range) -> list[CachedExample]:
        """Examples ``rows`` (contiguous) of one shard, each per-token field read once for all."""
        sh = self._shard(shard)
        if not 0 <= rows.start <= rows.stop <= len(sh):
            raise CacheError(f"{self.path}: shard {shard} has {len(sh)} rows, asked for {rows}")
        if rows.stop > rows.start:
            tokens = int(sh.token_offsets[rows.stop]) - int(sh.token_offsets[rows.start])
            self.bytes_read += tokens * sh.row_bytes
        return sh.examples(rows, self.fields, shard)

    def is_mapped(self, shard: int) -> bool:
        """True when the shard's per-token arrays are memory-mapped: reading a few rows then
        costs only their bytes (through zarr, a read costs its whole chunk)."""
        return self._shard(shard).mapped

    def read_block(self, shard: int, row: int, bounds: np.ndarray | None = None
                   ) -> tuple[int, list[CachedExample]]:
        """(first row, examples) of the read block holding ``row``."""
        bounds = self.block_bounds(shard) if bounds is None else bounds
        j = int(np.searchsorted(bounds, row, side="right")) - 1
        return int(bounds[j]), self.read_rows(shard, range(int(bounds[j]), int(bounds[j + 1])))

    def example_ids(self) -> list[str]:
        return [eid for s in self.shards for eid in self._shard(s["index"]).ids]

    def _block_end(self, sh: _Shard, r: int) -> int:
        """End of a block starting at row r holding about one hidden chunk of token rows."""
        limit = sh.token_offsets[r] + self._block_rows
        stop = int(np.searchsorted(sh.token_offsets, limit, side="right")) - 1
        return min(len(sh), max(r + 1, stop))

    def _shard(self, index: int) -> _Shard:
        """The open shard, opened (and checked, once) on first use. Thread-safe: a loader's
        read-ahead threads open shards while the worker reads others; a shard is opened once
        even when two threads ask for it at the same time."""
        with self._lock:
            if index in self._open:
                self._open.move_to_end(index)
                return self._open[index]
            if index not in self._by_index:
                raise CacheError(f"{self.path}: shard {index} is not committed in the manifest")
            opening = self._opening.setdefault(index, threading.Lock())
        with opening:
            with self._lock:
                if index in self._open:
                    return self._open[index]
            rec = self._by_index[index]
            if self._verify and index not in self._verified:
                self.bytes_verified += verify_shard_files(self.path, rec)
                self._verified.add(index)
            sh = _Shard(self.path / SHARDS_DIR / rec["name"], rec, self.layout, self.fields,
                        self._use_mmap, self.store)
            with self._lock:
                self._open[index] = sh
                self._opening.pop(index, None)
                while len(self._open) > self._max_open:
                    self._open.popitem(last=False)
        return sh


def verify_shard_files(cache_dir: Path, record: dict[str, Any]) -> int:
    """Every file of a committed shard has its recorded size and checksum, or CacheError names
    it. Returns the bytes checksummed."""
    store = store_of(cache_dir)
    d = Path(cache_dir) / SHARDS_DIR / record["name"]
    present = store.shard_files(record["name"]) if store else None
    hashed = 0
    for rel, info in (record.get("files") or {}).items():
        f = d / rel
        size = (present.get(rel) if present is not None
                else f.stat().st_size if f.is_file() else None)
        problem = None
        if size is None:
            problem = "is missing"
        elif size != info["bytes"]:
            problem = f"has {size} bytes, the manifest says {info['bytes']}"
        else:
            hashed += info["bytes"]
            got = (store.checksum(f"{SHARDS_DIR}/{record['name']}/{rel}") if store
                   else hash_file(f))
            if got != info[CHECKSUM]:
                problem = "fails its checksum (the bytes changed after the shard was committed)"
        if problem:
            where = store.url if store else cache_dir
            raise CacheError(f"{where}: shard {record['name']} is corrupt: {rel} {problem}. "
                             f"Run `dskd cache verify --repair {where}`, then rerun the same "
                             "`dskd cache-teacher` command: it rewrites only the bad shards.")
    return hashed


def open_cache(path: str | Path, fields: Collection[str] | None = None) -> CacheReader:
    return CacheReader(path, fields)


def load_head(path: str | Path, device: str | None = None) -> dict[str, Any]:
    """The tensors of head.safetensors: ``lm_head.weight`` (V, D_t), ``lm_head.bias`` if the model
    has one, ``embed_tokens.weight`` (V_in, D_t; the same tensor as the head when tied). Logits =
    (hidden @ weight.T + bias) * manifest ``head.logit_scale``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = open_cache_location(path)
    f = p / HEAD_FILE if p.is_dir() else p
    if not f.is_file():
        raise CacheError(f"{f}: no head file; was this cache written completely?")
    if p.is_dir():  # the head turns every cached hidden state into logits: never use a damaged one
        rec = load_manifest(p).get("head") or {}
        if CHECKSUM in rec and (f.stat().st_size != rec.get("bytes") or hash_file(f) != rec[CHECKSUM]):
            raise CacheError(f"{f}: damaged (size or {CHECKSUM} differs from the manifest); rebuild "
                             "the cache with `dskd cache-teacher ... --overwrite`")
    try:
        tensors = load_file(str(f), device=device or "cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CacheError(f"{f}: unreadable ({type(e).__name__}: {e}); rebuild the cache with "
                         "`dskd cache-teacher ... --overwrite`") from None
    with safe_open(str(f), framework="pt") as sf:
        info = json.loads((sf.metadata() or {}).get("dskd", "{}"))
    if info.get("tied_embeddings") and EMBED_WEIGHT not in tensors:
        tensors[EMBED_WEIGHT] = tensors[HEAD_WEIGHT]
    return tensors
