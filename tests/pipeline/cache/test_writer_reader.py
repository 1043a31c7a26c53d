"""Writer → reader round trip on synthetic shards: every field back, in order, by id, by position."""

import numpy as np
import pyarrow as pa
import pytest

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.reader import CacheReader, load_head
from dskd.pipeline.cache.spec import CacheError
from dskd.pipeline.cache.writer import ShardLayout, ShardWriter


def _assert_same(got, row, hidden, hidden_dtype, top_k):
    assert got.example_id == row.example_id and got.index == row.index
    assert (got.prompt, got.response) == (row.prompt, row.response)
    np.testing.assert_array_equal(got.input_ids, row.input_ids)
    assert got.prompt_len == row.prompt_len
    np.testing.assert_array_equal(got.response_mask, np.arange(len(row.input_ids)) >= row.prompt_len)
    np.testing.assert_array_equal(got.offsets, np.asarray(row.offsets))
    for name in ("lse", "tail_logprob", "next_logprob"):
        np.testing.assert_array_equal(getattr(got, name), row.tokens[name])
    if top_k:
        np.testing.assert_array_equal(got.topk_ids, row.tokens["topk_ids"])
        np.testing.assert_array_equal(got.topk_logprobs, row.tokens["topk_logprobs"])
    else:
        assert got.topk_ids is None
    assert got.hidden.dtype == np.float32 and got.hidden.shape == hidden.shape
    tol = {"fp16": 2e-3, "bf16": 1e-2, "fp8": 7e-2}[hidden_dtype]
    np.testing.assert_allclose(got.hidden, hidden, rtol=tol, atol=tol * np.abs(hidden).max())


@pytest.mark.parametrize("hidden_dtype,top_k", [("fp16", 4), ("bf16", 4), ("fp8", 4), ("fp16", 0)])
def test_round_trip_every_field(make_cache, hidden_dtype, top_k):
    out, rows, hiddens = make_cache(hidden_dtype=hidden_dtype, top_k=top_k)
    r = CacheReader(out)
    got = list(r)
    assert len(got) == len(r) == len(rows)
    for g, row, h in zip(got, rows, hiddens):
        _assert_same(g, row, h, hidden_dtype, top_k)
    m = load_manifest(out)
    assert m["complete"] and m["totals"]["n_examples"] == len(rows)
    assert m["totals"]["n_rows"] == sum(len(x.input_ids) - 1 for x in rows)


