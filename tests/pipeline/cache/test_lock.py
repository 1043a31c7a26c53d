"""Writer locks: one writer per slot, no mixed splits, freed when the holder dies (even SIGKILL);
in a store (moto S3 on 127.0.0.1), takeovers and refreshes are conditional writes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dskd.pipeline.cache.lock import CacheLockedError, ObjectLock, WriterLock, conditional_writes
from dskd.pipeline.cache.remote import Store
from dskd.pipeline.cache.spec import LOCKS_DIR


def test_second_writer_is_refused_then_allowed_after_release(tmp_path):
    first = WriterLock(tmp_path).acquire()
    with pytest.raises(CacheLockedError, match=f"pid {os.getpid()}"):
        WriterLock(tmp_path).acquire()
    first.release()
    with WriterLock(tmp_path):
        pass


def test_workers_of_one_split_coexist_but_another_split_is_refused(tmp_path):
    with WriterLock(tmp_path, 0, 2), WriterLock(tmp_path, 1, 2), \
            pytest.raises(CacheLockedError, match="different split"):
        WriterLock(tmp_path, 0, 3).acquire()


def test_lock_of_a_killed_process_frees_itself(tmp_path):
    code = ("import sys, time; from dskd.pipeline.cache.lock import WriterLock; "
            f"WriterLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError):
            WriterLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with WriterLock(tmp_path):  # no stale lock left behind
        pass


# --------------------------------------------------------------------------- lock objects (S3)


@pytest.fixture
def atomic_conditional_puts(monkeypatch):
    """moto checks a PUT's If-Match / If-None-Match and then writes, in two steps, so two
    requests in flight could both pass the check; S3 does both atomically. Make moto do so too
    (its server runs in this process), so these tests test dskd's protocol, not moto's."""
    from moto.s3.responses import S3Response

    serial = threading.Lock()
    put_object = S3Response.put_object

    def atomic_put_object(self, *a, **kw):
        with serial:
            return put_object(self, *a, **kw)

    monkeypatch.setattr(S3Response, "put_object", atomic_put_object)


def _expired_lock(fs, store) -> str:
    obj = store.path(LOCKS_DIR, "worker-00000-of-00001.lock")
    fs.pipe_file(obj, json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1,
                                  "expires": time.time() - 1}).encode())
    return obj


@pytest.mark.parametrize("stagger", [0.0, 0.3], ids=["together", "one-after-another"])
def test_racing_takeovers_of_an_expired_store_lock_have_exactly_one_winner(
        s3, atomic_conditional_puts, monkeypatch, stagger):
    """N writers all read the same expired lock before any of them writes (a barrier holds them
    there), then write at once or one after another: the takeover is a PUT conditional on the
    expired object's ETag, so one wins and the others are refused, naming the winner. (Delete
    then create-if-absent, the fallback, lets a late writer delete the winner's lock and win too.)"""
    n = 4
    url, fs = s3
    obj = _expired_lock(fs, Store(url + "/c"))
    assert conditional_writes(fs)
    gate = threading.Barrier(n, timeout=60)
    take_over = ObjectLock._take_over

    def take_over_together(self, etag):
        time.sleep(stagger * gate.wait())  # wait() returns 0..n-1, one index per thread
        return take_over(self, etag)

    monkeypatch.setattr(ObjectLock, "_take_over", take_over_together)
    said: list[str] = []
    locks = [ObjectLock(Store(url + "/c"), ttl=60, say=said.append) for _ in range(n)]
    results: list[object] = [None] * n

    def take(i: int) -> None:
        try:
            results[i] = locks[i].acquire()
        except CacheLockedError as e:
            results[i] = e

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    winners = [lk for lk, r in zip(locks, results) if r is lk]
    assert len(winners) == 1, results
    assert json.loads(fs.cat_file(obj))["owner"] == winners[0].owner
    holder = f"pid {os.getpid()} on {socket.gethostname()}"  # the winner, not the stale holder
    for r in results:
        if r is not winners[0]:
            assert isinstance(r, CacheLockedError) and holder in str(r), r
            assert "at the same moment" in str(r) and url + "/c" in str(r)
    assert len(said) == 1 and "taking over the stale writer lock of pid 1 on elsewhere" in said[0]
    assert winners[0]._refresh_once() and winners[0].lost is None
    winners[0].release()
    assert not fs.exists(obj)


def test_a_refresh_never_overwrites_a_lock_taken_over_meanwhile(s3, atomic_conditional_puts):
    """The holder reads its lock, then (paused past its expiry) another writer takes it over
    before the holder writes the new expiry: the refresh is conditional on the ETag it read, so
    it fails, the holder learns it lost the lock, and the successor's lock stands."""
    url, fs = s3
    first = ObjectLock(Store(url + "/c"), ttl=60).acquire()
    first._stop.set()  # no background refresh in this test
    obj = first._path(first.name)
    successor = json.dumps({"owner": "next", "host": "elsewhere", "pid": 7,
                            "expires": time.time() + 60}).encode()
    stat = first._stat

    def stat_then_taken_over(name):
        got = stat(name)
        fs.pipe_file(obj, successor)
        return got

    first._stat = stat_then_taken_over
    assert not first._refresh_once()
    assert fs.cat_file(obj) == successor
    first._stat = stat
    with pytest.raises(CacheLockedError, match="lost its lock .* to pid 7 on elsewhere"):
        first.check()
    first.release()  # not ours any more: left in place
    assert fs.cat_file(obj) == successor


def test_a_store_that_does_not_implement_if_match_falls_back(s3, monkeypatch):
    """An S3-compatible store answering 501 NotImplemented to If-Match: the expired lock is
    still taken over (delete, then create) and refreshed (plain PUT), as before conditional
    writes."""
    url, fs = s3
    store = Store(url + "/c")
    obj = _expired_lock(fs, store)
    pipe_file = type(fs).pipe_file

    def no_if_match(self, path, data, **kw):
        if "IfMatch" in kw:
            raise OSError(38, "A header you provided implies functionality that is not implemented")
        return pipe_file(self, path, data, **kw)

    monkeypatch.setattr(type(fs), "pipe_file", no_if_match)
    said: list[str] = []
    lock = ObjectLock(store, ttl=60, say=said.append).acquire()
    lock._stop.set()
    assert json.loads(fs.cat_file(obj))["owner"] == lock.owner and "taking over" in said[0]
    before = json.loads(fs.cat_file(obj))["expires"]
    time.sleep(0.01)
    assert lock._refresh_once() and lock.lost is None and len(said) == 1
    assert json.loads(fs.cat_file(obj))["expires"] > before
    lock.release()
    assert not fs.exists(obj)
