"""Reading a cache from object storage without making a step wait: a shard opens in two
concurrent request rounds, and the loader reads micro-batches ahead in background threads.
Runs against a real S3 server (moto, 127.0.0.1); fakes only where a test counts calls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dskd.pipeline.cache.reader import CacheReader
from dskd.pipeline.cache.remote import Store
from dskd.pipeline.train.loader import PlanConfig, RankStream
from dskd.pipeline.train.sources import CacheSource
from dskd.stages.cache_teacher import CacheTeacherConfig, run

FIELDS = ("hidden", "topk_ids", "topk_logprobs")


@pytest.fixture(scope="module")
def disk_cache(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("read-ahead") / "cache"
    run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(toy_world.train), out=str(out),
                           limit=24, shard_size=4, top_k=8, progress=False))
    return out


@pytest.fixture
def store_cache(disk_cache, s3):
    url, fs = s3
    fs.put(str(disk_cache) + "/", url + "/cache/", recursive=True)
    return url + "/cache"


class Calls:
    """Counts a Store's request methods (wrapping the real ones)."""

    def __init__(self, monkeypatch):
        self.log: list[str] = []
        for name in ("cat", "cat_many", "cat_ranges"):
            real = getattr(Store, name)

            def wrapped(store, *a, _real=real, _name=name, **kw):
                self.log.append(_name)
                return _real(store, *a, **kw)
            monkeypatch.setattr(Store, name, wrapped)


def test_a_store_shard_opens_in_two_concurrent_rounds_and_reads_like_disk(
        disk_cache, store_cache, monkeypatch):
    far, near = CacheReader(store_cache, fields=FIELDS), CacheReader(disk_cache, fields=FIELDS)
    calls = Calls(monkeypatch)
    sh = far._shard(2)
    # the Arrow file and all five zarr.json in one round, all indexes (+ offsets) in another,
    # where it was 2 sequential requests per array plus the Arrow file
    assert calls.log == ["cat_many", "cat_ranges"]
    np.testing.assert_array_equal(sh.token_offsets, near._shard(2).token_offsets)
    for a, b in zip(far.read_rows(2, range(4)), near.read_rows(2, range(4))):
        assert a.example_id == b.example_id
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_two_threads_opening_one_shard_open_it_once(store_cache, monkeypatch):
    reader = CacheReader(store_cache, fields=FIELDS)
    calls = Calls(monkeypatch)
    got = []
    threads = [threading.Thread(target=lambda: got.append(reader._shard(1))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in got}) == 1 and calls.log.count("cat_many") == 1


def test_prefetched_rows_are_served_from_memory_with_no_request(
        disk_cache, store_cache, monkeypatch):
    far, near = CacheSource(store_cache, FIELDS), CacheSource(disk_cache, FIELDS)
    assert far.read_ahead > 0 and near.read_ahead == 0  # local shards are mapped: no read-ahead
    rows = [3, 17, 5, 22, 9]
    far.prefetch(rows)
    far._pool.shutdown(wait=True)  # the read-ahead threads have finished
    calls = Calls(monkeypatch)
    from dskd.pipeline.cache import remote

    monkeypatch.setattr(remote.RemoteRows, "_fetch", lambda *a: pytest.fail("read again"))
    got = far.fetch(rows)
    assert calls.log == []  # every block came from memory
    for a, b in zip(got, near.fetch(rows)):
        assert a.example_id == b.example_id
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_a_read_in_flight_is_waited_for_not_repeated(store_cache, monkeypatch):
    src = CacheSource(store_cache, FIELDS)
    real, reads = CacheReader.read_rows, []

    def slow(self, shard, rows):
        reads.append((shard, rows))
        time.sleep(0.3)  # the read is still in flight when fetch asks for the same rows
        return real(self, shard, rows)
    monkeypatch.setattr(CacheReader, "read_rows", slow)
    src.prefetch([0])
    time.sleep(0.1)
    ex = src.fetch([0])[0]
    assert ex.row == 0 and len(reads) == 1  # the block was read once, by the read-ahead thread


class Recorder:
    """A row source that records the order of prefetch and fetch calls (a fake: the test is
    about the order in which the stream asks, not about reading)."""

    num_rows = 40

    def __init__(self, read_ahead: int):
        self.read_ahead, self.log = read_ahead, []

    def prefetch(self, rows):
        self.log.append(("prefetch", tuple(rows)))

    def fetch(self, rows):
        self.log.append(("fetch", tuple(rows)))
        return list(rows)


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_the_stream_names_each_batch_ahead_and_yields_the_same_batches(ahead):
    plan = PlanConfig(batch_size=4, seed=3)
    src = Recorder(ahead)
    got = [mb.example_ids for mb in RankStream(src, plan, 0, lambda rows, pad: (rows, {}),
                                               epochs=2)]
    base = [mb.example_ids for mb in RankStream(Recorder(0), plan, 0,
                                                lambda rows, pad: (rows, {}), epochs=2)]
    assert got == base and len(got) == 20  # read-ahead changes when rows are read, not which
    fetched = [rows for kind, rows in src.log if kind == "fetch"]
    pre = [rows for kind, rows in src.log if kind == "prefetch"]
    assert pre == (fetched if ahead else [])
    # when batch i is built, batches up to i + ahead have been named
    at = [j for j, (kind, _) in enumerate(src.log) if kind == "fetch"]
    named = [sum(1 for kind, _ in src.log[:j] if kind == "prefetch") for j in at]
    assert named == ([min(i + 1 + ahead, len(fetched)) for i in range(len(fetched))] if ahead
                     else [0] * len(fetched))
