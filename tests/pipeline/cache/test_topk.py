"""Compact top-k (format version 2): narrow ids, q8/fp16 log-probs, and version-1 caches still read."""

from pathlib import Path

import numpy as np
import pytest

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.inspect import format_inspect, inspect_cache
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.reader import CacheReader
from dskd.pipeline.cache.topk import (
    decode_ids,
    decode_logprobs,
    encode_ids,
    encode_logprobs,
    logprob_tolerance,
)
from dskd.pipeline.cache.verify import verify_cache

V1_CACHE = Path(__file__).parent / "data" / "v1-cache"


@pytest.mark.parametrize("V,bits,hi_bytes", [(50, 16, 0), (65536, 16, 0), (65537, 17, 8),
                                             (131072, 17, 8), (151936, 18, 16), (1 << 20, 20, 32)])
def test_ids_take_the_narrowest_type_and_round_trip(V, bits, hi_bytes):
    st = spec.TopkStorage.for_vocab(V, "q8")
    assert st.id_bits == bits and st.hi_bytes(64) == hi_bytes
    rng = np.random.default_rng(V)
    ids = rng.integers(0, V, (37, 64)).astype(np.int32)
    ids[0, :2] = [0, V - 1]  # both ends of the vocabulary
    enc = encode_ids(ids, st)
    assert enc["topk_ids"].dtype == np.uint16
    assert ("topk_ids_hi" in enc) == (hi_bytes > 0)
    if hi_bytes:
        assert enc["topk_ids_hi"].shape == (37, hi_bytes)
    back = decode_ids(enc["topk_ids"], enc.get("topk_ids_hi"), st)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, ids)
    with pytest.raises(spec.CacheError, match="outside"):
        encode_ids(np.array([[1 << bits]]), st)


