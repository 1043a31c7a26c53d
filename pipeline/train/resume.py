"""Resume checks the plan: a checkpoint continues the run it was saved from, or is refused.

The saved data position is a micro-batch index in an order planned from the seed and the batch
geometry, and the LR schedule is a function of the total step count. Resuming with another
--seed, --epochs, --lr, ... would silently repeat or skip examples, or bend the LR curve. So
trainer.json's config, world size and schedule are compared with the new run's and every unsafe
difference is refused at once, by name, before any model loads.

Safe to change: whether --force allows a warned setting (it is no part of the plan; the setting
itself is compared), where files live (a cache or run dir may move; the rows are pinned by count),
how data is loaded, how often to log / validate / save, the device and precision. The batch
geometry may change when the global batch (batch × grad-accum × processes, in examples) stays
the same: the position is then re-expressed in examples and mapped onto the new micro-batches,
so e.g. a run saved on 2 processes × --batch-size 4 resumes on 1 process × --batch-size 8 (or
--batch-size 4 --grad-accum 2). Token-budget batching (--batch-tokens) plans per process, so
there the geometry must stay exactly as saved.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..config import ConfigError, to_dict

# Config keys (dashed, as in trainer.json) whose change cannot repeat, skip or reweight examples.
SAFE_KEYS = frozenset({
    "student", "out", "cache", "teacher", "data", "valid-cache", "valid-data",  # paths may move
    "resume", "overwrite", "device", "precision", "fsdp", "tensorboard", "trace-examples",
    "num-workers", "loader-cache-mb", "dense-logits-max-mb",
    "log-interval", "eval-interval", "save-interval", "keep-last", "force",
})
# Read once, before step 1: --init-seed re-initialises the student from its config.json, and on
# resume the weights come from the checkpoint instead, so another value changes nothing; the run
# keeps (and records) the checkpoint's. With --lora the frozen base is rebuilt from the seed at
# every start, so there it is part of the plan.
START_ONLY_KEYS = frozenset({"init-seed"})
GEOMETRY_KEYS = ("batch-size", "grad-accum", "batch-tokens")
# Saved unset by runs before the stage recorded resolved values; the cache's fingerprint pins them.
INHERITED_KEYS = frozenset({"template", "max-prompt-len", "max-len"})


class ResumeMismatchError(ConfigError):
    """--resume with settings that would not continue the saved run; names each key."""


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))  # as trainer.json holds it (tuples -> lists)


def plan_differences(saved: dict[str, Any], cfg: Any, world_size: int) -> list[str]:
    """'key: checkpoint X, this run Y' for every unsafe difference between trainer.json and now."""
    now = _plain(to_dict(cfg))
    # keys a checkpoint from an older dskd lacks compare as their defaults
    then = _plain(to_dict(type(cfg)())) | saved.get("config", {})
    diffs = [f"{k}: checkpoint {then.get(k)!r}, this run {v!r}" for k, v in now.items()
             if k not in SAFE_KEYS and k not in GEOMETRY_KEYS and then.get(k) != v
             and not (k in START_ONLY_KEYS and not now.get("lora"))
             and not (k in INHERITED_KEYS and then.get(k) is None)]
    old_world = int(saved.get("world_size", world_size))
    geometry = {k: (then.get(k), now[k]) for k in GEOMETRY_KEYS}
    if any(a != b for a, b in geometry.values()) or old_world != world_size:
        tokens = geometry["batch-tokens"]
        if tokens[0] is not None or tokens[1] is not None:
            changed = [f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in geometry.items()
                       if a != b]
            if old_world != world_size:
                changed.append(f"processes: checkpoint {old_world}, this run {world_size}")
            diffs += [c + " (--batch-tokens plans per process: keep the geometry as saved)"
                      for c in changed]
        else:
            g_old = then["batch-size"] * then["grad-accum"] * old_world
            g_new = now["batch-size"] * now["grad-accum"] * world_size
            if g_old != g_new:
                diffs.append(f"global batch (batch-size × grad-accum × processes): checkpoint "
                             f"{then['batch-size']} × {then['grad-accum']} × {old_world} = {g_old}, "
                             f"this run {now['batch-size']} × {now['grad-accum']} × {world_size} "
                             f"= {g_new}")
    return diffs


def keep_start_settings(saved: dict[str, Any], cfg: Any) -> tuple[Any, list[str]]:
    """`cfg` with the checkpoint's start-only settings (what the run was started with, so the
    records say what ran) and a note for each value this run gave that has no effect."""
    if getattr(cfg, "lora", False):
        return cfg, []  # part of the plan there: check_plan compared them
    then = _plain(to_dict(type(cfg)())) | saved.get("config", {})
    now = _plain(to_dict(cfg))
    keep, notes = {}, []
    for k in sorted(START_ONLY_KEYS):
        if then.get(k) != now.get(k):
            keep[k.replace("-", "_")] = then.get(k)
            notes.append(f"--{k} {_shown(now.get(k))} is ignored on resume: the student's weights "
                         f"come from the checkpoint (the run started with --{k} "
                         f"{_shown(then.get(k))}, which it keeps)")
    return (dataclasses.replace(cfg, **keep) if keep else cfg), notes


def _shown(v: Any) -> str:
    return "unset" if v is None else str(v)


def check_plan(ckpt_name: str, saved: dict[str, Any], cfg: Any, world_size: int) -> None:
    diffs = plan_differences(saved, cfg, world_size)
    if diffs:
        raise ResumeMismatchError(
            f"--resume: checkpoint {ckpt_name} was saved with other settings than this run:\n  "
            + "\n  ".join(diffs) + "\nResuming would repeat or skip examples or bend the LR "
            "schedule. Rerun with the checkpoint's values (its trainer.json 'config'), or start "
            "over with --overwrite (or another --out).")


def check_schedule(ckpt_name: str, saved: dict[str, Any], schedule: dict[str, Any],
                   num_rows: int) -> None:
    """Same rows and the same LR schedule (total steps follow from the rows and the epochs)."""
    diffs = []
    if "rows" in saved and saved["rows"] != num_rows:
        diffs.append(f"training rows: checkpoint {saved['rows']}, this run {num_rows}")
    for k, v in schedule.items():
        if k in saved.get("schedule", {}) and saved["schedule"][k] != v:
            diffs.append(f"schedule {k}: checkpoint {saved['schedule'][k]!r}, this run {v!r}")
    if diffs:
        raise ResumeMismatchError(
            f"--resume: checkpoint {ckpt_name} does not continue into this run:\n  "
            + "\n  ".join(diffs) + "\nResume with the data the run started with, or start over "
            "with --overwrite (or another --out).")


def map_position(saved: dict[str, Any], world_size: int, batch_size: int,
                 micro_per_epoch: int, num_rows: int) -> dict[str, int]:
    """The saved (epoch, micro-batch) as this run's: the same number of examples into the epoch.

    Only called with an unchanged global batch (check_plan), and positions are saved at step
    boundaries, so the examples done are a whole number of the new micro-batches (or the epoch
    is done).
    """
    pos = saved["position"]
    cfg = saved.get("config", {})
    old_gm = int(cfg.get("batch-size", batch_size)) * int(saved.get("world_size", world_size))
    new_gm = batch_size * world_size
    if cfg.get("batch-tokens") is not None or old_gm == new_gm:
        return {"epoch": pos["epoch"], "micro_batch": pos["micro_batch"]}
    done = min(pos["micro_batch"] * old_gm, num_rows)
    if done >= num_rows:
        return {"epoch": pos["epoch"], "micro_batch": micro_per_epoch}
    if done % new_gm:
        raise ResumeMismatchError(f"--resume: the checkpoint stopped {done} examples into epoch "
                                  f"{pos['epoch']}, not a whole number of this run's micro-batches "
                                  f"of {new_gm}; keep --batch-size × processes as saved ({old_gm})")
    return {"epoch": pos["epoch"], "micro_batch": done // new_gm}

