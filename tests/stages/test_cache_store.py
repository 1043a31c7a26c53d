"""Caches in object storage, end to end against a real S3-compatible server (moto, on
127.0.0.1): cache-teacher → verify → distill with s3:// URLs, the same bytes as on disk object
by object, the writer lock, no credentials in anything written, and (slow) a writer killed
between a shard's upload and its commit record, then resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.lock import CacheLockedError, ObjectLock
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.remote import Store
from dskd.pipeline.cache.verify import verify_cache
from dskd.pipeline.train.logger import read_metrics
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run
from dskd.stages.distill import DistillConfig
from dskd.stages.distill import run as distill_run

from ..conftest import S3_SECRET

N, SHARD = 10, 4  # 3 shards, the last one short


def _cache_cfg(world, out: str, **kw) -> CacheTeacherConfig:
    base = {"teacher": str(world.teacher), "data": str(world.train), "out": out, "limit": N,
            "shard_size": SHARD, "top_k": 8, "batch_tokens": 2048, "progress": False}
    return CacheTeacherConfig(**(base | kw))


def store_tree(url: str, fs) -> dict[str, bytes]:
    """Every object under the URL (bytes), except locks."""
    root = url.split("://", 1)[1]
    fs.invalidate_cache()  # another process changed the bucket since this fs last listed it
    return {k[len(root) + 1:]: fs.cat_file(k) for k in sorted(fs.find(root))
            if not k[len(root) + 1:].startswith(spec.LOCKS_DIR + "/")}


def disk_tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.relative_to(d).parts[0] != spec.LOCKS_DIR}


def test_store_cache_equals_disk_cache_verifies_and_distills_the_same(toy_world, s3, tmp_path,
                                                                      capfd):
    url, fs = s3
    disk = tmp_path / "disk"
    cache_run(_cache_cfg(toy_world, str(disk)))
    assert cache_run(_cache_cfg(toy_world, url + "/train")) == url + "/train"

    # object by object, the same bytes; config.yaml differs only by where it was written
    far, near = store_tree(url + "/train", fs), disk_tree(disk)
    assert sorted(far) == sorted(near) and len(far) > 20
    assert {k for k in far if far[k] != near[k]} == {"config.yaml"}
    assert ({**yaml.safe_load(far["config.yaml"]), "out": None}
            == {**yaml.safe_load(near["config.yaml"]), "out": None})
    assert load_manifest(url + "/train")["complete"]
    assert verify_cache(url + "/train") == []

    # distill from the store (a DataLoader worker streams it) = distill from disk
    common = {"student": str(toy_world.student), "batch_size": 4, "max_steps": 2,
              "eval_interval": 1000, "save_interval": 1000, "num_workers": 1, "log_interval": 1,
              "tensorboard": False, "seed": 3, "method": "dskd"}
    distill_run(DistillConfig(out=str(tmp_path / "d_disk"), cache=str(disk), **common))
    distill_run(DistillConfig(out=str(tmp_path / "d_s3"), cache=url + "/train", **common))
    losses = [[r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r]
              for d in ("d_disk", "d_s3")]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    assert yaml.safe_load((tmp_path / "d_s3" / "config.yaml").read_text())["cache"] == url + "/train"

    # no credentials in anything written or printed
    out, err = capfd.readouterr()
    written = [*far.values(), (tmp_path / "d_s3" / "config.yaml").read_bytes(),
               *(p.read_bytes() for p in (Path(os.environ["DSKD_STORE_CACHE"])).rglob("*")
                 if p.is_file())]
    assert not any(S3_SECRET.encode() in b for b in written)
    assert S3_SECRET not in out + err


def test_store_lock_refuses_a_second_writer_and_takes_over_an_expired_one(s3):
    url, fs = s3
    store = Store(url + "/c")
    said = []
    with ObjectLock(store, ttl=60) as first:
        with pytest.raises(CacheLockedError, match=r"already being written by pid \d+ on .*wait"):
            ObjectLock(store, ttl=60).acquire()
        with pytest.raises(CacheLockedError, match="different split"):
            ObjectLock(store, 0, 2, ttl=60).acquire()
        obj = store.path(spec.LOCKS_DIR, first.name)
        info = json.loads(fs.cat_file(obj))
        assert info["owner"] == first.owner and info["expires"] > time.time()
        fs.pipe_file(obj, json.dumps(info | {"expires": time.time() - 1, "host": "elsewhere"}).encode())
        with ObjectLock(store, ttl=60, say=said.append) as second:  # the first one stopped refreshing
            assert "taking over the stale writer lock of pid" in said[0]
            first._refresh_once()
            with pytest.raises(CacheLockedError, match="lost its lock"):
                first.check()
        assert not fs.exists(obj)  # released by its holder
    assert second.lost is None


@pytest.mark.slow
def test_writer_killed_between_upload_and_commit_record_then_resumed(toy_world, s3, tmp_path):
    """SIGKILL right after shard 1's objects are uploaded, before its commit record: the rerun
    (same command) takes over the dead writer's lock, rewrites shard 1 and finishes with the
    bytes of an uninterrupted run."""
    url, fs = s3
    disk = tmp_path / "disk"
    cache_run(_cache_cfg(toy_world, str(disk)))
    script = tmp_path / "run_cache.py"
    script.write_text(
        "import sys\nfrom dskd.stages.cache_teacher import CacheTeacherConfig, run\n"
        f"run(CacheTeacherConfig(teacher={str(toy_world.teacher)!r}, data={str(toy_world.train)!r},"
        f" out=sys.argv[1], limit={N}, shard_size={SHARD}, top_k=8, batch_tokens=2048,"
        " progress=False))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", DSKD_FAILPOINTS="shard.uploaded:2")
    p = subprocess.run([sys.executable, str(script), url + "/c"], env=env, capture_output=True, check=False,
                       text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    objects = store_tree(url + "/c", fs)
    assert "shards/shard-00001/examples.arrow" in objects  # uploaded ...
    assert "commits/shard-00001.json" not in objects  # ... but never committed
    assert "commits/shard-00000.json" in objects and spec.MANIFEST in objects
    assert not json.loads(objects[spec.MANIFEST])["complete"]
    # the dead writer's lock object is still there (no one deleted it)
    assert fs.exists(url.removeprefix("s3://") + f"/c/{spec.LOCKS_DIR}/worker-00000-of-00001.lock")
    del env["DSKD_FAILPOINTS"]
    p = subprocess.run([sys.executable, str(script), url + "/c"], env=env, capture_output=True, check=False,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "taking over the stale writer lock of pid" in p.stderr
    far, near = store_tree(url + "/c", fs), disk_tree(disk)
    assert {k for k in far if far.get(k) != near.get(k)} | set(near) - set(far) == {"config.yaml"}
    assert verify_cache(url + "/c") == []