def _rows(n: int = 400, V: int = 2000, k: int = 64, seed: int = 0) -> np.ndarray:
    """Sorted top-k log-probs of peaked and flat rows, like a real teacher's."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, V)) * 2.0
    for i in range(n):
        z[i, rng.choice(V, rng.integers(1, 20), replace=False)] += rng.uniform(2, 14)
    z /= np.exp(rng.uniform(np.log(0.3), np.log(1.5), (n, 1)))
    lp = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    return -np.sort(-lp, axis=1)[:, :k].astype(np.float32)


@pytest.mark.parametrize("dtype", ["q8", "fp16", "fp32"])
def test_log_probs_decode_within_their_tolerance_keeping_order_and_padding(dtype):
    lp = _rows(200)
    lp[3, 60:] = -np.inf  # padding slots
    lp[4, :] = -np.inf  # a row of padding only
    lp[5, :] = -0.5  # a flat row (hi == lo)
    enc = encode_logprobs(lp, dtype)
    assert enc["topk_logprobs"].dtype == {"q8": np.uint8, "fp16": np.float16, "fp32": np.float32}[dtype]
    bounds = enc.get("topk_logprob_bounds")
    back = decode_logprobs(enc["topk_logprobs"], dtype, bounds)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(np.isinf(back), np.isinf(lp))
    fin = np.isfinite(lp)
    err = np.where(fin, np.abs(back - np.where(fin, lp, 0)), 0)
    tol = logprob_tolerance(dtype, bounds, np.where(fin, lp, 0))
    assert (err <= tol).all()
    assert (np.diff(np.where(fin, back, -1e30), axis=1) <= 0).all()  # still sorted
    if dtype == "q8":
        assert err.max() > 1e-4  # it is lossy: the test above would catch a looser decode


def _rebuilt(lp: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """The bucket-rule target (k ids + one tail bucket) renormalised, as distill rebuilds it."""
    lw = np.concatenate([lp, tail[:, None]], 1).astype(np.float64)
    m = lw.max(1, keepdims=True)
    return lw - m - np.log(np.exp(lw - m).sum(1, keepdims=True))


def test_extra_kl_of_the_rebuilt_target_is_far_below_1e_4_nats():
    lp = _rows(400)
    tail = np.log1p(-np.exp(lp.astype(np.float64)).sum(1).clip(max=1 - 1e-12))
    ref = _rebuilt(lp, tail)
    for dtype, goal in (("q8", 1e-4), ("fp16", 1e-6)):
        enc = encode_logprobs(lp, dtype)
        new = _rebuilt(decode_logprobs(enc["topk_logprobs"], dtype, enc.get("topk_logprob_bounds")), tail)
        kl = (np.exp(ref) * (ref - new)).sum(1)
        assert kl.mean() < goal / 4 and kl.max() < goal, (dtype, kl.mean(), kl.max())


@pytest.mark.parametrize("topk_logprobs", ["q8", "fp16"])
def test_compact_cache_round_trips_verifies_and_is_smaller(make_cache, topk_logprobs):
    old, _, _ = make_cache("v1", top_k=8)
    out, rows2, _ = make_cache("compact", top_k=8, topk_logprobs=topk_logprobs)
    lay = load_manifest(out)["layout"]
    assert lay["topk_id_bits"] == 16 and lay["topk_logprob_dtype"] == topk_logprobs
    got = list(CacheReader(out))
    for g, row in zip(got, rows2):
        np.testing.assert_array_equal(g.topk_ids, row.tokens["topk_ids"])
        lp = row.tokens["topk_logprobs"]
        tol = 2e-3 if topk_logprobs == "fp16" else (lp[:, :1] - lp[:, -1:]) / 254 + 2e-3
        assert (np.abs(g.topk_logprobs - lp) <= tol).all()
    assert verify_cache(out) == []
    info = inspect_cache(out)
    assert info["topk_storage"] == {"id_bits": 16, "logprobs": topk_logprobs}
    assert f"16-bit ids, {topk_logprobs} log-probs" in format_inspect(info)
    small, big = info["bytes_per_token"], inspect_cache(old)["bytes_per_token"]
    assert small["topk_ids"] < big["topk_ids"] and small["topk_logprobs"] < big["topk_logprobs"]


def test_verify_still_catches_a_disagreeing_next_logprob_in_a_q8_cache(make_cache):
    out, _, _ = make_cache(top_k=50, topk_logprobs="q8")  # k = V: the next token is always there
    m = load_manifest(out)
    rec = m["shards"][0]
    f = out / spec.SHARDS_DIR / rec["name"] / "next_logprob" / "c" / "0"
    a = np.fromfile(f, "<f4")
    a[0] -= 0.5  # far beyond one q8 step of this row
    a.tofile(f)
    probs = verify_cache(out, checksums=False)
    assert any(p.field == "next_logprob" and "disagrees" in p.message for p in probs), probs


def test_a_version_1_cache_written_by_the_old_code_still_reads(rows_of):
    """tests/pipeline/cache/data/v1-cache was written by dskd before format version 2 (int32 ids,
    float32 log-probs, format_version 1): build_synthetic_cache(n_examples=7, shard_size=4, D=8,
    V=50, top_k=4, seed=3) of that version."""
    m = load_manifest(V1_CACHE)
    assert m["format_version"] == 1 and "topk_logprob_dtype" not in m["layout"]
    rows, hiddens = rows_of(7, 8, 50, "fp16", 4, seed=3)
    got = list(CacheReader(V1_CACHE))
    assert [g.example_id for g in got] == [r.example_id for r in rows]
    for g, row, h in zip(got, rows, hiddens):
        np.testing.assert_array_equal(g.topk_ids, row.tokens["topk_ids"])
        np.testing.assert_array_equal(g.topk_logprobs, row.tokens["topk_logprobs"])
        np.testing.assert_array_equal(g.next_logprob, row.tokens["next_logprob"])
        np.testing.assert_allclose(g.hidden, h, rtol=2e-3, atol=2e-3 * np.abs(h).max())
    # the fixture's rows are random (tail -0.5, log-probs no head explains): the only problem
    # verify may find is the tail mass, on every shard; nothing about the version-1 layout
    problems = verify_cache(V1_CACHE)
    assert {(p.shard, p.field) for p in problems} == {(s["name"], "tail_logprob")
                                                      for s in m["shards"]}
    info = inspect_cache(V1_CACHE)
    assert info["format_version"] == 1 and info["topk_storage"] == {"id_bits": 32, "logprobs": "fp32"}
    assert info["dtypes"]["topk_ids"] == "int32"


def test_packed_high_id_bits_round_trip_through_writer_reader_and_verify(make_cache):
    """V = 70,000 needs 17-bit ids: uint16 low bits + one packed high bit per id."""
    out, rows, _ = make_cache(n_examples=6, shard_size=3, V=70_000, top_k=8, topk_logprobs="q8")
    lay = load_manifest(out)["layout"]
    assert lay["topk_id_bits"] == 17 and "topk_ids_hi" in lay["token_fields"]
    got = list(CacheReader(out, fields=["topk_ids"]))
    assert any((r.tokens["topk_ids"] >= 1 << 16).any() for r in rows)  # the high bit is used
    for g, row in zip(got, rows):
        np.testing.assert_array_equal(g.topk_ids, row.tokens["topk_ids"])
    assert verify_cache(out) == []
    assert inspect_cache(out)["bytes_per_token"]["topk_ids_hi"] > 0
