"""benchmarks/storage_curve.py: bytes/token counts exactly the arrays a student reads, and the
curve's verdicts, table, figure and doc section follow from per-seed records alone."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def sc(load_benchmark):
    return load_benchmark("storage_curve")


@pytest.fixture(scope="module")
def tiny_cache(toy_world, tmp_path_factory):
    """fp8 hidden + top-4 + 8 sampled draws in one cache (12 examples, 2 shards)."""
    from dskd.stages.cache_teacher import CacheTeacherConfig
    from dskd.stages.cache_teacher import run as cache_run

    d = tmp_path_factory.mktemp("curve")
    lines = Path(toy_world.train).read_text().splitlines()[:12]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    cache_run(CacheTeacherConfig(teacher=str(toy_world.teacher), data=str(d / "train.jsonl"),
                                 out=str(d / "cache"), hidden_dtype="fp8", top_k=4,
                                 sampled_targets=8, sampled_temperature=2.0, shard_size=8,
                                 progress=False))
    return d / "cache"


READS = {"exact": ["hidden"], "topk": ["topk_ids", "topk_logprobs", "tail_logprob"],
         "sampled": ["sampled_ids", "sampled_counts"]}  # pipeline/train/setup.cache_fields


@pytest.mark.parametrize("signal", ["exact", "topk", "sampled"])
def test_bytes_per_token_are_the_stored_bytes_of_the_arrays_the_reader_opens(sc, tiny_cache,
                                                                             signal):
    from dskd.pipeline.cache.manifest import load_manifest
    from dskd.pipeline.cache.reader import CacheReader

    m = load_manifest(tiny_cache)
    got = sc.signal_bytes(m, signal)
    reader = CacheReader(tiny_cache, fields=READS[signal])
    opened = set()
    for i in reader.shard_indices():
        opened |= set(reader._shard(i).arrays)
    assert set(got["arrays"]) == opened  # no array missed, none counted that is not read
    on_disk = sum(f.stat().st_size for s in (tiny_cache / "shards").iterdir() for name in opened
                  for f in (s / name).rglob("*") if f.is_file())
    assert got["per_token"] == pytest.approx(on_disk / m["totals"]["n_rows"], rel=1e-9)
    if signal == "exact":
        v, d = m["layout"]["vocab_size"], m["layout"]["hidden_size"]
        assert got["head_bytes"] >= 4 * v * d  # the fp32 head, the embeddings not counted
        assert got["head_bytes"] < 8 * v * d


def _records(means: dict[str, float], seeds=(1, 2, 3, 4, 5)):
    """evidence_grid-shaped records: a seed effect every arm shares, a little noise."""
    wiggle = [0.0, 0.03, -0.02, 0.05, -0.04]
    noise = [0.001, -0.002, 0.002, -0.001, 0.0]
    out = []
    for j, (name, mu) in enumerate(means.items()):
        for i, s in enumerate(seeds):
            kl = mu + wiggle[i] + noise[(i + j) % 5]
            out.append({"run": f"{name}-s{s}", "method_name": name, "seed": s,
                        "valid": {"excess_kl": kl}, "test": {"excess_kl": kl}})
    return out


def test_verdicts_table_figure_and_doc_follow_from_the_records(sc, tmp_path):
    means = {"exact-fp16": 0.50, "exact-fp8": 0.50, "topk1-bucket": 0.80, "sampled4": 0.40,
             "xvocab-dskd-eta": 0.70, "xvocab-dskd-cma": 0.90}
    recs = _records(means)
    meta = {v.name: v for v in sc.variants() + sc.eta_variants()}
    nbytes = {name: {"per_token": 100.0 / (j + 1)} for j, name in enumerate(means)}
    s = sc.summarize(recs, meta, nbytes, {"G1": True, "G2": True})
    md = sc.render(s)
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and "B/token" not in ln]
    assert [ln.split(" | ")[0] for ln in body[:4]] == [  # most bytes first
        "| exact, fp16 hidden", "| exact, fp8 hidden", "| top-1, bucket", "| sampled N=4"]
    assert "**holds**" in md and "+0.300" in md
    png = sc.plot(s, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\ntop part\n\n## Storage–accuracy curve\n\nstale text\n\n## Later\n\nkeep\n")
    sc.write_section(doc, sc.doc_section(s, "python benchmarks/storage_curve.py ...", "f.png"))
    text = doc.read_text()
    assert "stale text" not in text and "top part" in text and text.endswith("evidence.json).\n\n## Later\n\nkeep\n")
    assert text.count("## Storage–accuracy curve") == 1 and "sampled N=4" in text
    reading = sc.plain_reading(s)
    assert "Not distinguishable from the fp16-exact student with these seeds (" in reading
    assert reading.index("exact, fp8 hidden") < reading.index("Further from the truth")
    assert "DSKD-ETA vs DSKD-CMA (cross vocabulary, same seeds): **holds**" in reading


def test_every_variant_is_a_grid_arm_and_the_references_are_evidence_runs(sc, load_benchmark,
                                                                          tmp_path):
    """The grid reuses an evidence run only on an equal resolved config: the fp16-exact and
    DSKD-CMA arms must be evidence's kd-fkl and xvocab-dskd-cma exactly."""
    from dskd.stages.distill import DistillConfig

    ev = load_benchmark("evidence")
    arms = {v.name: v.arm(tmp_path) for v in sc.variants() + sc.eta_variants()}
    assert len(arms) == 1 + 1 + 2 * len(sc.TOPK_KS) + len(sc.SAMPLED_NS) + 2
    for ref, name in ((sc.EXACT, "kd-fkl"), (sc.CMA, "xvocab-dskd-cma")):
        a = arms[ref]
        assert (a.model, a.method, a.divergence) == ev.METHODS[name] and a.cache is None
        assert all(getattr(DistillConfig(), k) == v for k, v in a.overrides.items())
    t = arms["topk4-renorm"]
    assert t.cache == str(tmp_path / "variants" / "topk4" / "cache")
    assert dict(t.overrides) == {"teacher_signal": "topk", "sparse_tail": "renorm"}
    assert sc.cache_variants()["sampled16"]["sampled_temperature"] == DistillConfig().kd_temperature


