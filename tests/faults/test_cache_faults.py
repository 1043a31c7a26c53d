"""Fault suite, stage 1: kill, corrupt, fill the disk, run twice; nothing committed is ever lost.

Each test injects one fault into `dskd cache-teacher` run through the CLI, checks what the user
sees, then proves nothing was lost: the rerun's shards equal an uninterrupted run byte for byte.
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("point", [
    "shard.mid_write:1",   # first shard half written (token arrays, no examples table)
    # the default tier keeps one kill point per stage; the others run in the slow tier (`-m slow`)
    pytest.param("shard.renamed:2", marks=pytest.mark.slow),  # 2nd shard in place, no commit record yet
    pytest.param("shard.renamed:3", marks=pytest.mark.slow),  # last shard in place, no manifest yet
])
def test_sigkill_at_a_failpoint_then_rerun_is_bit_identical(fx, toy_world, reference_cache, tmp_path, point):
    out = tmp_path / "cache"
    killed = fx.dskd(*fx.cache_args(toy_world, out), env={"DSKD_FAILPOINTS": point})
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest.get("complete"), "a killed run must not look complete"
    # the killed cache is not usable as if complete
    v = fx.cli("cache", "verify", str(out))
    assert v.returncode != 0
    resumed = fx.dskd(*fx.cache_args(toy_world, out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert fx.shard_digests(out) == fx.shard_digests(reference_cache)
    assert fx.cli("cache", "verify", str(out)).returncode == 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("target,damage", [
    ("shards/shard-00001/examples.arrow", "truncate"),
    ("shards/shard-00000/hidden/c/0/0", "flip"),
    ("shards/shard-00002", "delete"),
    ("manifest.json", "truncate"),
    pytest.param("manifest.json", "flip", marks=pytest.mark.slow),
    ("head.safetensors", "flip"),
    pytest.param("head.safetensors", "truncate", marks=pytest.mark.slow),
])
def test_corruption_is_named_by_verify_and_refused_by_distill(fx, toy_world, reference_cache, tmp_path,
                                                               target, damage):
    cache = _copy(reference_cache, tmp_path / "cache")
    path = cache / target
    if not path.exists():  # the hidden array's chunk path depends on the zarr layout
        path = next(p for p in sorted((cache / Path(target).parts[0] / Path(target).parts[1]).rglob("*"))
                    if p.is_file() and "hidden" in p.as_posix() and p.name != "zarr.json")
    if damage == "delete":
        shutil.rmtree(path)
    elif damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    v = fx.cli("cache", "verify", str(cache))
    assert v.returncode == 1, v.stdout + v.stderr
    name = Path(target).name if "shard" not in target else Path(target).parts[1]
    assert name in v.stderr, v.stderr  # the bad shard or file is named
    assert "Traceback" not in v.stderr
    d = fx.cli("distill", "--cache", str(cache), "--student", str(toy_world.student),
            "--out", str(tmp_path / "run"), "--method", "dskd", "--max-steps", "2",
            "--num-workers", "0", "--device", "cpu")
    assert d.returncode != 0
    assert "Traceback" not in d.stderr, d.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()  # no output from corrupted input


def test_two_writers_on_one_cache_dir(fx, toy_world, reference_cache, tmp_path):
    """The first writer pauses after its first shard (holding the lock) until the second has
    been refused; the first then finishes a cache equal to an uninterrupted one."""
    out = tmp_path / "cache"
    args = fx.cache_args(toy_world, out)
    release = tmp_path / "release"
    first = fx.start_paused(args, "shard.renamed:1", release)
    try:
        second = fx.cli(*args)  # in this process: the lock is held by another one
    finally:
        release.touch()
        first.communicate(timeout=600)
    assert second.returncode != 0, "the lock did not refuse a second writer"
    assert "lock" in second.stderr.lower() and "Traceback" not in second.stderr, second.stderr
    assert first.returncode == 0, Path(f"{release}.stderr").read_text()[-2000:]
    assert fx.shard_digests(out) == fx.shard_digests(reference_cache)


def _mount_tmpfs(path: Path, size_kib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                       capture_output=True, check=False)
    return r.returncode == 0


def test_disk_full_commits_no_half_shard_and_resume_loses_nothing(fx, toy_world, reference_cache, tmp_path):
    """A real full filesystem (tmpfs): room for the head and about one shard, not for three."""
    head = (reference_cache / "head.safetensors").stat().st_size
    shard = max(sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                for d in (reference_cache / "shards").iterdir())
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, (head + int(1.6 * shard)) // 1024 + 64):
        pytest.skip("mounting a tmpfs needs root (CI runs as root, so CI runs this test)")
    try:
        out = mnt / "cache"
        r = fx.dskd(*fx.cache_args(toy_world, out))
        assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
        assert "disk full" in r.stderr and "MiB free" in r.stderr and str(mnt) in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        committed = json.loads((out / "manifest.json").read_text())
        assert not committed.get("complete")
        # nothing lost: move what was written to a roomy disk and rerun the same command
        moved = shutil.copytree(out, tmp_path / "roomy")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    resumed = fx.dskd(*fx.cache_args(toy_world, moved))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert fx.shard_digests(moved) == fx.shard_digests(reference_cache)
