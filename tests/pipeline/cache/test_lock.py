"""Writer locks: one writer per slot, no mixed splits, freed when the holder dies (even SIGKILL)."""

import os
import signal
import subprocess
import sys

import pytest

from dskd.pipeline.cache.lock import CacheLockedError, WriterLock


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