def test_report_only_reads_finished_runs_and_pairs_only_shared_seeds(sc, tmp_path):
    """--report-only: own runs from OUT, the reference arms from the evidence dir, nothing
    else; a variant with fewer than 2 seeds paired with fp16-exact gets no verdict."""
    import json

    ev, out = tmp_path / "ev", tmp_path / "out"

    def truth(d: Path, kl: float) -> None:
        d.mkdir(parents=True)
        (d / "truth.json").write_text(json.dumps({"valid": {"excess_kl": kl},
                                                  "test": {"excess_kl": kl}}))

    for s, kl in ((1, 0.5), (2, 0.6), (3, 0.55)):
        truth(ev / "runs" / f"kd-fkl-s{s}", kl)
        truth(out / "runs" / f"topk4-bucket-s{s}", kl + 0.3)
    truth(out / "runs" / "sampled4-s1", 0.4)
    truth(ev / "runs" / "sampled16-s1", 9.9)  # not an evidence arm: never read from there
    todo = [v for v in sc.variants() if v.name in ("exact-fp16", "topk4-bucket", "sampled4",
                                                   "sampled16")]
    recs = sc.collect(ev, out, todo, [1, 2, 3])
    assert sorted((r["method_name"], r["seed"]) for r in recs) == sorted(
        [("exact-fp16", s) for s in (1, 2, 3)] + [("topk4-bucket", s) for s in (1, 2, 3)]
        + [("sampled4", 1)])
    nbytes = {v.name: {"per_token": 1.0} for v in todo}
    rows = {r["arm"]: r for r in sc.summarize(recs, {v.name: v for v in todo}, nbytes)["curve"]}
    assert rows["topk4-bucket"]["vs_exact"]["mean"] == pytest.approx(0.3)
    assert "vs_exact" not in rows["sampled4"] and rows["sampled4"]["n"] == 1
