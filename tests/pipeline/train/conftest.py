"""A tiny teacher cache (12 toy examples, shards of 5) shared by the train-component tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cache(toy_world, tmp_path_factory):
    from dskd.stages.cache_teacher import CacheTeacherConfig, run

    out = tmp_path_factory.mktemp("train_cache") / "cache"
    run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(toy_world.train), out=str(out),
                           limit=12, shard_size=5, top_k=8, batch_tokens=2048, progress=False))
    return out
