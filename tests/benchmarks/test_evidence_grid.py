"""benchmarks/evidence_grid.py: records in evidence.json's paired shape; finished runs are skipped
and an arm with an evidence run's exact config reuses that run's scores, never another's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dskd.pipeline.config import resolve, save_config
from dskd.stages import quickstart as qs
from dskd.stages.distill import DistillConfig


@pytest.fixture(scope="module")
def grid(load_benchmark):
    return load_benchmark("evidence_grid")


def _truth(kl: float) -> dict:
    m = {"excess_kl": kl, "excess_kl_per_token": kl / 5, "validity": 0.5, "excess_nll": kl}
    return {"valid": dict(m), "test": m, "params": 7}


def _finished(run_dir: Path, kl: float, config: dict | None = None) -> None:
    """A run as distill + scoring leave it: final/, truth.json and (evidence) config.yaml."""
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "truth.json").write_text(json.dumps(_truth(kl)))
    if config is not None:
        _started(run_dir, config)


def _started(run_dir: Path, config: dict) -> None:
    """config.yaml as distill writes it: lengths resolved from the cache, not left unset."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(resolve(DistillConfig, {"max_prompt_len": 256, "max_len": 512, **config}),
                run_dir)


def _evidence_config(grid, ev: Path, name: str, seed: int, method: str, **extra) -> dict:
    """What benchmarks/evidence.py's own run of `name` under `seed` resolves to."""
    sz = qs.SIZES[grid.PRESET]
    return qs.student_config(ev, f"{name}-s{seed}", ev / "inits" / f"student-s{seed}",
                             {s: ev / "cache" / s for s in ("train", "valid")}, sz,
                             {"device": "cpu", "template": sz.template, "tensorboard": False,
                              "seed": seed}, method, "fkl", **{**grid.STUDENT_EXTRA, **extra})


@pytest.fixture
def evidence(tmp_path, toy_world, grid):
    ev = tmp_path / "ev"
    (ev / "world").parent.mkdir(parents=True)
    (ev / "world").symlink_to(toy_world.root)
    for split in ("train", "valid"):
        (ev / "cache" / split).mkdir(parents=True)
        (ev / "cache" / split / "manifest.json").write_text("{}")
    for s in (1, 2):
        (ev / "inits" / f"student-s{s}").mkdir(parents=True)
        (ev / "inits" / f"student-s{s}" / "model.safetensors").write_bytes(b"")
    # seed 1: KD at the defaults, finished; DSKD finished (same seed, other config)
    _finished(ev / "runs" / "kd-fkl-s1", 0.40, _evidence_config(grid, ev, "kd-fkl", 1, "kd"))
    _finished(ev / "runs" / "dskd-fkl-s1", 0.10, _evidence_config(grid, ev, "dskd-fkl", 1, "dskd"))
    # seed 2: KD at the defaults still running (config written, no truth.json yet)
    _started(ev / "runs" / "kd-fkl-s2", _evidence_config(grid, ev, "kd-fkl", 2, "kd"))
    return ev


