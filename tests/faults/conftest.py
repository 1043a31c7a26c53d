"""Shared pieces of the fault suite: run a stage through the real CLI, compare caches byte by byte."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

CACHE_LIMIT, SHARD_SIZE = 48, 16  # three shards


def dskd(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The user's view: `dskd ARGS` in a fresh process (exit code, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items() if k != "DSKD_FAILPOINTS"}
    full_env = {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dskd.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, check=False)


def cache_args(world, out: Path, *extra: str) -> list[str]:
    return ["cache-teacher", "--teacher", str(world.teacher), "--data", str(world.train),
            "--out", str(out), "--limit", str(CACHE_LIMIT), "--shard-size", str(SHARD_SIZE),
            "--top-k", "8", "--no-progress", "--device", "cpu", *extra]


def shard_digests(cache_dir: Path) -> dict[str, str]:
    """sha256 of every file that holds data (shards and head); the manifest has timestamps."""
    out = {}
    for p in sorted((cache_dir / "shards").rglob("*")):
        if p.is_file():
            out[p.relative_to(cache_dir).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    out["head.safetensors"] = hashlib.sha256((cache_dir / "head.safetensors").read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def reference_cache(toy_world, tmp_path_factory) -> Path:
    """An uninterrupted cache: what every crashed-then-resumed run must equal, byte for byte."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    r = dskd(*cache_args(toy_world, out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def fx():
    """The helpers above, for test modules (conftest is not importable under importlib mode)."""
    return SimpleNamespace(dskd=dskd, cache_args=cache_args, shard_digests=shard_digests)
