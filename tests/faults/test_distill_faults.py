"""Fault suite, stage 2: kill `dskd distill` at exact places, corrupt checkpoints, fill the disk,
start two runs in one dir; the resumed run must end with the uninterrupted run's weights."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.faults

STEPS = 6


def distill_args(world, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--cache", str(cache), "--student", str(world.student), "--out", str(out),
            "--method", "dskd", "--max-steps", str(STEPS), "--save-interval", "2",
            "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--seed", "3", *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(fx, toy_world, reference_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "reference"
    r = fx.dskd(*distill_args(toy_world, reference_cache, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("point", [
    "train.step:3",             # between two optimizer steps, after the step-2 checkpoint
    # inside the step-4 checkpoint: student written, the rest not (slow tier, like the next)
    pytest.param("checkpoint.mid_write:2", marks=pytest.mark.slow),
    # before any checkpoint exists: the resume starts from scratch
    pytest.param("train.step:1", marks=pytest.mark.slow),
])
def test_sigkill_then_resume_reaches_the_same_weights(fx, toy_world, reference_cache, reference_run,
                                                      tmp_path, point):
    out = tmp_path / "run"
    killed = fx.dskd(*distill_args(toy_world, reference_cache, out), env={"DSKD_FAILPOINTS": point})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "final").exists()
    # no half checkpoint is ever taken for a whole one
    for d in (out / "checkpoints").glob("step-*"):
        assert (d / "trainer.json").is_file() and (d / "optimizer.pt").is_file(), d
    resumed = fx.dskd(*distill_args(toy_world, reference_cache, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = weights(reference_run), weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


@pytest.mark.parametrize("target", ["trainer.json", "optimizer.pt", "student/model.safetensors"])
def test_corrupt_checkpoint_is_named_and_nothing_is_trained_from_it(fx, toy_world, reference_cache,
                                                                    reference_run, tmp_path, target):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "final")
    latest = max((out / "checkpoints").glob("step-*"))
    f = latest / target
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = fx.cli(*distill_args(toy_world, reference_cache, out, "--resume"))
    assert r.returncode == 1, r.stderr[-3000:]
    assert latest.name in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (out / "final").exists()


def test_two_runs_into_one_dir(fx, toy_world, reference_cache, tmp_path):
    out = tmp_path / "run"
    args = distill_args(toy_world, reference_cache, out)
    release = tmp_path / "release"
    first = fx.start_paused(args, "train.step:1", release)  # holds the run's lock until released
    try:
        second = fx.cli(*args, "--resume")  # in this process: the lock is held by another one
    finally:
        release.touch()
        first.communicate(timeout=600)
    assert second.returncode == 1 and "locked by another running" in second.stderr, second.stderr[-2000:]
    assert first.returncode == 0, Path(f"{release}.stderr").read_text()[-2000:]


def test_disk_full_during_checkpoint_commits_no_half_checkpoint(fx, toy_world, reference_cache,
                                                                 reference_run, tmp_path):
    ckpt = max((reference_run / "checkpoints").glob("step-*"))
    one = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    size_kib = int(1.5 * one) // 1024 + 256  # room for one checkpoint and a bit, not for two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root, so CI runs this test)")
    try:
        out = mnt / "run"
        r = fx.dskd(*distill_args(toy_world, reference_cache, out, "--keep-last", "3"))
        assert r.returncode == 1, r.stderr[-3000:]
        assert "disk full" in r.stderr and "MiB free" in r.stderr and "Traceback" not in r.stderr
        for d in (out / "checkpoints").glob("step-*"):  # whatever is named step-N is whole
            assert (d / "trainer.json").is_file() and (d / "rng.pt").is_file()
        moved = shutil.copytree(out, tmp_path / "roomy")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    resumed = fx.dskd(*distill_args(toy_world, reference_cache, moved, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = weights(reference_run), weights(moved)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=k)
