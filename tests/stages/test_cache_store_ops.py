"""The write paths of a cache in object storage (moto S3 on 127.0.0.1), beyond writing one:
`cache-teacher --overwrite` of a store cache made with another config (and a wipe killed half
way), `cache verify --repair` of a corrupted shard object and the rerun that rewrites only it,
`eval --cache` and `distill --valid-cache` from a store, and (slow) two job-array workers writing
one store URL at once. Every finished store is compared object by object with a fresh disk cache
of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dskd.cli import app
from dskd.pipeline.cache import spec
from dskd.pipeline.cache.reader import CacheReader
from dskd.pipeline.cache.remote import Store
from dskd.pipeline.cache.verify import verify_cache
from dskd.stages.cache_teacher import run as cache_run

from .test_cache_store import _cache_cfg, disk_tree, store_tree


@pytest.fixture(scope="module")
def disk_ref(toy_world, tmp_path_factory):
    """The reference: the default test config (3 shards of 4, 4, 2 examples) cached to disk."""
    out = tmp_path_factory.mktemp("store_ops") / "disk"
    cache_run(_cache_cfg(toy_world, str(out)))
    return out


def _cli_args(world, out: str, *extra: str, **kw) -> list[str]:
    c = _cache_cfg(world, out, **kw)
    return ["cache-teacher", "--teacher", c.teacher, "--data", c.data, "--out", out,
            "--limit", str(c.limit), "--shard-size", str(c.shard_size), "--top-k", str(c.top_k),
            "--batch-tokens", str(c.batch_tokens), "--no-progress", *extra]


def upload(disk, url: str, fs) -> None:
    """A disk cache copied into the store: the objects cache-teacher --out URL writes (the same
    bytes, test_cache_store.py shows), for the tests that start from a finished store cache."""
    root = url.split("://", 1)[1]
    fs.pipe({f"{root}/{rel}": data for rel, data in disk_tree(disk).items()})  # not locks/


def assert_same_as_disk(url: str, fs, disk) -> None:
    """The store holds exactly the disk cache's objects with the same bytes; config.yaml differs
    only by where it was written (and by --overwrite, or the worker split)."""
    far, near = store_tree(url, fs), disk_tree(disk)
    assert sorted(far) == sorted(near)
    assert {k for k in far if far[k] != near[k]} <= {"config.yaml"}
    skip = {"out": None, "overwrite": None, "num-workers": None, "worker-index": None}
    assert ({**yaml.safe_load(far["config.yaml"]), **skip}
            == {**yaml.safe_load(near["config.yaml"]), **skip})


def test_overwrite_replaces_a_store_cache_made_with_another_config(toy_world, s3, disk_ref):
    url, fs = s3
    c = url + "/c"
    cache_run(_cache_cfg(toy_world, c, shard_size=3))  # 4 shards: shard-00003 exists only here
    before = store_tree(c, fs)
    assert "shards/shard-00003/examples.arrow" in before

    r = CliRunner().invoke(app, _cli_args(toy_world, c))
    assert r.exit_code == 1
    msg = " ".join(r.output.split())
    assert f"{c} holds a cache made with a different configuration" in msg, msg
    assert "shard_size: cache has 3, this run has 4" in msg and "--overwrite" in msg
    assert store_tree(c, fs) == before  # a refusal touches nothing

    r = CliRunner().invoke(app, _cli_args(toy_world, c, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert_same_as_disk(c, fs, disk_ref)  # nothing of the old cache is left (shard-00003)
    assert verify_cache(c) == []


@pytest.mark.slow
def test_a_wipe_killed_after_the_manifest_delete_leaves_no_cache_then_a_rerun_rebuilds(
        toy_world, s3, disk_ref, tmp_path):
    """SIGKILL inside Store.wipe (--overwrite), right after the manifest was deleted: the shard
    objects and commit records are still in the store, yet no reader accepts them, not even one
    whose local view still holds the old manifest; the same cache-teacher command then rebuilds
    the cache from nothing."""
    url, fs = s3
    c = url + "/c"
    upload(disk_ref, c, fs)  # what cache-teacher writes there (test_cache_store.py)
    assert len(CacheReader(c)) == 10  # the view now holds the complete manifest
    script = ("import sys; from dskd.pipeline.cache.remote import Store\n"
              "s = Store(sys.argv[1]); s.pull(for_write=True); s.wipe()\n")
    env = dict(os.environ, DSKD_FAILPOINTS="store.wipe.manifest_deleted:1")
    p = subprocess.run([sys.executable, "-c", script, c], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == -9, p.stderr[-2000:]
    left = store_tree(c, fs)
    assert spec.MANIFEST not in left
    assert "commits/shard-00000.json" in left and "shards/shard-00000/examples.arrow" in left

    with pytest.raises(spec.CacheError, match=rf"{c}: no manifest.json.*cache-teacher"):
        CacheReader(c)
    problems = verify_cache(c)
    assert len(problems) == 1 and problems[0].field == spec.MANIFEST
    r = CliRunner().invoke(app, ["cache", "verify", c])
    assert r.exit_code == 1 and "no manifest.json" in r.output
    r = CliRunner().invoke(app, ["distill", "--cache", c, "--student", str(toy_world.student),
                                 "--out", str(tmp_path / "d"), "--max-steps", "1"])
    assert r.exit_code != 0 and "no manifest.json" in " ".join(r.output.split())

    cache_run(_cache_cfg(toy_world, c))  # the same command, without --overwrite: from nothing
    assert_same_as_disk(c, fs, disk_ref)


def test_verify_repair_in_the_store_rewrites_only_the_corrupt_shard(toy_world, s3, disk_ref,
                                                                    monkeypatch):
    """One byte of a shard object flipped in the store: `cache verify` names the shard and exits
    1; `--repair` un-commits it (an incomplete manifest, its commit record deleted); the same
    cache-teacher command then uploads that shard alone (the others' objects keep their
    LastModified) and the store equals the disk cache again."""
    url, fs = s3
    c = url + "/c"
    root = c.removeprefix("s3://")
    upload(disk_ref, c, fs)
    bad = f"{root}/shards/shard-00001/examples.arrow"
    data = bytearray(fs.cat_file(bad))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(bad, bytes(data))

    r = CliRunner().invoke(app, ["cache", "verify", c])
    assert r.exit_code == 1
    out = " ".join(r.output.split())
    assert "shard-00001/examples.arrow: crc32c mismatch" in out and f"verify --repair {c}" in out
    assert "BAD shard-00000" not in out and "BAD shard-00002" not in out

    r = CliRunner().invoke(app, ["cache", "verify", "--repair", c])
    assert r.exit_code == 1 and "un-committed 1 shard(s): shard-00001" in r.output
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/commits/shard-00001.json")
    assert fs.exists(f"{root}/commits/shard-00000.json") and fs.exists(f"{root}/commits/shard-00002.json")
    assert json.loads(fs.cat_file(f"{root}/{spec.MANIFEST}"))["complete"] is False
    with pytest.raises(spec.CacheError):  # a reader no longer sees shard 1 at all
        CacheReader(c).read_rows(1, range(1))
    stamps = {k: v["LastModified"] for k, v in fs.find(root + "/shards", detail=True).items()
              if "/shard-00001/" not in k}

    published: list[str] = []
    publish = Store.publish_shard
    monkeypatch.setattr(Store, "publish_shard",
                        lambda self, rec: (published.append(rec["name"]), publish(self, rec))[1])
    r = CliRunner().invoke(app, _cli_args(toy_world, c))
    assert r.exit_code == 0, r.output
    assert published == ["shard-00001"]
    fs.invalidate_cache()
    assert {k: v["LastModified"] for k, v in fs.find(root + "/shards", detail=True).items()
            if "/shard-00001/" not in k} == stamps
    assert_same_as_disk(c, fs, disk_ref)
    assert CliRunner().invoke(app, ["cache", "verify", c]).exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("how", ["one-host", "two-hosts", "torchrun"])
def test_two_writers_of_one_store_at_once_make_the_one_process_cache(toy_world, s3, tmp_path,
                                                                      how):
    """Two writers started at once on one store URL (5 shards, taken alternately) share the
    cache's start, commit their own shards, the last to finish writes the complete manifest, and
    the store holds the bytes of one process's disk cache. Job-array workers (`--num-workers 2
    --worker-index 0|1`), "one-host": with one $DSKD_STORE_CACHE (they once shared a view dir, and
    one worker's pull deleted the other's commit record before its upload: "uploading shard …
    not found"); "two-hosts": each its own, as on two machines. "torchrun": two ranks."""
    url, fs = s3
    c = url + "/c"
    disk = tmp_path / "disk"
    cache_run(_cache_cfg(toy_world, str(disk), shard_size=2))
    if how == "torchrun":
        torchrun = Path(sys.executable).with_name("torchrun")
        p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m",
                            "dskd.cli", *_cli_args(toy_world, c, shard_size=2)],
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                           text=True, timeout=600, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        assert_same_as_disk(c, fs, disk)
        assert verify_cache(c) == []
        return
    procs = []
    for w in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if how == "two-hosts":
            env["DSKD_STORE_CACHE"] = str(tmp_path / f"views-{w}")
        args = _cli_args(toy_world, c, "--num-workers", "2", "--worker-index", str(w),
                         shard_size=2)
        procs.append(subprocess.Popen([sys.executable, "-m", "dskd.cli", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    views = [tmp_path / "store-views"] if how == "one-host" else [tmp_path / "views-0",
                                                                  tmp_path / "views-1"]
    assert not [p.name for v in views for p in v.iterdir() if "-w" in p.name]  # scratch: gone
    if how == "one-host":  # a worker rerun on the finished cache: nothing to do, no view left
        cache_run(_cache_cfg(toy_world, c, shard_size=2, num_workers=2, worker_index=1))
        assert not [p.name for p in views[0].iterdir() if "-w" in p.name]
    assert_same_as_disk(c, fs, disk)
    assert verify_cache(c) == []


def test_eval_cache_and_distill_valid_cache_from_a_store_equal_the_same_from_disk(
        toy_world, s3, disk_ref, tmp_path):
    """`dskd eval --cache s3://…` (fidelity of a student to the held-out teacher cache) and
    `dskd distill --valid-cache s3://…` (the validation loss) give the numbers they give from
    the same cache on disk."""
    from dskd.pipeline.train.logger import read_metrics
    from dskd.stages.distill import DistillConfig
    from dskd.stages.distill import run as distill_run

    url, fs = s3
    valid = {"data": str(toy_world.valid), "limit": 6}  # 2 shards of 4 and 2 examples
    cache_run(_cache_cfg(toy_world, str(tmp_path / "valid"), **valid))
    upload(tmp_path / "valid", url + "/valid", fs)

    fid = {}
    for where, cache in (("disk", str(tmp_path / "valid")), ("s3", url + "/valid")):
        r = CliRunner().invoke(app, ["eval", "--model", str(toy_world.student), "--cache", cache,
                                     "--no-generate", "--out", str(tmp_path / f"eval_{where}")])
        assert r.exit_code == 0, r.output
        fid[where] = json.loads((tmp_path / f"eval_{where}" / "results.json").read_text())["fidelity"]
    assert fid["s3"] == fid["disk"]
    assert fid["s3"]["student"]["examples"] == 6 and fid["s3"]["student"]["kl"] > 0

    common = {"student": str(toy_world.student), "cache": str(disk_ref), "batch_size": 4,
              "max_steps": 2, "eval_interval": 2, "save_interval": 1000, "num_workers": 0,
              "log_interval": 1, "tensorboard": False, "seed": 3, "method": "dskd"}
    evals = {}
    for where, cache in (("disk", str(tmp_path / "valid")), ("s3", url + "/valid")):
        distill_run(DistillConfig(out=str(tmp_path / f"d_{where}"), valid_cache=cache, **common))
        evals[where] = [r for r in read_metrics(tmp_path / f"d_{where}") if "valid_loss" in r]
    assert [r["step"] for r in evals["s3"]] == [2]
    assert [r["valid_loss"] for r in evals["s3"]] == [r["valid_loss"] for r in evals["disk"]]
    assert yaml.safe_load((tmp_path / "d_s3" / "config.yaml").read_text())["valid-cache"] == url + "/valid"


def test_a_gcs_cache_is_written_verified_and_read_like_a_disk_cache(toy_world, gcs, disk_ref):
    """gs:// through gcsfs against a GCS emulator (skipped without gcsfs and
    gcp-storage-emulator): cache-teacher → the disk cache's objects and bytes; verify clean;
    read back row for row. The emulator has no conditional writes, so the writer lock takes the
    fallback path (docs/cache-format.md §7.1)."""
    import numpy as np

    url, fs = gcs
    c = url + "/c"
    cache_run(_cache_cfg(toy_world, c))
    assert_same_as_disk(c, fs, disk_ref)
    assert verify_cache(c) == []
    r = CliRunner().invoke(app, ["cache", "verify", c])
    assert r.exit_code == 0 and f"OK: {c}" in r.output
    near, far = list(CacheReader(disk_ref)), list(CacheReader(c))
    assert [x.example_id for x in far] == [x.example_id for x in near] and len(far) == 10
    for x, y in zip(near, far):
        for f in ("input_ids", "hidden", "topk_ids", "topk_logprobs", "lse"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
