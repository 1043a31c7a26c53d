"""Streaming batches over a row source (a teacher cache or an in-memory data file).

The order of an epoch is planned on row *indices* only, so planning is cheap and the rows
themselves are read lazily, a micro-batch at a time, by whoever consumes them:

1. rows are cut into blocks of `block_size` consecutive indices (consecutive rows live in the
   same shard and chunk, so a block reads sequentially); the block order is permuted with an RNG
   seeded by (seed, epoch);
2. the resulting stream passes through a bounded shuffle buffer of `shuffle_buffer` indices
   (same RNG) — memory is O(buffer + rows/block_size) integers whatever the cache size;
3. the stream is cut into *global* micro-batches of `batch_size × world_size` rows; rank r takes
   the r-th slice of each, and on each rank DataLoader worker w takes micro-batches
   m ≡ start + w (mod num_workers), which is exactly the round-robin order in which DataLoader
   collects them. So ranks and workers never overlap, every rank runs the same number of
   micro-batches (the plan is global, nothing to agree on at the end), and the global batch at
   step k is the same for 1 process × grad_accum N and N processes × grad_accum 1.

The data position is one pair (epoch, micro-batch index); resuming re-plans the epoch (integers
only) and skips to it. The last global micro-batch of an epoch may be short: it is split as evenly
as the ranks allow, and a rank left with nothing gets one *padding* row whose labels are all
masked (it adds nothing to any loss or token count), so no rank waits at a barrier alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class RowSource(Protocol):
    """Rows addressed by a global index 0..num_rows-1 (cache: shards concatenated in order)."""

    num_rows: int

    def fetch(self, indices: Sequence[int]) -> list[Any]: ...


@dataclass(frozen=True)
class PlanConfig:
    batch_size: int  # rows per rank per micro-batch
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 1024
    block_size: int = 256
    batch_tokens: int | None = None  # padded-token budget per rank per micro-batch (else batch_size)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


def epoch_order(num_rows: int, plan: PlanConfig, epoch: int) -> Iterator[int]:
    """Row indices of one epoch, each exactly once (see module doc, steps 1-2)."""
    if not plan.shuffle:
        yield from range(num_rows)
        return
    rng = np.random.default_rng([plan.seed, epoch])
    n_blocks = -(-num_rows // plan.block_size)
    buf: list[int] = []
    for b in rng.permutation(n_blocks):
        for i in range(int(b) * plan.block_size, min(num_rows, (int(b) + 1) * plan.block_size)):
            if len(buf) < plan.shuffle_buffer:
                buf.append(i)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], i = i, buf[j]  # emit a random buffered row, keep the new one
            yield i
    rng.shuffle(buf)
    yield from buf


def micro_batches_per_epoch(num_rows: int, plan: PlanConfig, epoch: int = 0,
                            lengths: np.ndarray | None = None) -> int:
    if plan.batch_tokens is None:
        return -(-num_rows // plan.global_batch)
    return sum(1 for _ in global_micro_batches(num_rows, plan, epoch, lengths=lengths))


def rank_slice(global_rows: list[int], rank: int, world: int) -> tuple[list[int], bool]:
    """This rank's part of a global micro-batch: (rows, is_padding). Even split of a short tail."""
    n = len(global_rows)
    lo, hi = rank * n // world, (rank + 1) * n // world
    if hi > lo:
        return global_rows[lo:hi], False
    return global_rows[:1], True  # nothing left for this rank: one fully-masked padding row