def test_positions_subsets_and_random_access(synthetic_cache):
    out, rows, _ = synthetic_cache
    r = CacheReader(out, fields=["lse"])
    every = list(r)
    assert [(e.shard, e.row) for e in every][:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0)]
    assert every[0].hidden is None and every[0].lse is not None
    # resume from a saved (shard, row) position gives exactly the rest
    rest = list(r.iter_examples(start=(2, 3)))
    assert [e.example_id for e in rest] == [e.example_id for e in every[13:]]
    # ranks split shards round-robin, and together they cover everything once
    parts = [[e.example_id for e in r.iter_examples(r.shard_indices(k, 2))] for k in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(x.example_id for x in rows)
    assert not set(parts[0]) & set(parts[1])
    # random access by id and by position
    assert r.get("ex0017").index == 17
    assert r.at(3, 2).example_id == "ex0017"
    with pytest.raises(KeyError, match="ex9999"):
        r.get("ex9999")
    # blocks: public bounds, and a block read returns the same rows as one-by-one reads
    bounds = r.block_bounds(2)
    assert bounds[0] == 0 and bounds[-1] == 5 and (np.diff(bounds) > 0).all()
    first, block = r.read_block(2, 3, bounds)
    assert [e.example_id for e in block] == [r.at(2, i).example_id for i in range(first, first + len(block))]
    assert any(e.row == 3 for e in block)


def test_arrow_columns_are_memory_mapped_zero_copy(synthetic_cache):
    out, _, _ = synthetic_cache
    r = CacheReader(out, fields=[])
    e = next(iter(r))
    # the ids array is a view into the mmapped file, not an owned copy
    assert not e.input_ids.flags.owndata and not e.input_ids.flags.writeable
    f = out / spec.SHARDS_DIR / "shard-00000" / spec.EXAMPLES_FILE
    assert pa.ipc.open_file(pa.memory_map(str(f))).schema.names == list(spec.EXAMPLE_COLUMNS)


def test_writer_refuses_bad_rows_and_partial_commits(tmp_path, make_cache):
    out, rows, _ = make_cache(commit=[])
    lay = ShardLayout.from_manifest(load_manifest(out))
    w = ShardWriter(out, 0, (0, 5), lay, fsync=False)
    with pytest.raises(CacheError, match="outside"):
        w.add(rows[7])
    bad = rows[0]
    bad.tokens = dict(bad.tokens, lse=bad.tokens["lse"][:-1])
    with pytest.raises(CacheError, match="'lse'"):
        w.add(bad)
    w.add(rows[1])
    with pytest.raises(CacheError, match=r"examples \[0, 2, 3, 4\] were never added"):
        w.commit()
    assert not (out / spec.SHARDS_DIR / "shard-00000").exists()


def test_incomplete_cache_is_refused_by_default(make_cache):
    out, _, _ = make_cache(commit=[0, 2])
    assert not load_manifest(out)["complete"]
    with pytest.raises(CacheError, match="2 of 5 shards committed"):
        CacheReader(out)
    r = CacheReader(out, allow_incomplete=True)
    assert [s["index"] for s in r.shards] == [0, 2] and len(r) == 10


@pytest.mark.parametrize("hidden_dtype", ["bf16", "fp8"])
def test_memory_mapped_arrays_equal_the_zarr_path(make_cache, hidden_dtype):
    """The fast path (np.memmap of the shard files) and zarr-python read the same values."""
    out, _, _ = make_cache(hidden_dtype=hidden_dtype)
    fast, slow = CacheReader(out), CacheReader(out, use_mmap=False)
    a, b = list(fast), list(slow)
    sh = fast._shard(0)
    assert isinstance(sh.arrays["hidden"], np.memmap) and isinstance(sh.arrays["lse"], np.memmap)
    assert not isinstance(slow._shard(0).arrays["hidden"], np.ndarray)  # a zarr.Array
    for x, y in zip(a, b):
        for f in ("hidden", "topk_ids", "topk_logprobs", "lse", "tail_logprob", "next_logprob"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_unknown_field_and_head(synthetic_cache):
    out, _, _ = synthetic_cache
    with pytest.raises(CacheError, match="unknown cache field"):
        CacheReader(out, fields=["logits"])
    head = load_head(out)
    assert head[spec.HEAD_WEIGHT].shape == (50, 16)
    assert head[spec.EMBED_WEIGHT] is head[spec.HEAD_WEIGHT]  # tied: stored once


@pytest.mark.filterwarnings("ignore:Object at examples.arrow")  # zarr lists the Arrow file too
@pytest.mark.parametrize("hidden_dtype", ["fp16", "fp8"])
def test_shard_files_are_byte_identical_to_zarr_pythons(make_cache, tmp_path, hidden_dtype):
    """The writer writes Zarr shard files itself (one sequential write); zarr-python writing the
    same arrays with the same metadata must produce the very same bytes."""
    import zarr
    from zarr.storage import LocalStore

    out, _, _ = make_cache(hidden_dtype=hidden_dtype, top_k=3)
    shard = out / spec.SHARDS_DIR / "shard-00002"
    ours = zarr.open_group(str(shard), mode="r", zarr_format=3)
    theirs = zarr.open_group(LocalStore(tmp_path / "z"), mode="w", zarr_format=3)
    names = sorted(ours.array_keys())
    assert {"hidden", "topk_ids", spec.TOKEN_OFFSETS} <= set(names)
    for name in names:
        a = ours[name]
        b = theirs.create_array(name, shape=a.shape, dtype=a.dtype, chunks=a.chunks,
                                shards=a.shards, compressors=None, fill_value=0,
                                config={"write_empty_chunks": True})
        b[...] = a[...]
        key = "c/" + "/".join("0" * a.ndim)
        assert (shard / name / key).read_bytes() == (tmp_path / "z" / name / key).read_bytes(), name
