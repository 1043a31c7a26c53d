"""Row sources (a teacher cache, or a data file in memory) and the micro-batch builder.

The builder turns rows into tensors in the DataLoader workers: it tokenizes each row for the
student from its raw text (the student's own vocabulary), checks that the student example and the
teacher row are the same example, and collates both sides the official way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache.reader import CachedExample, CacheReader
from ..cache.remote import open_cache_location, store_of
from ..cache.spec import CacheError
from ..data import Example
from ..tokenize import TokenizedExample, tokenize_text
from .collate import collate_tokens, pad_rows

MAX_OPEN_SHARDS = 8
# An open shard in object storage holds its Arrow table and a few fetched chunks, not a memory
# map, and re-opening one costs round trips: keep many more open.
MAX_OPEN_STORE_SHARDS = 64
# Micro-batches a DataLoader worker reads ahead of the one it builds (object storage only: local
# shards are memory-mapped). [default 4; env DSKD_READ_AHEAD_BATCHES]
READ_AHEAD_BATCHES = int(os.environ.get("DSKD_READ_AHEAD_BATCHES", "4"))
_FETCHERS = 8  # threads per process that read blocks ahead


class AlignmentError(ValueError):
    """A student example and a teacher row that are not the same example."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------- sources


class ExampleSource:
    """Examples of a data file held in memory (data files are small; caches are not)."""

    def __init__(self, examples: Sequence[Example], lengths: Sequence[int] | None = None):
        self.examples = list(examples)
        self.num_rows = len(self.examples)
        self._lengths = None if lengths is None else np.asarray(lengths)

    def lengths(self) -> np.ndarray:
        """Student tokens per example (for --batch-tokens)."""
        if self._lengths is None:
            raise ValueError("this data source was built without token lengths")
        return self._lengths

    def fetch(self, indices: Sequence[int]) -> list[Example]:
        return [self.examples[i] for i in indices]


