"""Shared pieces of the fault suite: run a stage through the real CLI, compare caches byte by byte."""

import hashlib
import os
import subprocess
import sys
import time
import traceback
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


def cli(*args: str) -> subprocess.CompletedProcess:
    """`dskd ARGS` in this process (typer's runner, the same app): exit code, stdout and stderr
    as the user sees them, an uncaught exception as its traceback on stderr (exit 1), as from
    a process. For commands that finish or refuse: saves a process start (~7 CPU-s of imports);
    kills, pauses and crash-then-resume runs use dskd()."""
    from typer.testing import CliRunner

    from dskd.cli import app

    assert "DSKD_FAILPOINTS" not in os.environ, "failpoints kill the process: use dskd()"
    r = CliRunner().invoke(app, list(args))
    err = r.stderr
    if r.exc_info is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(*r.exc_info))
    return subprocess.CompletedProcess(["dskd", *args], r.exit_code, r.stdout, err)


def start_paused(args: list[str], point: str, release: Path) -> subprocess.Popen:
    """`dskd ARGS` in the background, paused at failpoint POINT ("name:N") until `release` exists.
    Returns once it is there (so whatever it holds, e.g. a lock, is held), or once it has exited
    (the caller's assertions then report it). Its output goes to files (RELEASE.stdout/.stderr),
    not pipes: a full pipe would stop it before it reaches the failpoint."""
    env = {k: v for k, v in os.environ.items() if k != "DSKD_FAILPOINTS"}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "DSKD_FAILPOINTS": f"{point}:wait={release}"}
    with open(f"{release}.stdout", "w") as out, open(f"{release}.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dskd.cli", *args], stdout=out, stderr=err,
                                env=env)
    reached = Path(f"{release}.reached")
    while not reached.exists() and proc.poll() is None:  # an event, not a timing guess
        time.sleep(0.05)
    return proc


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
    return SimpleNamespace(dskd=dskd, cli=cli, cache_args=cache_args, shard_digests=shard_digests,
                           start_paused=start_paused)
