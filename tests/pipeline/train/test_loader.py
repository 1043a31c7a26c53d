import os
from collections import Counter

import numpy as np
import pytest
import torch

from dskd.pipeline.train.loader import (
    BatchStream,
    PlanConfig,
    epoch_order,
    global_micro_batches,
    micro_batches_per_epoch,
    rank_slice,
)


class ListSource:
    def __init__(self, n):
        self.num_rows = n
        self.fetched = []

    def fetch(self, indices):
        self.fetched.extend(indices)
        return list(indices)


def build(rows, padding):
    return [str(r) for r in rows], {"rows": torch.tensor(rows), "pad": padding}


@pytest.mark.parametrize("n,buf,block", [(1000, 64, 16), (37, 1024, 256), (100, 1, 7)])
def test_epoch_is_a_permutation_and_depends_on_seed_and_epoch(n, buf, block):
    plan = PlanConfig(batch_size=4, seed=3, shuffle_buffer=buf, block_size=block)
    a = list(epoch_order(n, plan, 0))
    assert sorted(a) == list(range(n))
    assert a == list(epoch_order(n, plan, 0))
    if n > 50:
        assert a != list(epoch_order(n, plan, 1))
        assert a != list(range(n))


def test_no_shuffle_keeps_order():
    plan = PlanConfig(batch_size=4, shuffle=False)
    assert list(epoch_order(10, plan, 5)) == list(range(10))


def test_rank_slice_covers_the_tail_without_overlap():
    for n in range(1, 9):
        rows = list(range(100, 100 + n))
        parts = [rank_slice(rows, r, 4) for r in range(4)]
        real = [i for p, pad in parts if not pad for i in p]
        assert sorted(real) == rows
        assert all(len(p) == 1 for p, pad in parts if pad)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_ranks_and_workers_see_every_row_once_with_equal_step_counts(world, workers):
    n, bs, accum = 53, 4, 2
    plan = PlanConfig(batch_size=bs, world_size=world, seed=1, shuffle_buffer=8, block_size=5)
    seen, steps = Counter(), []
    for rank in range(world):
        stream = BatchStream(ListSource(n), plan, rank, build, grad_accum=accum,
                             num_workers=workers)
        it = stream.steps()
        count = 0
        for _ in range(stream.steps_per_epoch):
            epoch, group = next(it)
            assert epoch == 0
            count += 1
            for mb in group:
                if not mb.padding:
                    seen.update(mb.tensors["rows"].tolist())
        steps.append(count)
        assert stream.position == {"epoch": 0, "micro_batch": micro_batches_per_epoch(n, plan)}
        epoch, _ = next(it)  # rolls over into the next epoch
        assert epoch == 1
    assert len(set(steps)) == 1
    assert sorted(seen) == list(range(n)) and set(seen.values()) == {1}


def test_global_batch_is_independent_of_world_size():
    """Same global micro-batches (as sets) for 1 process × accum 2 and 2 processes × accum 1."""
    n = 30
    one = PlanConfig(batch_size=4, world_size=1, seed=7, shuffle_buffer=6, block_size=4)
    two = PlanConfig(batch_size=2, world_size=2, seed=7, shuffle_buffer=6, block_size=4)
    a = [sorted(r) for _, r in global_micro_batches(n, one, 0)]
    b = [sorted(r) for _, r in global_micro_batches(n, two, 0)]
    assert a == b


def test_resume_from_a_position_yields_the_same_rest():
    n = 41
    plan = PlanConfig(batch_size=3, seed=5, shuffle_buffer=10, block_size=4)
    full = BatchStream(ListSource(n), plan, 0, build, grad_accum=2, num_workers=2)
    it = full.steps()
    ref = [[mb.tensors["rows"].tolist() for mb in next(it)[1]] for _ in range(10)]
    part = BatchStream(ListSource(n), plan, 0, build, grad_accum=2)
    it = part.steps()
    for _ in range(4):
        next(it)
    pos = part.position
    resumed = BatchStream(ListSource(n), plan, 0, build, grad_accum=2, num_workers=1)
    resumed.seek(**pos)
    it = resumed.steps()
    rest = [[mb.tensors["rows"].tolist() for mb in next(it)[1]] for _ in range(6)]
    assert rest == ref[4:]


def test_rows_are_fetched_lazily_per_micro_batch():
    src = ListSource(10_000)
    plan = PlanConfig(batch_size=2, seed=0, shuffle_buffer=16, block_size=8)
    it = BatchStream(src, plan, 0, build).steps()
    next(it)
    assert len(src.fetched) == 2  # planning touched no row data


@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_batches_cover_the_epoch_within_budget(world):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=97)
    plan = PlanConfig(batch_size=1, world_size=world, seed=2, shuffle_buffer=16, block_size=8,
                      batch_tokens=150)
    seen = []
    for m, rows in global_micro_batches(97, plan, 0, lengths=lengths):
        for r in range(world):
            mine, pad = rank_slice(rows, r, world)
            if not pad:
                seen += mine
                assert len(mine) == 1 or len(mine) * max(lengths[mine]) <= 150
    assert sorted(seen) == list(range(97))
    streams = [BatchStream(ListSource(97), plan, r, build, lengths=lengths) for r in range(world)]
    counts = {s.micro_per_epoch(0) for s in streams}
    assert len(counts) == 1 and counts.pop() == len(list(global_micro_batches(97, plan, 0,
                                                                                lengths=lengths)))


def test_token_budget_needs_lengths():
    plan = PlanConfig(batch_size=1, batch_tokens=100)
    with pytest.raises(ValueError, match="lengths"):
        list(global_micro_batches(10, plan, 0))


def build_pid(rows, padding):
    ids, t = build(rows, padding)
    return ids, t | {"pid": torch.tensor(os.getpid())}


def test_workers_are_forked_once_for_the_whole_run():
    """Two workers serve three epochs of 11 micro-batches each (odd, so the round robin crosses
    epoch boundaries mid-cycle): the same two processes build every micro-batch, and the steps
    equal those built in the main process."""
    n = 21
    plan = PlanConfig(batch_size=2, seed=3, shuffle_buffer=6, block_size=4)

    def run(workers):
        stream = BatchStream(ListSource(n), plan, 0, build_pid, grad_accum=2, num_workers=workers)
        it, out, pids = stream.steps(), [], set()
        for _ in range(stream.total_steps(3)):
            epoch, group = next(it)
            out.append((epoch, [mb.tensors["rows"].tolist() for mb in group]))
            pids |= {int(mb.tensors["pid"]) for mb in group}
        return out, pids, stream.position

    ref, main, pos = run(0)
    got, pids, pos2 = run(2)
    assert got == ref and pos == pos2 == {"epoch": 2, "micro_batch": 11}
    assert main == {os.getpid()} and len(pids) == 2 and os.getpid() not in pids
