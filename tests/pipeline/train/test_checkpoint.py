import random

import numpy as np
import pytest
import torch

from dskd.pipeline.train import checkpoint as ck


def _parts(step, fail=False):
    def save_student(d):
        d.mkdir()
        (d / "config.json").write_text("{}")
        if fail:
            raise OSError("disk full")

    return {"save_student": save_student, "projectors": {"w": torch.ones(2, 2) * step},
                "optimizer": {"state": {}, "param_groups": []}, "trainer": {"step": step},
                "rng": [ck.rng_state()]}


def test_save_load_round_trip(tmp_path):
    p = ck.save_checkpoint(tmp_path, 5, **_parts(5))
    assert p.name == "step-00000005"
    got = ck.load_checkpoint(p)
    assert got["trainer"]["step"] == 5
    assert torch.equal(got["projectors"]["w"], torch.full((2, 2), 5.0))
    assert (got["student_dir"] / "config.json").is_file()


def test_failed_save_leaves_no_checkpoint(tmp_path):
    ck.save_checkpoint(tmp_path, 1, **_parts(1))
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, 2, **_parts(2, fail=True))
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert ck.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_incomplete_dirs_are_not_checkpoints(tmp_path):
    ck.save_checkpoint(tmp_path, 3, **_parts(3))
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # no trainer.json: a crashed copy
    (tmp_path / "checkpoints" / ".tmp-step-00000010-1").mkdir()
    assert ck.latest_checkpoint(tmp_path).name == "step-00000003"


def test_keep_last_k_keeps_the_best(tmp_path):
    for s in (10, 20, 30, 40, 50):
        ck.save_checkpoint(tmp_path, s, **_parts(s))
        if s == 20:
            ck.mark_best(tmp_path, 20, "valid_loss", 1.5)
        ck.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == [
        "step-00000020", "step-00000040", "step-00000050"]
    assert ck.best_info(tmp_path)["value"] == 1.5


def test_resave_same_step_replaces(tmp_path):
    ck.save_checkpoint(tmp_path, 7, **_parts(7))
    parts = _parts(7)
    parts["projectors"] = {"w": torch.zeros(1)}
    ck.save_checkpoint(tmp_path, 7, **parts)
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path))["projectors"]["w"].shape == (1,)


def test_rng_state_round_trip():
    ck.seed_everything(3)
    state = ck.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_unreadable_checkpoint_is_named(tmp_path):
    p = ck.save_checkpoint(tmp_path, 1, **_parts(1))
    (p / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="step-00000001"):
        ck.load_checkpoint(p)


class _RunsCode:
    """Unpickling this calls Path.touch(marker): what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt"])
def test_a_checkpoint_file_with_a_pickled_object_is_refused_not_run(tmp_path, name):
    """Resuming from someone else's checkpoint must never execute code: the file is refused even
    when its checksum in trainer.json was updated to match (as an attacker would)."""
    import json

    p = ck.save_checkpoint(tmp_path, 1, **_parts(1))
    marker = tmp_path / "pwned"
    torch.save({"state": _RunsCode(marker)}, p / name)
    trainer = json.loads((p / ck.TRAINER_FILE).read_text())
    trainer["files"] = ck._file_sums(p)
    (p / ck.TRAINER_FILE).write_text(json.dumps(trainer))
    with pytest.raises(ck.CheckpointError, match=rf"{name} holds pickled Python objects") as e:
        ck.load_checkpoint(p)
    assert "step-00000001" in str(e.value)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    ck.seed_everything(5)
    np.random.standard_normal()  # numpy caches a Gaussian: that part of the state must survive
    p = ck.save_checkpoint(tmp_path, 1, **(_parts(1) | {"rng": [ck.rng_state()]}))
    a = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    (state,) = ck.load_checkpoint(p)["rng"]
    ck.set_rng_state(state)
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == a