def test_grid_reuses_the_identical_evidence_run_and_skips_finished_ones(grid, evidence, tmp_path):
    out = tmp_path / "grid"
    arms = [grid.Arm("kd", "kd", overrides={"kd_rate": 0.5, "kd_temperature": 2.0}),  # = defaults
            grid.Arm("kd-a0.9", "kd", overrides={"kd_rate": 0.9})]
    # what the grid must not retrain: its own finished runs
    _finished(out / "runs" / "kd-s2", 0.45)
    _finished(out / "runs" / "kd-a0.9-s1", 0.30)
    _finished(out / "runs" / "kd-a0.9-s2", 0.33)

    recs = grid.run_grid(evidence, arms, [1, 2], out, workers=1,
                         threads=torch.get_num_threads())
    assert [r["run"] for r in recs] == ["kd-s1", "kd-a0.9-s1", "kd-s2", "kd-a0.9-s2"]
    by = {r["run"]: r for r in recs}
    # seed 1 of the default arm: the evidence's kd-fkl-s1 (not dskd-fkl-s1, same seed)
    assert by["kd-s1"]["reused_from"] == str((evidence / "runs" / "kd-fkl-s1").resolve())
    assert by["kd-s1"]["test"]["excess_kl"] == 0.40
    assert not (out / "runs" / "kd-s1").exists()
    # kd-fkl-s2 is unfinished in the evidence dir: the grid's own finished run counts
    assert by["kd-s2"]["reused_from"] is None and by["kd-s2"]["test"]["excess_kl"] == 0.45
    # another α never matches the default-config evidence run
    assert by["kd-a0.9-s1"]["reused_from"] is None
    assert by["kd-a0.9-s1"]["test"]["excess_kl"] == 0.30
    r = by["kd-a0.9-s2"]
    assert (r["method_name"], r["method"], r["divergence"], r["vocab"], r["model"], r["seed"],
            r["params"], r["overrides"]) == ("kd-a0.9", "kd", "fkl", "bpe", "student", 2, 7,
                                             {"kd_rate": 0.9})

    # the paired structure evidence.json's verdicts read
    assert grid.per_seed(recs) == {"kd": {1: 0.40, 2: 0.45}, "kd-a0.9": {1: 0.30, 2: 0.33}}
    d = grid.paired(recs, "kd-a0.9", "kd")
    assert d["seeds"] == [1, 2] and d["mean"] == pytest.approx(0.11)
    table = grid.method_table(recs)
    assert table["kd"]["excess_kl"][0] == pytest.approx(0.425)
    assert table["kd"]["excess_kl"][1] > 0


def test_grid_refuses_an_evidence_dir_without_caches(grid, evidence, tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished teacher cache"):
        grid.run_grid(evidence, [grid.Arm("kd", "kd", cache=str(tmp_path / "nowhere"))], [1],
                      tmp_path / "grid", workers=1)


def test_collect_returns_only_finished_runs(grid, evidence, tmp_path):
    out = tmp_path / "grid"
    _finished(out / "runs" / "kd-a0.9-s2", 0.33)
    arms = [grid.Arm("kd", "kd"), grid.Arm("kd-a0.9", "kd", overrides={"kd_rate": 0.9})]
    recs = grid.run_grid(evidence, arms, [1, 2], out, workers=1,
                         threads=torch.get_num_threads(), train=False)
    # kd-s1 from the evidence run, kd-a0.9-s2 the grid's own; nothing else trained
    assert [r["run"] for r in recs] == ["kd-s1", "kd-a0.9-s2"]
    assert not (out / "runs" / "kd-a0.9-s1").exists() and not (out / "runs" / "kd-s2").exists()


def test_put_section_replaces_one_section_in_place_or_appends_it(grid):
    """The one helper evidence.py (kept_sections) and storage_curve.py (write_section) keep or
    replace a generated page's `## ` sections with."""
    doc = "# R\n\ntop\n\n## A\n\nold a\n\n### A\n\nsub\n\n## B\n\nb\n"
    assert grid.doc_sections(doc) == ["## A\n\nold a\n\n### A\n\nsub\n", "## B\n\nb\n"]
    assert grid.put_section(doc, "## A\n\nnew a\n\n\n") == "# R\n\ntop\n\n## A\n\nnew a\n\n## B\n\nb\n"
    assert grid.put_section(doc, "## B\nnew b\n") == "# R\n\ntop\n\n## A\n\nold a\n\n### A\n\nsub\n\n## B\nnew b\n"
    assert grid.put_section(doc + "\n\n", "## C\n\nc\n") == doc + "\n## C\n\nc\n"
    assert grid.put_section("", "## C\n") == "## C\n"
    assert grid.put_section("## Ab\n\nx\n", "## A\n") == "## Ab\n\nx\n\n## A\n"  # whole headings