class CacheSource:
    """A teacher cache addressed by global row (shards concatenated in manifest order).

    The reader is opened lazily in each process (DataLoader workers fork the source). Rows of one
    micro-batch that share a shard are read together, a run of consecutive rows at a time.
    Memory-mapped shards (the writer's layout) are read row by row: every row is used by one
    worker once per epoch, so an epoch reads each byte once whatever the number of workers.
    Shards read through zarr, and shards in object storage, go through an LRU of decoded blocks
    instead (a zarr read costs its whole chunk; a store read costs a round trip). From a store,
    the loader also calls `prefetch` a few micro-batches ahead: threads read those blocks while
    the worker builds the current batch, so a step does not wait on the network.

    Checksums: `verify_node_share` checks this process's share of the shards before training
    (each shard once per node, split over the node's ranks); after it, readers in this process
    and its DataLoader workers skip the check. Without it each process checks every shard it
    opens, once.
    """

    def __init__(self, path: str | Path, fields: Sequence[str], cache_mb: int = 256,
                 use_mmap: bool = True, read_ahead: int = READ_AHEAD_BATCHES):
        # a store URL becomes its local view once, here: workers reopen the view, not the URL
        self.path, self.fields = open_cache_location(path), tuple(fields)
        self.remote = store_of(self.path) is not None
        self.use_mmap = use_mmap
        self.cache_bytes = cache_mb << 20
        # micro-batches to read ahead (RankStream asks); 0 for a local cache: mapped pages
        # need no fetching
        self.read_ahead = read_ahead if self.remote else 0
        self.max_open = MAX_OPEN_STORE_SHARDS if self.remote else MAX_OPEN_SHARDS
        self._reset_process_state()
        reader = CacheReader(self.path, fields=self.fields, max_open_shards=self.max_open,
                             verify_checksums=True, use_mmap=use_mmap)
        self.manifest = reader.manifest
        self.shards = [(s["index"], s["name"], s["n_examples"]) for s in reader.shards]
        self.starts = np.cumsum([0] + [n for _, _, n in self.shards])
        self.num_rows = int(self.starts[-1])
        self._reader: CacheReader | None = reader
        self._pid = os.getpid()
        self.node_verified = False

    def _reset_process_state(self) -> None:
        """Per-process state: decoded blocks, blocks being read, the read-ahead threads."""
        self._lru: OrderedDict[tuple[int, int], list[CachedExample]] = OrderedDict()
        self._lru_bytes: dict[tuple[int, int], int] = {}
        self._loading: dict[tuple[int, int], Future] = {}
        self._bounds: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # each process opens its own handles, keeps its own LRU and starts its own threads
        for k in ("_reader", "_lru", "_lru_bytes", "_loading", "_bounds", "_lock", "_pool"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reader = None
        self._reset_process_state()

    def reader(self) -> CacheReader:
        if self._reader is None or self._pid != os.getpid():
            # Local shards are memory-mapped: each open one keeps the pages it has served mapped
            # (file-backed, reclaimable), so a few open shards bound that part of the memory.
            self._reset_process_state()  # a forked worker starts with fresh locks and threads
            self._reader = CacheReader(self.path, fields=self.fields,
                                       max_open_shards=self.max_open, use_mmap=self.use_mmap,
                                       verify_checksums=not self.node_verified)
            self._pid = os.getpid()
        return self._reader

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading the blocks holding these rows in background threads (object storage
        only), so that `fetch` finds them in memory: the loader calls this a few micro-batches
        ahead, and a training step does not wait on the network."""
        if not self.read_ahead:
            return
        self.reader()  # this process's reader and threads exist before a thread needs them
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_FETCHERS, thread_name_prefix="dskd-read-ahead")
        by_shard: dict[int, set[int]] = {}
        for i in indices:
            pos, row = self.locate(i)
            by_shard.setdefault(pos, set()).add(row)
        for pos, rows in by_shard.items():
            self._pool.submit(self._warm, self.shards[pos][0], sorted(rows))

    def _warm(self, shard_index: int, rows: list[int]) -> None:
        # an error here also reaches `fetch`, through the block's future (or its own read),
        # which names the shard: nothing to report twice
        with contextlib.suppress(Exception):
            for r in rows:
                self._block(shard_index, r)

    def verify_node_share(self, local_rank: int = 0, local_world: int = 1) -> int:
        """Checksum shards local_rank, local_rank + local_world, … (CacheError names a bad one);
        returns the bytes checksummed. Call it on every rank of a node, then barrier: the node
        has then checked every shard once, and no process re-checks (`node_verified`)."""
        from ..cache.reader import verify_shard_files

        records = {s["index"]: s for s in self.manifest["shards"]}
        mine = [records[i] for i, _, _ in self.shards[local_rank::local_world]]
        if self.remote:  # network-bound: several shards streamed at once
            with ThreadPoolExecutor(_FETCHERS) as pool:
                done = sum(pool.map(lambda rec: verify_shard_files(self.path, rec), mine))
        else:
            done = sum(verify_shard_files(self.path, rec) for rec in mine)
        self.node_verified = True
        self._reader = None  # reopen without per-shard checks
        return done

    def locate(self, i: int) -> tuple[int, int]:
        """Global row → (shard list position, row in shard)."""
        pos = int(np.searchsorted(self.starts, i, side="right")) - 1
        return pos, i - int(self.starts[pos])

    def fetch(self, indices: Sequence[int]) -> list[CachedExample]:
        by_shard: dict[int, list[int]] = {}
        for i in indices:
            pos, row = self.locate(i)
            by_shard.setdefault(pos, []).append(row)
        got: dict[tuple[int, int], CachedExample] = {}
        for pos, rows in by_shard.items():
            shard_index, name, _ = self.shards[pos]
            try:
                for ex in self._read_rows(shard_index, sorted(set(rows))):
                    got[(pos, ex.row)] = ex
            except CacheError:
                raise
            except Exception as e:  # noqa: BLE001 - arrow/zarr/OS errors all mean a bad shard
                raise CacheError(f"{self.path}: shard {name} cannot be read ({type(e).__name__}: "
                                 f"{e}); run `dskd cache verify {self.path}` and rerun "
                                 "cache-teacher to rewrite it") from None
        return [got[self.locate(i)] for i in indices]

    def _read_rows(self, shard_index: int, rows: list[int]) -> list[CachedExample]:
        """Rows (sorted, distinct) of one shard: straight from the mapped files, or, through zarr,
        via an LRU of decoded read blocks (~one Zarr chunk each): a shuffle window keeps drawing
        from the same few blocks, so most rows come from memory; decoded blocks stay under
        `cache_mb` whatever the cache size.
        """
        reader = self.reader()
        if not self.remote and reader.is_mapped(shard_index):  # exactly these rows, run by run
            out: list[CachedExample] = []
            lo = 0
            for j in range(1, len(rows) + 1):
                if j == len(rows) or rows[j] != rows[j - 1] + 1:
                    out += reader.read_rows(shard_index, range(rows[lo], rows[j - 1] + 1))
                    lo = j
            return out
        out = []
        for r in rows:
            start, block = self._block(shard_index, r)
            out.append(block[r - start])
        return out

    def _block(self, shard_index: int, row: int) -> tuple[int, list[CachedExample]]:
        """(first row, examples) of the read block holding ``row``, from the LRU, from a
        read-ahead thread already reading it (waited for, not read twice), or read now."""
        reader = self.reader()
        bounds = self._bounds.get(shard_index)
        if bounds is None:
            bounds = self._bounds[shard_index] = reader.block_bounds(shard_index)
        k = int(np.searchsorted(bounds, row, side="right")) - 1
        key = (shard_index, int(bounds[k]))
        with self._lock:
            if key in self._lru:
                self._lru.move_to_end(key)
                return key[1], self._lru[key]
            loading = self._loading.get(key)
            if loading is None:
                loading = self._loading[key] = Future()
                mine = True
            else:
                mine = False
        if not mine:
            return key[1], loading.result()
        try:
            block = reader.read_rows(shard_index, range(key[1], int(bounds[k + 1])))
        except BaseException as e:
            with self._lock:
                del self._loading[key]
            loading.set_exception(e)
            raise
        size = sum(a.nbytes for ex in block for a in
                   (getattr(ex, f) for f in reader.fields) if a is not None)
        with self._lock:
            self._lru[key], self._lru_bytes[key] = block, size
            del self._loading[key]
            while len(self._lru) > 1 and sum(self._lru_bytes.values()) > self.cache_bytes:
                old, _ = self._lru.popitem(last=False)
                del self._lru_bytes[old]
        loading.set_result(block)
        return key[1], block

    def lengths(self) -> np.ndarray:
        """Token count n of every row (from the Arrow files; no per-token data is read)."""
        import pyarrow as pa

        from ..cache.spec import EXAMPLES_FILE, SHARDS_DIR

        store = store_of(self.path)
        names = [name for _, name, _ in self.shards]
        out = []
        for i in range(0, len(names), 64):  # from a store: 64 concurrent requests at a time
            group = [f"{SHARDS_DIR}/{n}/{EXAMPLES_FILE}" for n in names[i:i + 64]]
            bufs = ([pa.py_buffer(b) for b in store.cat_many(group)] if store
                    else [pa.memory_map(str(self.path / g), "r") for g in group])
            out += [pa.ipc.open_file(b).read_all().column("n_tokens").to_numpy() for b in bufs]
        return np.concatenate(out) if out else np.zeros(0, np.int32)


def check_shards_present(path: str | Path, manifest: dict[str, Any]) -> None:
    """Every committed shard's files exist with their recorded sizes, before any compute."""
    from ..cache.spec import SHARDS_DIR

    path = open_cache_location(path)
    if (store := store_of(path)) is not None:
        _check_shards_in_store(store, manifest)
        return
    root = path / SHARDS_DIR
    for s in manifest["shards"]:
        d = root / s["name"]
        if not d.is_dir():
            raise CacheError(f"{path}: shard {s['name']} is missing ({d}); rerun the same "
                             "`dskd cache-teacher` command to rewrite it")
        for rel, info in (s.get("files") or {}).items():
            f = d / rel
            size = info.get("bytes") if isinstance(info, dict) else None
            if not f.is_file() or (size is not None and f.stat().st_size != size):
                raise CacheError(f"{path}: shard {s['name']} is corrupt ({rel} is "
                                 f"{'missing' if not f.is_file() else 'truncated or changed'}); "
                                 f"run `dskd cache verify {path}` and rerun cache-teacher")


def _check_shards_in_store(store: Any, manifest: dict[str, Any]) -> None:
    """check_shards_present for a cache in object storage: one listing per shard."""
    for s in manifest["shards"]:
        present = store.shard_files(s["name"])
        for rel, info in (s.get("files") or {}).items():
            if present.get(rel) != info.get("bytes"):
                raise CacheError(f"{store.url}: shard {s['name']} is corrupt ({rel} is "
                                 f"{'missing' if rel not in present else 'truncated or changed'}); "
                                 f"run `dskd cache verify {store.url}` and rerun cache-teacher")


# --------------------------------------------------------------------------- batch builder


@dataclass
class BatchBuilder:
    """rows → (example ids, tensors) for one micro-batch; runs inside DataLoader workers.

    student_tokenizer tokenizes every row for the student. With a cache, the teacher side comes
    from the row (`teacher_fields` selects the per-token arrays to collate); online, the teacher
    side is tokenized here with teacher_tokenizer and the teacher forward runs in the loop.
    """

    student_tokenizer: Any
    max_prompt_len: int
    max_len: int
    teacher_tokenizer: Any = None  # online mode
    teacher_pad_id: int = 0
    teacher_fields: tuple[str, ...] = ()  # cache mode: per-token arrays to collate
    same_length: bool = False  # ULD: student and teacher padded to one length
    with_teacher: bool = True
    aligner: Any = None  # dskd-eta: token_align.Aligner → align_teacher / align_student (B, K)
    mined_aligner: Any = None  # MinED: (s_ids, s_labels, t_ids, t_labels) -> aligned teacher rows

    def __call__(self, rows: list[Any], padding: bool) -> tuple[list[str], dict[str, Any]]:
        student = [self._student(r) for r in rows]
        teacher = [self._teacher(r, s) for r, s in zip(rows, student)] if self.with_teacher else []
        pad_to = None
        if self.same_length and teacher:
            pad_to = max(max(len(s.input_ids) for s in student),
                         max(len(t[0]) for t in teacher)) - 1
        masked = [padding] * len(rows)
        out = collate_tokens([s.input_ids for s in student], [s.prompt_len for s in student],
                             self.student_tokenizer.pad_token_id, pad_to=pad_to, masked=masked)
        if teacher:
            tt = collate_tokens([t[0] for t in teacher], [t[1] for t in teacher],
                                self.teacher_pad_id, pad_to=pad_to, masked=masked)
            out.update({f"teacher_{k}": v for k, v in tt.items()})
            if self.aligner is not None:
                out.update(self._align(rows, student, teacher, masked))
            T_t = tt["input_ids"].shape[1]
            for name in self.teacher_fields:
                # padding rows are masked by the labels; id 0 keeps any gather in range
                out[f"teacher_{name}"] = pad_rows([getattr(r, name) for r in rows], T_t, 0,
                                                  dtype=torch.long if name.endswith("_ids") else None)
            if self.mined_aligner is not None:  # MinED's DTW here, in the worker, not the loop
                out["aligned_rows"] = self.mined_aligner(out["input_ids"], out["labels"],
                                                         out["teacher_input_ids"], out["teacher_labels"])
        return [s.example_id for s in student], out

    def _student(self, row: Any) -> TokenizedExample:
        ex = tokenize_text(_id(row), row.prompt, row.response, self.student_tokenizer,
                           self.max_prompt_len, self.max_len)
        if isinstance(row, CachedExample):
            check_row(row, ex)
        return ex

    def _teacher(self, row: Any, student: TokenizedExample) -> tuple[list[int], int, Any]:
        """(ids, prompt_len, character spans) of the teacher sequence."""
        if isinstance(row, CachedExample):
            return row.input_ids.tolist(), int(row.prompt_len), row.offsets
        t = tokenize_text(row.id, row.prompt, row.response, self.teacher_tokenizer,
                          self.max_prompt_len, self.max_len)
        return t.input_ids, t.prompt_len, t.offsets

    def _align(self, rows: list[Any], student: list[TokenizedExample], teacher: list[tuple],
               masked: list[bool]) -> dict[str, torch.Tensor]:
        """Aligned (teacher row, student row) pairs per example, -1 padded to (B, K)."""
        from ..token_align import label_tokens

        pairs = []
        for s, t, m in zip(student, teacher, masked):
            if m:  # a padding row: nothing is supervised, nothing aligns
                pairs.append(([], []))
                continue
            pairs.append(self.aligner(label_tokens(t[0], t[1], t[2]),
                                      label_tokens(s.input_ids, s.prompt_len, s.offsets), s.text))
        K = max(1, max(len(p[0]) for p in pairs))
        at = torch.full((len(rows), K), -1, dtype=torch.long)
        ast = torch.full((len(rows), K), -1, dtype=torch.long)
        for b, (ti, si) in enumerate(pairs):
            at[b, : len(ti)] = torch.as_tensor(ti, dtype=torch.long)
            ast[b, : len(si)] = torch.as_tensor(si, dtype=torch.long)
        return {"align_teacher": at, "align_student": ast}


def _id(row: Any) -> str:
    return row.example_id if isinstance(row, CachedExample) else row.id


def check_row(row: CachedExample, student: TokenizedExample) -> None:
    """The student example and the cache row are one example: same id, same text, rows intact."""
    where = f"example {row.example_id!r} (shard {row.shard}, row {row.row})"
    if student.example_id != row.example_id:
        raise AlignmentError(f"{where}: student example id {student.example_id!r} differs")
    cached_text = row.prompt + row.response
    if text_hash(student.text) != text_hash(cached_text):
        raise AlignmentError(f"{where}: the student's text (hash {text_hash(student.text)}) is not "
                             f"the cached text (hash {text_hash(cached_text)})")
    n = len(row.input_ids)
    for name in ("hidden", "topk_ids", "topk_logprobs", "tail_logprob", "sampled_ids",
                 "sampled_counts"):
        arr = getattr(row, name)
        if arr is not None and arr.shape[0] != n - 1:
            raise AlignmentError(f"{where}: {name} has {arr.shape[0]} rows but the cached sequence "
                                 f"has {n} tokens (expected {n - 1}); the shard is corrupt, "
                                 "rerun cache-teacher on it")
