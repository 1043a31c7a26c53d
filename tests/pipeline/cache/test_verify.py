"""`verify` names every bad shard and what is wrong with it."""

import numpy as np
import pytest
import zarr

from dskd.pipeline.cache import spec
from dskd.pipeline.cache.inspect import format_inspect, inspect_cache
from dskd.pipeline.cache.manifest import (
    hash_file,
    load_commits,
    load_manifest,
    save_manifest,
    write_commit,
)
from dskd.pipeline.cache.verify import check_cache, verify_cache


def _shard(out, i):
    return out / spec.SHARDS_DIR / spec.shard_name(i)


def test_sound_cache_has_no_problems(synthetic_cache):
    out, _, _ = synthetic_cache
    assert verify_cache(out) == []


def test_flipped_byte_and_truncation_name_their_shards(synthetic_cache):
    out, _, _ = synthetic_cache
    f = _shard(out, 1) / "hidden" / "c" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    g = _shard(out, 3) / spec.EXAMPLES_FILE
    g.write_bytes(g.read_bytes()[:-50])
    problems = verify_cache(out)
    where = {(p.shard, p.field) for p in problems}
    assert ("shard-00001", "hidden/c/0/0") in where
    assert ("shard-00003", spec.EXAMPLES_FILE) in where
    assert {p.shard for p in problems} == {"shard-00001", "shard-00003"}
    assert any("crc32c mismatch" in str(p) for p in problems)
    assert any("truncated" in str(p) for p in problems)


def test_missing_shard_and_head_corruption(synthetic_cache):
    out, _, _ = synthetic_cache
    import shutil

    shutil.rmtree(_shard(out, 4))
    (out / spec.HEAD_FILE).write_bytes((out / spec.HEAD_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    text = [str(p) for p in verify_cache(out)]
    assert any(t.startswith("shard-00004: directory") for t in text)
    assert any(t.startswith("cache/head.safetensors: crc32c mismatch") for t in text)


def _rewrite_array(out, i, name, fn):
    """Change a shard array *and* re-record its checksum, so only the content checks can see it."""
    d = _shard(out, i)
    g = zarr.open_group(str(d), mode="r+", zarr_format=3)
    g[name][...] = fn(g[name][...])
    rec = load_commits(out)[i]
    for rel in rec["files"]:
        p = d / rel
        rec["files"][rel] = {"bytes": p.stat().st_size, spec.CHECKSUM: hash_file(p)}
    write_commit(out, rec)
    m = load_manifest(out)
    m["shards"][i] = rec
    save_manifest(out, m)


def test_content_checks_nan_ids_out_of_range_and_inconsistent_next_logprob(synthetic_cache):
    out, _, _ = synthetic_cache
    _rewrite_array(out, 0, "hidden", lambda a: np.where(np.arange(a.shape[0])[:, None] == 3, np.nan, a).astype(a.dtype))
    _rewrite_array(out, 1, "topk_ids", lambda a: a + 1000)
    _rewrite_array(out, 2, "next_logprob", lambda a: a - 0.5)
    _rewrite_array(out, 3, "token_offsets", lambda a: a[::-1].copy())
    got = {(p.shard, p.field) for p in verify_cache(out)}
    assert ("shard-00000", "hidden") in got
    assert ("shard-00001", "topk_ids") in got
    assert ("shard-00002", "next_logprob") in got
    assert ("shard-00003", "token_offsets") in got
    assert "shard-00004" not in {s for s, _ in got}


def test_incomplete_cache_is_reported(make_cache):
    out, _, _ = make_cache(commit=[0, 1])
    problems = verify_cache(out)
    assert len(problems) == 1 and "incomplete: 2 of 5" in str(problems[0])


def test_inspect_reports_counts_bytes_and_dtypes(make_cache):
    out, rows, _ = make_cache(hidden_dtype="bf16")
    info = inspect_cache(out)
    assert info["examples"] == len(rows) and info["complete"]
    assert info["tokens"] == sum(len(r.input_ids) for r in rows)
    assert "uint16" in info["dtypes"]["hidden"]
    # bf16 hidden: 2 bytes per element, D = 16, plus Zarr metadata and index (< 2 kB per shard)
    n_rows = info["token_rows"]
    assert 32 <= info["bytes_per_token"]["hidden"] < 32 + 2000 * 5 / n_rows
    text = format_inspect(info)
    assert "bytes/token" in text and "synthetic-0" in text


@pytest.mark.parametrize("hidden_dtype", ["fp16", "bf16", "fp8"])
def test_recompute_passes_a_sound_cache_and_catches_a_hidden_row_shifted_against_its_topk(
        make_cache, hidden_dtype):
    out, _, _ = make_cache(hidden_dtype=hidden_dtype)
    report = check_cache(out, sample_rows=None)
    assert report.problems == []
    for r in report.shards.values():
        assert r.recompute.rows == r.n_rows > 0 and r.recompute.max_ratio <= 1
        assert r.mass_err < 1e-5
    # shard 2's hidden rows moved down by one: every field well formed, checksums re-recorded
    _rewrite_array(out, 2, "hidden", lambda a: np.roll(a, 1, axis=0))
    if hidden_dtype == "fp8":
        _rewrite_array(out, 2, "hidden_scale", lambda a: np.roll(a, 1, axis=0))
    report = check_cache(out)
    assert {(p.shard, p.field) for p in report.problems} == {("shard-00002", "hidden")}
    assert "hidden @ head disagrees with the stored log-probs" in str(report.problems[0])
    assert report.shards["shard-00002"].recompute.max_err > 1.0


def test_two_swapped_rows_are_caught_by_full_and_reported_per_shard(make_cache):
    out, _, _ = make_cache(n_examples=40, shard_size=20)
    n_rows = load_manifest(out)["shards"][1]["n_rows"]
    sampled = check_cache(out, sample_rows=4)
    assert sampled.problems == [] and sampled.shards["shard-00001"].recompute.rows == 4

    def swap(a):
        a = a.copy()
        a[[7, n_rows - 3]] = a[[n_rows - 3, 7]]
        return a

    _rewrite_array(out, 1, "hidden", swap)
    full = check_cache(out, sample_rows=None)
    assert [(p.shard, p.field) for p in full.problems] == [("shard-00001", "hidden")]
    assert any(f"hidden: row {r}:" in str(full.problems[0]) for r in (7, n_rows - 3))
    assert full.shards["shard-00001"].recompute.rows == n_rows
    assert full.shards["shard-00000"].recompute.max_ratio <= 1


def test_topk_and_tail_mass_must_sum_to_one(synthetic_cache):
    out, _, _ = synthetic_cache
    # every tail mass of shard 1 made 0.1 too large
    _rewrite_array(out, 1, "tail_logprob", lambda a: np.log(np.exp(a) + 0.1).astype(a.dtype))
    problems = verify_cache(out)
    assert [(p.shard, p.field) for p in problems] == [("shard-00001", "tail_logprob")]
    assert "Σ exp(topk_logprobs) + exp(tail_logprob) = 1.1" in str(problems[0])


def test_cli_verify_prints_errors_per_shard_and_fails_on_a_shifted_shard(synthetic_cache):
    from typer.testing import CliRunner

    from dskd.cli import app

    out, _, _ = synthetic_cache
    r = CliRunner().invoke(app, ["cache", "verify", "--full", str(out)])
    assert r.exit_code == 0, r.output
    assert "every row" in r.output and r.output.count("log-prob err") == 5
    _rewrite_array(out, 3, "hidden", lambda a: np.roll(a, -1, axis=0))
    r = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert r.exit_code == 1 and "BAD shard-00003/hidden" in r.output