def global_micro_batches(num_rows: int, plan: PlanConfig, epoch: int, start: int = 0,
                         lengths: np.ndarray | None = None) -> Iterator[tuple[int, list[int]]]:
    """(m, rows) for global micro-batch m >= start of `epoch`.

    With `plan.batch_tokens`, a global batch grows while each rank's share, padded to the longest
    row so far, stays within the budget (`lengths[i]` = tokens of row i); else it has
    batch_size × world_size rows.
    """
    if plan.batch_tokens is not None and lengths is None:
        raise ValueError("batch_tokens needs the row lengths")
    order = epoch_order(num_rows, plan, epoch)
    m, cur, longest = 0, [], 0
    for i in order:
        if plan.batch_tokens is not None:
            n_i = int(lengths[i])
            per_rank = -(-(len(cur) + 1) // plan.world_size)
            if cur and per_rank * max(longest, n_i) > plan.batch_tokens:
                if m >= start:
                    yield m, cur
                m, cur, longest = m + 1, [], 0
            longest = max(longest, n_i)
        cur.append(i)
        if plan.batch_tokens is None and len(cur) == plan.global_batch:
            if m >= start:
                yield m, cur
            m, cur = m + 1, []
    if cur and m >= start:
        yield m, cur


@dataclass
class MicroBatch:
    """One rank's micro-batch: collated tensors plus where it came from."""

    epoch: int
    index: int  # global micro-batch index within the epoch
    example_ids: list[str]
    padding: bool  # a masked filler row (the rank had no real rows in a short tail batch)
    tensors: dict[str, Any]


class RankStream(IterableDataset):
    """This rank's micro-batches from (epoch, start) on, epoch after epoch, split over workers.

    One iterator serves the whole run, so DataLoader workers are forked once: each keeps its
    open shards, decoded blocks and tokenizer state across epochs instead of rebuilding them
    every epoch. Worker w takes the k-th micro-batch of the stream (counted from the start,
    across epoch boundaries) when k ≡ w (mod num_workers): the round-robin order in which
    DataLoader collects them, whatever the number of micro-batches per epoch.
    """

    def __init__(self, source: RowSource, plan: PlanConfig, rank: int,
                 build: Callable[[list[Any], bool], tuple[list[str], dict[str, Any]]],
                 epoch: int = 0, start: int = 0, lengths: np.ndarray | None = None,
                 epochs: int | None = None):
        self.source, self.plan, self.rank, self.build = source, plan, rank, build
        self.epoch, self.start, self.lengths = epoch, start, lengths
        self.epochs = epochs  # epochs to stream (None: until the consumer stops)

    def __iter__(self) -> Iterator[MicroBatch]:
        """Build this worker's micro-batches in order. A source that reads over the network
        (``read_ahead`` > 0) is told each micro-batch's rows that many micro-batches before
        they are built (``source.prefetch``), so their reads overlap the work in between."""
        ahead = int(getattr(self.source, "read_ahead", 0) or 0)
        pending: deque[tuple[int, int, list[int], bool]] = deque()
        for item in self._mine():
            if ahead:
                self.source.prefetch(item[2])
            pending.append(item)
            if len(pending) > ahead:
                yield self._build(*pending.popleft())
        while pending:
            yield self._build(*pending.popleft())

    def _mine(self) -> Iterator[tuple[int, int, list[int], bool]]:
        """(epoch, m, this rank's rows, padding) of each micro-batch this worker builds."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        k, epoch, start = 0, self.epoch, self.start
        while self.epochs is None or epoch < self.epoch + self.epochs:
            for m, rows in global_micro_batches(self.source.num_rows, self.plan, epoch, start,
                                                self.lengths):
                k += 1
                if (k - 1) % nw != wid:
                    continue
                yield (epoch, m, *rank_slice(rows, self.rank, self.plan.world_size))
            epoch, start = epoch + 1, 0

    def _build(self, epoch: int, m: int, rows: list[int], padding: bool) -> MicroBatch:
        ids, tensors = self.build(self.source.fetch(rows), padding)
        return MicroBatch(epoch, m, ids, padding, tensors)


def _identity(batch: MicroBatch) -> MicroBatch:
    return batch  # batch_size=None: each item already is a collated micro-batch


class BatchStream:
    """Micro-batches grouped into optimizer steps, across epochs, resumable at any step boundary.

    `steps()` yields (epoch, [micro-batches of one step]); the last step of an epoch takes what
    is left (fewer than grad_accum micro-batches), so every row is seen once per epoch.
    `position` is (epoch, next micro-batch index), what a checkpoint stores.
    """

    def __init__(self, source: RowSource, plan: PlanConfig, rank: int, build: Callable,
                 grad_accum: int = 1, num_workers: int = 0, prefetch: int = 2,
                 pin_memory: bool = False, lengths: np.ndarray | None = None):
        self.source, self.plan, self.rank, self.build = source, plan, rank, build
        self.grad_accum, self.num_workers = grad_accum, num_workers
        self.prefetch, self.pin_memory, self.lengths = prefetch, pin_memory, lengths
        self._micro: dict[int, int] = {}
        self.epoch, self.micro = 0, 0

    def micro_per_epoch(self, epoch: int) -> int:
        """Global micro-batches of `epoch` (the same every epoch unless batching by tokens)."""
        if epoch not in self._micro:
            self._micro[epoch] = micro_batches_per_epoch(self.source.num_rows, self.plan, epoch,
                                                         self.lengths)
        return self._micro[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-self.micro_per_epoch(epoch) // self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in_epoch(0)

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "micro_batch": self.micro}

    def seek(self, epoch: int, micro_batch: int) -> None:
        self.epoch, self.micro = epoch, micro_batch

    def worker_positions(self) -> list[dict[str, int]]:
        """Where each of this rank's workers resumes (derived from the global position)."""
        nw = max(1, self.num_workers)
        return [{"worker": w, "epoch": self.epoch, "next_micro_batch": self.micro + w,
                 "rows": rank_rows(self.plan, self.rank)} for w in range(nw)]

    def _loader(self) -> DataLoader:
        """One DataLoader for the rest of the run (its stream crosses epochs): workers are
        forked once, not once per epoch."""
        ds = RankStream(self.source, self.plan, self.rank, self.build, self.epoch, self.micro,
                        self.lengths)
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch}
        # Own generator: DataLoader draws a base seed per iterator, which must not move the
        # global RNG (a resumed run creates its iterator at another point than the original).
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, collate_fn=_identity,
                          generator=torch.Generator(), **kw)

    def steps(self) -> Iterator[tuple[int, list[MicroBatch]]]:
        group: list[MicroBatch] = []
        for mb in self._loader():
            group.append(mb)
            self.epoch, self.micro = mb.epoch, mb.index + 1
            if self.micro == self.micro_per_epoch(self.epoch):
                yield self.epoch, group
                group = []
                self.epoch, self.micro = self.epoch + 1, 0
            elif len(group) == self.grad_accum:
                yield self.epoch, group
                group = []


def rank_rows(plan: PlanConfig, rank: int) -> str:
    """Human-readable note for checkpoints: which slice of each global batch this rank takes."""
    size = f"≤ {plan.batch_tokens} padded tokens" if plan.batch_tokens else str(plan.global_batch)
    return f"slice {rank}/{plan.world_size} of each global micro-batch ({size})"


def to_device(tensors: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in tensors.items()}
