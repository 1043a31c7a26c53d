"""Caches in object storage, read side: a cache uploaded to a local S3 server reads, verifies
and streams exactly as the same cache on disk; errors name the URL and the fix."""

from __future__ import annotations

import numpy as np
import pytest

from dskd.pipeline.cache import remote
from dskd.pipeline.cache.inspect import inspect_cache
from dskd.pipeline.cache.reader import CacheReader, load_head
from dskd.pipeline.cache.remote import RemoteRows, Store
from dskd.pipeline.cache.spec import CacheError
from dskd.pipeline.cache.verify import verify_cache
from dskd.stages.cache_teacher import CacheTeacherConfig, run


@pytest.fixture(scope="module")
def disk_cache(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "cache"
    run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(toy_world.train), out=str(out),
                           limit=9, shard_size=4, top_k=8, hidden_dtype="fp8", progress=False))
    return out


def _upload(disk_cache, s3) -> str:
    url, fs = s3
    fs.put(str(disk_cache) + "/", url + "/cache/", recursive=True)
    return url + "/cache"


def test_a_cache_in_the_store_reads_like_the_same_cache_on_disk(disk_cache, s3, monkeypatch):
    url = _upload(disk_cache, s3)
    monkeypatch.setattr(remote, "READ_AHEAD", 1)
    local, far = CacheReader(disk_cache), CacheReader(url)
    assert far.store is not None and far.store.url == url
    assert isinstance(far._shard(0).arrays["hidden"], RemoteRows)  # streamed, not mirrored
    a, b = list(local), list(far)
    assert [x.example_id for x in a] == [x.example_id for x in b] and len(b) == 9
    for x, y in zip(a, b):
        for f in ("input_ids", "offsets", "hidden", "topk_ids", "topk_logprobs", "lse"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert not (far.path / "shards").exists()  # no shard data was copied to the local view
    # random access, a block boundary and the row-ranges the loader asks for
    ex = far.get(a[5].example_id)
    np.testing.assert_array_equal(ex.hidden, a[5].hidden)
    np.testing.assert_array_equal(far.read_rows(1, range(1, 3))[1].hidden, local.read_rows(1, range(1, 3))[1].hidden)
    assert {k: v.shape for k, v in load_head(url).items()} == {
        k: v.shape for k, v in load_head(disk_cache).items()}
    assert inspect_cache(url)["shards"] == inspect_cache(disk_cache)["shards"]


def test_remote_rows_fetch_ahead_and_slice_across_chunks(disk_cache, s3):
    url = _upload(disk_cache, s3)
    rows = CacheReader(url)._shard(0).arrays["topk_ids"]
    if not isinstance(rows, RemoteRows):
        pytest.skip("layout not streamed")
    full = np.asarray(CacheReader(disk_cache)._shard(0).arrays["topk_ids"][:])
    rows.chunk = 3  # pretend small inner chunks: reads cross chunk boundaries
    rows.n_chunks = -(-rows.shape[0] // 3)
    np.testing.assert_array_equal(rows[2:7], full[2:7])
    assert set(rows._fetching) <= set(range(3, 3 + remote.READ_AHEAD))  # the next chunk(s) only
    np.testing.assert_array_equal(rows[:], full)


def test_verify_in_the_store_finds_a_changed_object(disk_cache, s3):
    url = _upload(disk_cache, s3)
    assert verify_cache(url) == []
    _, fs = s3
    obj = url.removeprefix("s3://") + "/shards/shard-00001/examples.arrow"
    data = bytearray(fs.cat_file(obj))
    data[100] ^= 0xFF
    fs.pipe_file(obj, bytes(data))
    problems = verify_cache(url)
    assert any(p.shard == "shard-00001" and "crc32c" in p.message for p in problems)
    with pytest.raises(CacheError, match=r"s3://.*shard-00001 is corrupt.*verify --repair"):
        CacheReader(url, verify_checksums=True)._shard(1)


def test_store_errors_name_the_url_and_the_fix(s3, monkeypatch):
    url, _ = s3
    with pytest.raises(CacheError, match=r"no manifest.json"):
        CacheReader(url + "/nothing-here")
    with pytest.raises(CacheError, match=r"bucket 'dskd-no-such-bucket' does not exist.*create it"):
        CacheReader("s3://dskd-no-such-bucket/c")
    with pytest.raises(CacheError, match=r"credentials do not belong in the URL"):
        Store("s3://key:secret@bucket/c")
    import s3fs

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(CacheError, match=r"no usable credentials.*AWS_ACCESS_KEY_ID"):
        CacheReader(url + "/c")
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_missing_backend_package_is_named(monkeypatch):
    import importlib

    reg = importlib.import_module("fsspec.registry")  # as if s3fs were not installed
    monkeypatch.setitem(reg.known_implementations, "s3",
                        {"class": "s3fs_missing.S3FileSystem", "err": "Install s3fs to access S3"})
    monkeypatch.delitem(reg._registry, "s3", raising=False)
    with pytest.raises(CacheError, match=r"needs s3fs.*pip install 'dskd\[s3\]'"):
        Store("s3://bucket/c")


def test_file_urls_are_local_paths(disk_cache):
    r = CacheReader(f"file://{disk_cache}")
    assert r.store is None and r.path == disk_cache and len(r) == 9
