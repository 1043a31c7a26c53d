"""Resume checks the plan: which differences are refused, and the position in another geometry."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dskd.pipeline.config import to_dict
from dskd.pipeline.train.resume import (
    ResumeMismatchError,
    check_schedule,
    keep_start_settings,
    map_position,
    plan_differences,
)
from dskd.stages.distill import DistillConfig


def _saved(cfg: DistillConfig, world: int, epoch: int = 0, micro: int = 0) -> dict:
    return {"config": to_dict(cfg), "world_size": world, "rows": 40,
            "position": {"epoch": epoch, "micro_batch": micro},
            "schedule": {"total_steps": 10, "warmup_steps": 0, "min_lr": 1e-7, "kind": "cosine"}}


BASE = DistillConfig(student="s", out="o", cache="c", batch_size=4, grad_accum=1)


def test_safe_changes_pass_and_unsafe_ones_are_named():
    saved = _saved(BASE, world=2)
    moved = replace(BASE, cache="/elsewhere/c", num_workers=7, log_interval=3, device="cpu")
    assert plan_differences(saved, moved, world_size=2) == []
    diffs = plan_differences(saved, replace(BASE, seed=1, kd_rate=0.9, lr_schedule="constant"), 2)
    assert [d.split(":")[0] for d in diffs] == ["kd-rate", "lr-schedule", "seed"]


def test_force_and_init_seed_do_not_block_a_resume():
    """--force only allows a warned setting (the setting itself is compared); --init-seed is read
    before step 1 only: the checkpoint's weights win, so the run keeps and records its seed."""
    saved = _saved(replace(BASE, init_seed=3), world=1)
    now = replace(BASE, force=True, init_seed=5)
    assert plan_differences(saved, now, 1) == []
    kept, notes = keep_start_settings(saved, now)
    assert kept.init_seed == 3 and kept.force
    assert notes == [("--init-seed 5 is ignored on resume: the student's weights come from the "
                      "checkpoint (the run started with --init-seed 3, which it keeps)")]
    assert keep_start_settings(saved, replace(now, init_seed=3)) == (replace(now, init_seed=3), [])
    # with --lora the frozen base is rebuilt from the seed at every start: part of the plan
    lora = replace(BASE, lora=True, init_seed=3)
    (d,) = plan_differences(_saved(lora, world=1), replace(lora, init_seed=5), 1)
    assert d == "init-seed: checkpoint 3, this run 5"
    assert keep_start_settings(_saved(lora, world=1), replace(lora, init_seed=5))[1] == []


def test_geometry_may_change_only_with_the_same_global_batch():
    saved = _saved(BASE, world=2)  # 4 × 1 × 2 = 8
    assert plan_differences(saved, replace(BASE, batch_size=8), world_size=1) == []
    assert plan_differences(saved, replace(BASE, grad_accum=2), world_size=1) == []
    (d,) = plan_differences(saved, BASE, world_size=1)
    assert d.startswith("global batch") and "= 8, this run 4 × 1 × 1 = 4" in d
    tokens = replace(BASE, batch_tokens=300)
    (d,) = plan_differences(_saved(tokens, world=2), tokens, world_size=1)
    assert d.startswith("processes: checkpoint 2, this run 1") and "--batch-tokens" in d


def test_an_old_checkpoint_without_a_key_compares_it_as_its_default():
    saved = _saved(BASE, world=1)
    del saved["config"]["skew-lambda"]
    assert plan_differences(saved, BASE, 1) == []
    assert plan_differences(saved, replace(BASE, skew_lambda=0.3), 1)[0].startswith("skew-lambda")
    # runs before the stage recorded its resolved template saved None (= the cache's)
    saved["config"]["template"] = None
    assert plan_differences(saved, replace(BASE, template="dskd"), 1) == []


def test_position_is_re_expressed_in_examples():
    saved = _saved(BASE, world=2, epoch=1, micro=3)  # 3 global micro-batches of 8 = 24 examples
    assert map_position(saved, 1, 8, 5, 40) == {"epoch": 1, "micro_batch": 3}
    assert map_position(saved, 1, 4, 10, 40) == {"epoch": 1, "micro_batch": 6}
    done = _saved(BASE, world=2, micro=5)  # epoch finished
    assert map_position(done, 1, 4, 10, 38) == {"epoch": 0, "micro_batch": 10}
    with pytest.raises(ResumeMismatchError, match="24 examples into epoch 1"):
        map_position(saved, 1, 16, 3, 40)


def test_other_rows_or_schedule_are_refused():
    saved = _saved(BASE, world=1)
    check_schedule("step-2", saved, saved["schedule"], 40)
    with pytest.raises(ResumeMismatchError, match=r"training rows: checkpoint 40, this run 12"):
        check_schedule("step-2", saved, saved["schedule"], 12)
    with pytest.raises(ResumeMismatchError, match=r"schedule total_steps: checkpoint 10, this run 20"):
        check_schedule("step-2", saved, saved["schedule"] | {"total_steps": 20}, 40)
