"""benchmarks/sensitivity.py: its cells, paired differences vs the default and readings follow
from the per-run records alone; the collapsing DSKD α 1 arms run with --force, marked."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sens(load_benchmark):
    return load_benchmark("sensitivity")


def _records(sens, means: dict[str, float], seeds=(1, 2, 3, 4, 5), force=()):
    wiggle = [0.0, 0.03, -0.02, 0.05, -0.04]  # a seed effect every arm shares
    out = []
    for name, mu in means.items():
        for i, s in enumerate(seeds):
            m = {"excess_kl": mu + wiggle[i], "validity": 0.5 - mu / 10}
            out.append({"run": f"{name}-s{s}", "method_name": name, "seed": s,
                        "overrides": {"force": True} if name in force else {},
                        "reused_from": "ev/runs/x" if name.endswith("a0.5-t2") else None,
                        "test": m, "valid": m})
    return out


def test_arms_cover_the_grid_and_force_only_the_known_collapse(sens):
    arms = {a.name: a for a in sens.arms()}
    assert len(arms) == 12 and {a.method for a in arms.values()} == {"kd", "dskd"}
    assert {a.divergence for a in arms.values()} == {"fkl"}
    forced = {n for n, a in arms.items() if a.overrides.get("force")}
    assert forced == {"dskd-a1-t1", "dskd-a1-t2"}
    assert arms["kd-a0.9-t1"].overrides == {"kd_rate": 0.9, "kd_temperature": 1.0}


def test_cells_and_readings_follow_from_the_records(sens):
    means = {"kd-a0.5-t2": 1.0, "kd-a1-t1": 0.6, "kd-a0.9-t2": 1.2,
             "dskd-a0.5-t2": 1.0, "dskd-a1-t2": 3.0}
    recs = _records(sens, means, force=("dskd-a1-t2",))
    # one arm whose per-seed differences straddle 0
    for r, d in zip([r for r in recs if r["method_name"] == "kd-a0.9-t2"],
                    [-0.3, 0.25, -0.28, 0.3, -0.2], strict=True):
        r["test"] = {**r["test"], "excess_kl": 1.0 + d}
    res = sens.summarize(recs)
    cells = {c["arm"]: c for c in res["cells"]}
    assert [c["arm"] for c in res["cells"]] == ["kd-a0.5-t2", "kd-a0.9-t2", "kd-a1-t1",
                                                "dskd-a0.5-t2", "dskd-a1-t2"]
    assert cells["kd-a0.5-t2"]["default"] and "vs_default" not in cells["kd-a0.5-t2"]
    assert cells["kd-a0.5-t2"]["reused"] == [1, 2, 3, 4, 5]
    better = cells["kd-a1-t1"]["vs_default"]
    assert better["mean"] == pytest.approx(0.4) and better["reading"] == "better"
    assert cells["kd-a0.9-t2"]["vs_default"]["reading"] == "inconclusive"
    worse = cells["dskd-a1-t2"]
    assert worse["forced"] and worse["vs_default"]["reading"] == "worse"
    assert worse["vs_default"]["mean"] == pytest.approx(-2.0)
    md = sens.render(res)
    assert "| KD | 1 | 1 | 5 | 0.604 ± 0.0" in md and "| +0.400 |" in md
    assert "| DSKD (--force) | 1 | 2 | 5 |" in md and "default (paper)" in md
    reading = sens.plain_reading(res)
    assert "KD: better than the default: α 1 τ 1 (+0.400" in reading
    assert "DSKD: worse than the default: α 1 τ 2 (-2.000" in reading


def test_a_cell_with_one_seed_gets_no_interval(sens):
    recs = _records(sens, {"kd-a0.5-t2": 1.0}) + _records(sens, {"kd-a1-t1": 0.6}, seeds=(1,))
    res = sens.summarize(recs)
    cell = next(c for c in res["cells"] if c["arm"] == "kd-a1-t1")
    assert cell["seeds"] == [1] and "vs_default" not in cell
    assert "| KD | 1 | 1 | 1 | 0.600 | 44.0 | — | — | fewer than 2 paired seeds |" in sens.render(res)
