"""Verdicts from per-seed numbers: t math against known values, Holm, holds/reversed/
inconclusive, and gates that make claims `not testable`."""

from __future__ import annotations

import pytest

from dskd.pipeline.verdicts import (
    INCONCLUSIVE,
    NOT_TESTABLE,
    REVERSED,
    Claim,
    holm,
    judge,
    paired_test,
    t_quantile,
    t_two_sided_p,
)

SEEDS = [0, 1, 2, 3, 4]
CLAIMS = [
    Claim("KD > SFT", "kd", "sft", gates=("G1",)),
    Claim("DSKD > KD", "dskd", "kd", gates=("G1", "G2")),
    Claim("CMA > ULD", "cma", "uld", gates=("G1", "G2")),
]


def _runs(**means_and_noise):
    """per_seed[method][seed] = mean + noise[seed] (the noise pattern is what pairing cancels)."""
    noise = [0.00, 0.02, -0.01, 0.03, -0.02]
    return {m: {s: mu + k * noise[i] for i, s in enumerate(SEEDS)}
            for m, (mu, k) in means_and_noise.items()}


@pytest.mark.parametrize("df, q, want", [(4, 0.975, 2.7764451), (1, 0.975, 12.7062047),
                                          (29, 0.975, 2.0452296), (9, 0.95, 1.8331129)])
def test_t_quantiles_match_tables(df, q, want):
    assert t_quantile(q, df) == pytest.approx(want, abs=1e-5)
    assert t_two_sided_p(want, df) == pytest.approx(2 * (1 - q), abs=1e-7)


def test_paired_interval_is_mean_plus_minus_t_se():
    d = [0.1, 0.3, 0.2, 0.25, 0.15]
    r = paired_test(d)
    se = 0.0790569415 / 5 ** 0.5
    assert r["mean"] == pytest.approx(0.2)
    assert r["ci95"] == pytest.approx([0.2 - 2.7764451 * se, 0.2 + 2.7764451 * se])
    assert r["p"] == pytest.approx(t_two_sided_p(0.2 / se, 4))
    with pytest.raises(ValueError, match="≥ 2 seeds"):
        paired_test([0.1])


def test_holm_is_step_down_and_monotone():
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert got == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})


def test_holds_reversed_and_inconclusive():
    # kd clearly better than sft; dskd clearly worse than kd; cma vs uld: noise only
    runs = _runs(sft=(1.0, 1), kd=(0.8, 1), dskd=(0.9, 1), cma=(0.5, 1), uld=(0.5, -1))
    records, gates = judge(runs, CLAIMS, {"G1": True}, {"G2": "KD > SFT"})
    v = {r["claim"]: r for r in records}
    assert gates == {"G1": True, "G2": True}
    assert v["KD > SFT"]["verdict"] == "holds" and v["KD > SFT"]["mean"] == pytest.approx(0.2)
    assert v["KD > SFT"]["ci95"][0] > 0 and v["KD > SFT"]["diffs"] == pytest.approx([0.2] * 5)
    assert v["DSKD > KD"]["verdict"] == REVERSED and v["DSKD > KD"]["ci95"][1] < 0
    assert v["CMA > ULD"]["verdict"] == INCONCLUSIVE
    assert v["CMA > ULD"]["ci95"][0] < 0 < v["CMA > ULD"]["ci95"][1]


def test_unpaired_noise_would_hide_what_pairing_shows():
    """Seed effects shared by both methods cancel in the paired difference."""
    runs = _runs(sft=(1.0, 10), kd=(0.97, 10), dskd=(1, 0), cma=(1, 0), uld=(1, 0))
    records, _ = judge(runs, CLAIMS, {"G1": True}, {"G2": "KD > SFT"})
    assert records[0]["verdict"] == "holds" and records[0]["sd"] == pytest.approx(0, abs=1e-12)


def test_failed_gate_makes_guarded_claims_not_testable():
    runs = _runs(sft=(1.0, 1), kd=(1.0, -1), dskd=(0.5, 1), cma=(0.5, 1), uld=(0.9, 1))
    records, gates = judge(runs, CLAIMS, {"G1": True}, {"G2": "KD > SFT"})
    assert gates["G2"] is False  # KD > SFT is inconclusive, so G2 fails
    assert [r["verdict"] for r in records] == [INCONCLUSIVE, NOT_TESTABLE, NOT_TESTABLE]
    assert records[1]["why"] == "gate G2 failed"
    records, gates = judge(runs, CLAIMS, {"G1": False}, {"G2": "KD > SFT"})
    assert gates == {"G1": False, "G2": False}
    assert all(r["verdict"] == NOT_TESTABLE for r in records)
