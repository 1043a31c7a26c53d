"""Manifest, commit records and the start/resume/refuse rules of a cache dir."""

import json

import pytest

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.manifest import (
    finalize,
    fingerprint_diff,
    load_commits,
    load_manifest,
    save_manifest,
)
from dskd.pipeline.cache.store import CacheMismatchError, discard_uncommitted, resumable_manifest


def test_fingerprint_diff_names_each_field():
    a = {"teacher_weights": "aaa", "top_k": 64, "dataset": "x"}
    b = {"teacher_weights": "aaa", "top_k": 16, "dataset": "y", "new": 1}
    diff = fingerprint_diff(a, b)
    assert [d.split(":")[0] for d in diff] == ["top_k", "dataset", "new"]
    assert "cache has 64, this run has 16" in diff[0]
    assert fingerprint_diff(a, dict(a)) == []


def test_finalize_waits_for_every_shard_and_is_deterministic(make_cache):
    out, _, _ = make_cache(commit=[0, 1, 3])
    assert finalize(out) is None and not load_manifest(out)["complete"]
    assert sorted(load_commits(out)) == [0, 1, 3]
    out2, _, _ = make_cache(name="full")
    m = load_manifest(out2)
    assert m["complete"] and [s["index"] for s in m["shards"]] == list(range(5))
    assert m["totals"]["bytes"] == sum(s["bytes"] for s in m["shards"])
    before = (out2 / spec.MANIFEST).read_bytes()
    finalize(out2)  # a second finalizer (another worker) changes nothing
    assert (out2 / spec.MANIFEST).read_bytes() == before


def test_version_and_format_are_checked(synthetic_cache):
    out, _, _ = synthetic_cache
    m = load_manifest(out)
    save_manifest(out, m | {"format_version": 99})
    with pytest.raises(spec.CacheError, match="format version 99"):
        load_manifest(out)
    (out / spec.MANIFEST).write_text("{not json")
    with pytest.raises(spec.CacheError, match="not valid JSON"):
        load_manifest(out)


def test_resume_rules(synthetic_cache, tmp_path):
    out, _, _ = synthetic_cache
    fps = load_manifest(out)["fingerprints"]
    assert resumable_manifest(out, fps, overwrite=False)["complete"]
    with pytest.raises(CacheMismatchError, match=r"top_k: cache has 4, this run has 8.*--overwrite"):
        resumable_manifest(out, fps | {"top_k": 8}, overwrite=False)
    assert resumable_manifest(out, fps | {"top_k": 8}, overwrite=True) is None
    assert not (out / spec.MANIFEST).exists() and not (out / spec.SHARDS_DIR).exists()
    assert resumable_manifest(tmp_path / "new", fps, overwrite=False) is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(spec.CacheError, match="thesis.tex"):
        resumable_manifest(tmp_path / "mine", fps, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_discard_uncommitted_touches_only_the_given_uncommitted_shards(make_cache):
    out, _, _ = make_cache(commit=[0])
    for name in ("shard-00001", "shard-00002"):
        (out / spec.SHARDS_DIR / name).mkdir(parents=True)  # renamed in, never committed
    (out / spec.TMP_DIR / "shard-00001.1234").mkdir(parents=True)  # died mid-write
    removed = discard_uncommitted(out, [0, 1], load_commits(out))
    assert sorted(removed) == ["shards/shard-00001", "tmp/shard-00001.1234"]
    assert (out / spec.SHARDS_DIR / "shard-00000").is_dir()  # committed: kept
    assert (out / spec.SHARDS_DIR / "shard-00002").is_dir()  # another worker's: not ours
    rec = json.loads((out / spec.COMMITS_DIR / "shard-00000.json").read_text())
    assert rec["n_examples"] == 5 and set(rec["files"]) >= {"examples.arrow", "hidden/c/0/0"}
