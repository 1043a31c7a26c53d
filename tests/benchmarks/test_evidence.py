"""benchmarks/evidence.py's summary: verdicts and gates follow from its per-run records alone."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ev(load_benchmark):
    return load_benchmark("evidence")


def _records(ev, means: dict[str, float], seeds=(1, 2, 3, 4, 5)):
    wiggle = [0.0, 0.03, -0.02, 0.05, -0.04]  # a seed effect every method shares
    out = []
    for name, mu in means.items():
        key, method, div = ev.METHODS[name]
        for i, s in enumerate(seeds):
            m = {"excess_kl": mu + wiggle[i], "excess_kl_per_token": (mu + wiggle[i]) / 6,
                 "validity": 0.5, "excess_nll": mu}
            out.append({"run": f"{name}-s{s}", "method_name": name, "method": method,
                        "divergence": div, "vocab": "bpe" if key == "student" else "spbpe",
                        "model": key, "seed": s, "params": 1, "valid": dict(m), "test": m})
    return out


MEANS = {"sft": 1.0, "kd-fkl": 0.8, "dskd-fkl": 0.8, "kd-rkl": 0.9, "dskd-rkl": 1.1,
         "xvocab-sft": 1.2, "xvocab-uld": 1.0, "xvocab-mined": 1.3, "xvocab-dskd-cma": 1.0}


def _teacher(kl):
    return {"test": {"excess_kl": kl, "excess_kl_per_token": kl / 6, "validity": 0.9,
                     "excess_nll": kl}}


def test_verdicts_and_gates_follow_from_the_records(ev):
    res = ev.summarize(_records(ev, MEANS), _teacher(0.3), [1, 2, 3, 4, 5])
    v = {c["claim"]: c for c in res["claims"]}
    assert res["gates"]["G1"]["holds"] and res["gates"]["G2"]["holds"]
    assert v["KD > SFT"]["verdict"] == "holds" and v["KD > SFT"]["mean"] == pytest.approx(0.2)
    assert v["DSKD > KD (rkl)"]["verdict"] == "reversed"
    assert v["DSKD-CMA > MinED"]["verdict"] == "holds"
    assert v["DSKD > KD (fkl)"]["verdict"] == "inconclusive"  # identical numbers
    # best cross-vocab KD is picked on validation, then tested on test
    assert res["best_xvocab_kd"]["method"] in ("xvocab-uld", "xvocab-dskd-cma")
    assert v["best cross-vocab KD > cross-vocab SFT"]["verdict"] == "holds"
    md = ev.render(res)
    assert "| KD > SFT | +0.200 |" in md and "**reversed**" in md
    assert "Holds: KD > SFT" in ev.plain_summary(res)


def test_a_weak_teacher_makes_every_claim_not_testable(ev):
    res = ev.summarize(_records(ev, MEANS), _teacher(0.6), [1, 2, 3, 4, 5])
    assert not res["gates"]["G1"]["holds"]
    assert res["gates"]["G1"]["ratio"] == pytest.approx(0.6, rel=0.01)
    assert {c["verdict"] for c in res["claims"]} == {"not testable"}


def test_kd_not_beating_sft_closes_the_g2_claims(ev):
    res = ev.summarize(_records(ev, {**MEANS, "kd-fkl": 1.0}), _teacher(0.3), [1, 2, 3, 4, 5])
    assert res["gates"]["G1"]["holds"] and not res["gates"]["G2"]["holds"]
    verdicts = {c["claim"]: c["verdict"] for c in res["claims"]}
    assert verdicts.pop("KD > SFT") == "inconclusive"
    assert set(verdicts.values()) == {"not testable"}


def test_results_page_states_each_worlds_own_vocabulary_checks(ev, tmp_path):
    """The second vocabulary is rebuilt per world seed: the page reads its checks from each
    world's toyworld.json instead of quoting one world's numbers for all."""
    import json

    results = []
    for ws, (ratio, agree) in enumerate([(1.1078, 0.736), (1.2, 0.81)]):
        world = tmp_path / f"ev{ws}" / "world"
        world.mkdir(parents=True)
        (world / "toyworld.json").write_text(json.dumps({"tokenizers": {"spbpe": {
            "vs_teacher": {"label_token_ratio": ratio, "boundary_agreement": agree}}}}))
        res = ev.summarize(_records(ev, MEANS), _teacher(0.3), [1, 2, 3, 4, 5])
        student = {"params": 2e5, "rows": 300, "epochs": 20, "lr": 3e-3, "projector_lr": 6e-3,
                   "tokens_seen": 1000}
        res.update({"world_seed": ws, "seeds": [1, 2, 3, 4, 5], "command": "cmd",
                    "world": ev.world_stats(world),
                    "sizes": {"teacher": {"params": 1e6, "rows": 20300, "epochs": 2, "lr": 3e-3,
                                          "tokens_seen": 5000},
                              "students": {"student": student, "student_xvocab": student}},
                    "machine": {"platform": "p", "cpus": 2, "torch": "t"},
                    "wall_s": {"total": 60, "teacher_and_caches": 10, "students": 50},
                    "cpu_s": 100})
        results.append(res)
    doc = ev.render_doc(results)
    assert "1.11x, 74% (world seed 0); 1.20x, 81% (world seed 1)" in doc
    assert "## World seed 0" in doc and "## World seed 1" in doc


def test_regenerating_the_page_keeps_the_other_studies_sections(ev):
    old = ("# Results\n\n## Status\n\nold status\n\n## The SFT-only sweep that fixed it\n\n| a |\n\n"
           "## Storage–accuracy curve\n\ncurve table\n")
    new = "# Results\n\n## Setup\n\nnew\n"
    kept = ev.kept_sections(old, new)
    assert "## Status" not in kept  # superseded by the generated part
    assert kept.index("## The SFT-only sweep") < kept.index("## Storage–accuracy curve")
    assert "curve table" in kept and "| a |" in kept
    assert ev.kept_sections(old, new + "\n## Storage–accuracy curve\n\nfresh\n").count(
        "curve table") == 0  # a section the new page has is not kept twice
