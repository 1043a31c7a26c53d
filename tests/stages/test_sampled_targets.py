"""RS-KD end to end on the toy world: cache-teacher --sampled-targets → cache verify / inspect →
distill --teacher-signal sampled; and the combinations distill refuses before compute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dskd.cli import app
from dskd.pipeline.cache.manifest import load_manifest
from dskd.pipeline.cache.reader import CacheReader
from dskd.pipeline.config import ConfigError
from dskd.pipeline.train.logger import read_metrics
from dskd.stages.cache_teacher import CacheTeacherConfig
from dskd.stages.cache_teacher import run as cache_run
from dskd.stages.distill import DistillConfig, run

N_SAMPLES, TAU = 24, 2.0


@pytest.fixture(scope="module")
def world(toy_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("sampled")
    lines = Path(toy_world.train).read_text().splitlines()[:16]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    common = {"teacher": str(toy_world.teacher), "data": str(d / "train.jsonl"), "shard_size": 8,
              "batch_tokens": 4096, "progress": False}
    cache_run(CacheTeacherConfig(out=str(d / "cache"), top_k=0, sampled_targets=N_SAMPLES,
                                 sampled_temperature=TAU, **common))
    return {"toy": toy_world, "cache": d / "cache", "common": common, "dir": d}


def cfg(world, out, **kw) -> DistillConfig:
    base = {"student": str(world["toy"].student), "out": str(out), "batch_size": 4, "max_steps": 2,
            "eval_interval": 1000, "save_interval": 1000, "num_workers": 0, "log_interval": 1,
            "tensorboard": False, "seed": 3, "cache": str(world["cache"]), "method": "kd",
            "teacher_signal": "sampled", "kd_temperature": TAU}
    return DistillConfig(**(base | kw))


def test_sampled_cache_round_trips_through_verify_and_inspect(world):
    cache = world["cache"]
    lay = load_manifest(cache)["layout"]
    assert lay["sampled_targets"] == N_SAMPLES and lay["sampled_temperature"] == TAU
    rows = list(CacheReader(cache, fields=["sampled_ids", "sampled_counts", "next_logprob"]))
    n_distinct = []
    for ex in rows:
        assert ex.sampled_ids.shape[0] == len(ex.input_ids) - 1
        assert (ex.sampled_counts.sum(1) == N_SAMPLES).all()
        n_distinct += list((ex.sampled_counts > 0).sum(1))
    assert 1 < np.mean(n_distinct) < N_SAMPLES  # a peaked teacher repeats ids: fewer distinct
    r = CliRunner().invoke(app, ["cache", "verify", str(cache)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["cache", "inspect", str(cache), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["sampled_targets"] == N_SAMPLES
    assert {"sampled_n", "sampled_ids", "sampled_counts"} <= set(info["bytes_per_token"])
    text = CliRunner().invoke(app, ["cache", "inspect", str(cache)]).output
    assert f"sampled targets {N_SAMPLES} draws at temperature 2" in text


def test_resumed_or_rewritten_shards_draw_the_same_ids(world, tmp_path):
    """The draws are seeded per shard: a second cache of the same inputs has the same bytes."""
    out = tmp_path / "again"
    cache_run(CacheTeacherConfig(out=str(out), top_k=0, sampled_targets=N_SAMPLES,
                                 sampled_temperature=TAU, **world["common"]))
    a, b = load_manifest(world["cache"]), load_manifest(out)
    assert [s["files"] for s in a["shards"]] == [s["files"] for s in b["shards"]]


def test_verify_names_a_shard_whose_counts_were_changed(world, tmp_path):
    import shutil

    cache = tmp_path / "bad"
    shutil.copytree(world["cache"], cache)
    f = cache / "shards" / "shard-00001" / "sampled_counts" / "c" / "0"
    a = np.fromfile(f, np.uint8)
    a[0] += 1  # a row's counts no longer sum to N
    a.tofile(f)
    r = CliRunner().invoke(app, ["cache", "verify", str(cache)])
    assert r.exit_code != 0
    assert "shard-00001/sampled_counts" in r.output and f"sum to {N_SAMPLES}" in r.output


def test_distill_trains_kd_from_sampled_targets(world, tmp_path):
    run(cfg(world, tmp_path / "s"))
    rows = [r for r in read_metrics(tmp_path / "s") if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in rows)


def test_unsupported_combinations_are_refused_before_compute(world, tmp_path):
    cases = [({"method": "dskd"}, "--method dskd cannot learn from --teacher-signal sampled"),
             ({"divergence": "rkl"}, "--divergence rkl cannot be estimated"),
             ({"kd_temperature": 1.0}, "Pass --kd-temperature 2"),
             ({"cache": None, "teacher": str(world["toy"].teacher), "data": str(world["dir"] / "train.jsonl")},
              "online distillation takes --teacher-signal exact or topk")]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            run(cfg(world, tmp_path / "x", **kw))
    # a cache without draws
    plain = tmp_path / "plain"
    cache_run(CacheTeacherConfig(out=str(plain), top_k=4, limit=4, **world["common"]))
    with pytest.raises(ConfigError, match="has no sampled targets; rebuild it"):
        run(cfg(world, tmp_path / "y", cache=str(plain)))
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
