"""Storage–accuracy curve: how close to the truth a KD student gets from what the cache stores.

    python benchmarks/storage_curve.py --evidence EV --out OUT [--seeds 5] [--write-doc FILE]

Reads a finished (or running) `benchmarks/evidence.py --out EV` directory: its world, its one
teacher, its caches and its per-seed student inits. Caches the same teacher over the same
train/valid splits once per variant (exact hidden states fp8; top-k k ∈ {1, 4, 16, 64};
sampled targets N ∈ {4, 16, 64}; the fp16-exact variant is the evidence cache itself), trains
the same KD student (kd, fkl, α 0.5, τ 2, the evidence preset's lr/epochs) from each under the
evidence seeds (seed s = EV's init s + data order s: paired with every evidence run), and
scores every student exactly against the truth (excess KL per response on the test split).

The fp16-exact arm IS evidence's `kd-fkl` (same cache, init, order and settings): its runs are
read from EV when finished. Also `xvocab-dskd-eta` (DSKDv2's exact token alignment, defaults)
paired against evidence's `xvocab-dskd-cma`, with the paired verdict of pipeline/verdicts.py.

Writes OUT/curve.json (per-run records, per-arm summary, the ETA-vs-CMA claim), OUT/curve.md
and OUT/curve.png (excess KL against measured bytes/token, log x). A rerun skips finished
caches and runs. Nothing is written into EV.

Bytes/token of a variant = the stored bytes (Zarr chunks + metadata, from the cache manifest's
`field_bytes`) of exactly the per-token arrays its student reads, over the train cache's token
rows: exact: `hidden` (+ `hidden_scale` for fp8); top-k: `topk_ids` (+ `topk_ids_hi`),
`topk_logprobs` (+ `topk_logprob_bounds` for q8), `tail_logprob`; sampled: `sampled_n`,
`sampled_ids`, `sampled_counts`. The exact variants also need the teacher's LM head once per
cache; it is NOT in the per-token figure (it does not grow with the data) and is reported
beside it (`head_bytes`, and what it would add per token over this small cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

EXACT = "exact-fp16"  # the reference arm: evidence's kd-fkl
ETA, CMA = "xvocab-dskd-eta", "xvocab-dskd-cma"
TOPK_KS = (1, 4, 16, 64)
SAMPLED_NS = (4, 16, 64)
KD_TAU = 2.0  # distill's default --kd-temperature: the sampled draws must be made at it

# per-token arrays the student reads, per teacher signal (pipeline/train/setup.cache_fields plus
# the companions pipeline/cache/reader.py opens with them); absent ones count 0
SIGNAL_ARRAYS: dict[str, tuple[str, ...]] = {
    "exact": ("hidden", "hidden_scale"),
    "topk": ("topk_ids", "topk_ids_hi", "topk_logprobs", "topk_logprob_bounds", "tail_logprob"),
    "sampled": ("sampled_n", "sampled_ids", "sampled_counts"),
}
HEAD_TENSORS = ("lm_head.weight", "lm_head.bias")  # what hidden × head needs (not the embeddings)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of the study: a cache variant (None = the evidence cache) read one way."""

    name: str
    cache: str | None
    signal: str  # exact | topk | sampled: which arrays the student reads
    overrides: dict[str, Any]  # distill options beyond the evidence defaults
    label: str
    model: str = "student"
    method: str = "kd"

    def arm(self, out: Path) -> Any:
        """The evidence_grid arm that trains it (caches under OUT/variants/<cache>/cache)."""
        from evidence_grid import Arm

        cache = str(out / "variants" / self.cache / "cache") if self.cache else None
        return Arm(self.name, self.method, "fkl", self.model, dict(self.overrides), cache)


def cache_variants() -> dict[str, dict[str, Any]]:
    """Variant name -> cache-teacher options (over the evidence cache's other settings)."""
    out: dict[str, dict[str, Any]] = {"exact-fp8": {"hidden_dtype": "fp8", "top_k": 0}}
    out |= {f"topk{k}": {"top_k": k} for k in TOPK_KS}
    out |= {f"sampled{n}": {"top_k": 0, "sampled_targets": n, "sampled_temperature": KD_TAU}
            for n in SAMPLED_NS}
    return out


def variants() -> list[Variant]:
    """The curve: the fp16-exact reference (= evidence's kd-fkl: same cache, init, order and
    settings, so the grid reuses those runs) and one student per variant and tail rule."""
    v = [Variant(EXACT, None, "exact", {"teacher_signal": "exact"}, "exact, fp16 hidden"),
         Variant("exact-fp8", "exact-fp8", "exact", {"teacher_signal": "exact"},
                 "exact, fp8 hidden")]
    for k in TOPK_KS:
        v += [Variant(f"topk{k}-{tail}", f"topk{k}", "topk",
                      {"teacher_signal": "topk", "sparse_tail": tail}, f"top-{k}, {tail}")
              for tail in ("bucket", "renorm")]
    v += [Variant(f"sampled{n}", f"sampled{n}", "sampled", {"teacher_signal": "sampled"},
                  f"sampled N={n}") for n in SAMPLED_NS]
    return v


def eta_variants() -> list[Variant]:
    """DSKD-ETA, and DSKD-CMA as the evidence run trains it (the grid reuses those runs)."""
    return [Variant(ETA, None, "exact", {}, "DSKD-ETA (cross vocab)", "student_xvocab",
                    "dskd-eta"),
            Variant(CMA, None, "exact", {}, "DSKD-CMA (cross vocab)", "student_xvocab",
                    "dskd-cma")]


# --------------------------------------------------------------------------- bytes


def signal_bytes(manifest: dict[str, Any], signal: str) -> dict[str, Any]:
    """Measured bytes per token row of what a `signal` student reads from this cache."""
    totals = manifest["totals"]
    rows = totals["n_rows"]
    per = {n: totals["field_bytes"][n] / rows for n in SIGNAL_ARRAYS[signal]
           if n in totals["field_bytes"]}
    out: dict[str, Any] = {"n_rows": rows, "arrays": per, "per_token": sum(per.values())}
    if signal == "exact":
        tensors = manifest["head"]["tensors"]
        head = sum(math.prod(tensors[t]["shape"]) * _itemsize(tensors[t]["dtype"])
                   for t in HEAD_TENSORS if t in tensors)
        out |= {"head_bytes": head, "head_per_token_here": head / rows}
    return out


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}[dtype]


# --------------------------------------------------------------------------- runs


def _grid() -> Any:
    """benchmarks/evidence_grid.py (a sibling module: benchmarks/ on sys.path, as for a script)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import evidence_grid

    return evidence_grid


def build_caches(ev_dir: Path, out: Path, names: list[str]) -> None:
    """One train+valid cache per variant from the evidence teacher, OUT/variants/<name>/cache
    (skip-finished; seconds each)."""
    from dskd.pipeline.toyworld import ToyWorld
    from dskd.stages import quickstart as qs

    world = ToyWorld.load(ev_dir / "world")
    teacher = ev_dir / "runs" / "teacher" / "final"
    if not (teacher / "config.json").is_file():
        raise SystemExit(f"{teacher}: no teacher there; run benchmarks/evidence.py --out {ev_dir} "
                         "first (it trains the teacher before any student)")
    options = cache_variants()
    for name in names:
        qs.cache_splits(out / "variants" / name, world, teacher, qs.SIZES["evidence"], "cpu",
                        progress=False, **options[name])


def measured_bytes(ev_dir: Path, out: Path, todo: list[Variant]) -> dict[str, dict[str, Any]]:
    from dskd.pipeline.cache.manifest import load_manifest

    return {v.name: signal_bytes(load_manifest(
        out / "variants" / v.cache / "cache" / "train" if v.cache else ev_dir / "cache" / "train"),
        v.signal) for v in todo}


def run(ev_dir: Path, out: Path, todo: list[Variant], seeds: list[int], workers: int,
        threads: int) -> list[dict[str, Any]]:
    """Records (evidence_grid's shape) of every variant × seed. The variants that are evidence
    runs (fp16-exact, DSKD-CMA) go last: by then the evidence run has usually finished them,
    and the grid reads them instead of training them again."""
    grid = _grid()
    build_caches(ev_dir, out, sorted({v.cache for v in todo if v.cache}))
    reference = {EXACT, CMA}
    new = [v.arm(out) for v in todo if v.name not in reference]
    ref = [v.arm(out) for v in todo if v.name in reference]
    return (grid.run_grid(ev_dir, new, seeds, out, workers, threads)
            + grid.run_grid(ev_dir, ref, seeds, out, workers, threads))


def collect(ev_dir: Path, out: Path, todo: list[Variant], seeds: list[int]
            ) -> list[dict[str, Any]]:
    """Records of the runs already finished (OUT/runs, and the evidence runs the reference
    arms are), training nothing: to report a run still in progress or cut short."""
    refs = {EXACT: "kd-fkl", CMA: CMA}
    got = []
    for s in seeds:
        for v in todo:
            for f in (out / "runs" / f"{v.name}-s{s}" / "truth.json",
                      ev_dir / "runs" / f"{refs.get(v.name, v.name)}-s{s}" / "truth.json"):
                if f.is_file() and (f.parent.parent.parent == out or v.name in refs):
                    t = json.loads(f.read_text())
                    got.append({"run": f"{v.name}-s{s}", "method_name": v.name, "seed": s,
                                "valid": t["valid"], "test": t["test"],
                                "reused_from": str(f.parent) if v.name in refs else None})
                    break
    return got


# --------------------------------------------------------------------------- summary


def summarize(records: list[dict[str, Any]], meta: dict[str, Variant],
              nbytes: dict[str, dict[str, Any]], gates: dict[str, bool] | None = None,
              metric: str = "excess_kl") -> dict[str, Any]:
    """From per-run records alone (evidence_grid's shape; `method_name` = variant name): per
    curve variant, its measured bytes/token, mean ± 95% t half-width, and the paired difference
    to the fp16-exact arm (variant − exact; > 0 = further from the truth) with Holm verdicts
    over the variants; and the DSKD-ETA vs DSKD-CMA claim (behind the evidence gates if given)."""
    from dskd.pipeline.verdicts import Claim, judge, paired_test

    per_seed: dict[str, dict[int, float]] = {}
    for r in records:
        per_seed.setdefault(r["method_name"], {})[r["seed"]] = r["test"][metric]
    curve = [a for a in per_seed if meta[a].model == "student"]
    def shared(a: str, b: str) -> int:
        return len(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))

    others = [a for a in curve if a != EXACT and shared(a, EXACT) >= 2]  # a paired test needs 2
    verdicts = {}
    if EXACT in per_seed and others:
        claims, _ = judge(per_seed, [Claim(a, EXACT, a) for a in others], {})
        verdicts = {c["claim"]: c for c in claims}
    rows = []
    for a in curve:
        vals = [per_seed[a][s] for s in sorted(per_seed[a])]
        t = paired_test(vals) if len(vals) > 1 else {"mean": vals[0], "ci95": [vals[0]] * 2}
        row = {"arm": a, "label": meta[a].label, "signal": meta[a].signal,
               "bytes_per_token": nbytes[a]["per_token"], "bytes": nbytes[a],
               "n": len(vals), "mean": t["mean"], "half": t["ci95"][1] - t["mean"],
               "per_seed": per_seed[a]}
        if a in verdicts:
            c = verdicts[a]
            row["vs_exact"] = {"mean": c["mean"], "ci95": c["ci95"],
                               "p_holm": c["p_holm"], "seeds": c["seeds"],
                               "verdict": {"holds": "worse", "reversed": "better",
                                           "inconclusive": "inconclusive"}[c["verdict"]]}
        rows.append(row)
    out: dict[str, Any] = {"metric": metric, "curve": rows}
    if shared(ETA, CMA) >= 2:
        claim = Claim("DSKD-ETA > DSKD-CMA", ETA, CMA, gates=tuple(gates or ()))
        recs, outcome = judge(per_seed, [claim], gates or {})
        out["eta_vs_cma"] = recs[0] | {"gates_outcome": outcome, "gates_from": (
            "evidence.json" if gates else "none (evidence.json not written yet)"),
            "means": {n: sum(per_seed[n].values()) / len(per_seed[n]) for n in (ETA, CMA)}}
    return out


def sft_reference(ev_dir: Path, seeds: list[int], metric: str = "excess_kl"
                  ) -> dict[str, Any] | None:
    """The evidence run's SFT students (no teacher) over these seeds: the floor a cache
    variant has to beat to be worth anything (context for the figure, not a claim)."""
    vals = {s: json.loads(f.read_text())["test"][metric] for s in seeds
            if (f := ev_dir / "runs" / f"sft-s{s}" / "truth.json").is_file()}
    return {"seeds": sorted(vals), "mean": sum(vals.values()) / len(vals)} if vals else None


def _gates(ev_dir: Path) -> dict[str, bool] | None:
    f = ev_dir / "evidence.json"
    if not f.is_file():
        return None
    g = json.loads(f.read_text())["gates"]
    return {k: bool(v["holds"]) for k, v in g.items()}


# --------------------------------------------------------------------------- rendering


def render(summary: dict[str, Any], figure: str | None = "curve.png") -> str:
    lines = [("| variant | signal B/token | seeds | excess KL (nats/response) | variant − exact "
              "(paired) | 95% CI | p (Holm) | reading |"), "|---|---:|---:|---:|---:|---|---:|---|"]
    for r in sorted(summary["curve"], key=lambda r: -r["bytes_per_token"]):
        v = r.get("vs_exact")
        tail = (f"{v['mean']:+.3f} | [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] | "
                f"{v['p_holm']:.2g} | {v['verdict']}" if v else
                "— | — | — | " + ("reference" if r["arm"] == EXACT else "too few paired seeds"))
        spread = f" ± {r['half']:.3f}" if r["n"] > 1 else ""
        lines.append(f"| {r['label']} | {r['bytes_per_token']:.1f} | {r['n']} | "
                     f"{r['mean']:.3f}{spread} | {tail} |")
    if summary.get("sft"):
        lines += ["", (f"For scale: SFT without a teacher (the evidence run's `sft`, seeds "
                       f"{summary['sft']['seeds']}) is at {summary['sft']['mean']:.3f}.")]
    e = summary.get("eta_vs_cma")
    if e:
        lines += ["", "| claim | mean paired diff (nats/response) | 95% CI | p | verdict |",
                  "|---|---:|---|---:|---|",
                  (f"| {e['claim']} (ETA {e['means'][ETA]:.3f}, CMA {e['means'][CMA]:.3f}) | "
                   f"{e['mean']:+.3f} | [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}] | "
                   f"{e['p_holm']:.3g} | **{e['verdict']}** |")]
    if figure:
        lines += ["", f"![storage–accuracy curve]({figure})"]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Excess KL (mean ± 95% t half-width) against signal bytes/token, log x; one series per
    signal family, the fp16-exact mean as a dashed line."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from dskd.pipeline.plots import _save

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    style = {"exact": ("s", "tab:blue"), "topk-bucket": ("o", "tab:orange"),
             "topk-renorm": ("^", "tab:green"), "sampled": ("D", "tab:red")}
    for fam, (marker, color) in style.items():
        pts = sorted((r for r in summary["curve"] if _family(r) == fam),
                     key=lambda r: r["bytes_per_token"])
        if not pts:
            continue
        ax.errorbar([r["bytes_per_token"] for r in pts], [r["mean"] for r in pts],
                    yerr=[r["half"] for r in pts], marker=marker, color=color, capsize=3,
                    linestyle="-" if fam != "exact" else "none", label=fam)
        for r in pts:  # short tags; bucket/exact above the point, renorm/sampled below
            tag = {"exact": lambda r: r["label"].split(", ")[1].split()[0],
                   "sampled": lambda r: r["label"].split()[-1]}.get(
                fam, lambda r: "k=" + r["label"].split(",")[0].removeprefix("top-"))(r)
            ax.annotate(tag, (r["bytes_per_token"], r["mean"]), textcoords="offset points",
                        xytext=(4, 4 if fam in ("exact", "topk-bucket") else -10), fontsize=7,
                        color=color)
    ref = next((r for r in summary["curve"] if r["arm"] == EXACT), None)
    if ref:
        ax.axhline(ref["mean"], color="tab:blue", linestyle="--", linewidth=0.8)
    if summary.get("sft"):
        ax.axhline(summary["sft"]["mean"], color="grey", linestyle=":", linewidth=1.0,
                   label="SFT, no teacher (evidence run)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if str(int(x))[0] in "25"
                                               and x == int(x) else ""))
    ax.set_xlabel("bytes per token row the student reads (measured; log scale)")
    ax.set_ylabel("test excess KL to the truth (nats/response)")
    ax.set_title("KD student quality vs what the cache stores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _family(row: dict[str, Any]) -> str:
    """Plot series: exact, topk-bucket, topk-renorm, sampled."""
    if row["signal"] == "topk":
        return "topk-" + row["arm"].rsplit("-", 1)[1]
    return row["signal"]


def plain_reading(summary: dict[str, Any]) -> str:
    """Which variants cannot be told apart from the fp16-exact student, which are worse or
    better (paired, Holm-corrected over the variants), and the ETA-vs-CMA verdict."""
    by: dict[str, list[str]] = {}
    for r in sorted(summary["curve"], key=lambda r: -r["bytes_per_token"]):
        v = r.get("vs_exact")
        if v:
            by.setdefault(v["verdict"], []).append(
                f"{r['label']} ({r['bytes_per_token']:.0f} B/token, {v['mean']:+.3f} "
                f"[{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}])")
    parts = []
    for verdict, say in (("inconclusive", ("Not distinguishable from the fp16-exact student "
                          "with these seeds (paired difference not significant after Holm over "
                          "the variants; uncorrected 95% interval shown — a wide interval means "
                          "too little power, not equality)")),
                         ("worse", "Further from the truth than fp16-exact"),
                         ("better", "Closer to the truth than fp16-exact")):
        if by.get(verdict):
            parts.append(f"{say}: " + "; ".join(by[verdict]) + ".")
    e = summary.get("eta_vs_cma")
    if e:
        parts.append(f"DSKD-ETA vs DSKD-CMA (cross vocabulary, same seeds): **{e['verdict']}** "
                     f"({e['mean']:+.3f} nats/response, 95% CI [{e['ci95'][0]:+.3f}, "
                     f"{e['ci95'][1]:+.3f}], > 0 = ETA closer to the truth; gates from "
                     f"{e['gates_from']}).")
    return " ".join(parts)


INTRO = (
    "How close to the truth a student gets depending on what the cache stores. One teacher "
    "(the evidence run's), one cache per variant over the same 300 distillation rows, the same "
    "KD student (kd, forward KL, α 0.5, τ 2, the evidence preset's lr and epochs) trained from "
    "each under the evidence seeds (seed s = the evidence run's init s and data order s, so "
    "every run pairs with the fp16-exact student, which is the evidence run's `kd-fkl`), scored "
    "exactly against the truth on the test split (excess KL per response; lower is better). "
    "Signal B/token = the measured stored bytes of exactly the per-token arrays that student "
    "reads (docs/benchmarks.md, \"The storage–accuracy variants\"); the exact variants also read "
    "the teacher's LM head once per cache, not counted per token. Top-k log-probs are q8, ids "
    "uint16; sampled targets are drawn at τ 2 (as `--teacher-signal sampled` requires). "
    "Intervals: 95% t over seeds (mean ± half-width); paired differences against fp16-exact "
    "over the seeds both have, Holm-corrected over the variants.")


def doc_section(summary: dict[str, Any], command: str, figure: str) -> str:
    import textwrap

    return "\n".join(["## Storage–accuracy curve", "", textwrap.fill(INTRO, 100), "",
                      f"Command: `{command}`", "", render(summary, figure),
                      textwrap.fill(plain_reading(summary), 100)]) + "\n"


def write_section(doc: Path, section: str) -> None:
    """Replace the section of `doc` that has `section`'s `## ` heading, or append it at the end."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    doc.write_text(_grid().put_section(text, section), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", type=Path, required=True, help="a benchmarks/evidence.py --out dir")
    ap.add_argument("--out", type=Path, required=True)
    _grid().add_run_args(ap)
    ap.add_argument("--no-eta", action="store_true", help="skip the DSKD-ETA vs DSKD-CMA arm")
    ap.add_argument("--arms", default=None,
                    help="comma-separated variant names to run, in this order within each seed "
                         "(default: all; e.g. to put the ones a short run must have first)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the runs already finished (seeds may differ "
                         "per variant; the table says how many each has)")
    ap.add_argument("--write-doc", type=Path, default=None,
                    help="also put the section into this markdown file (replaced if there)")
    a = ap.parse_args()
    _grid().check_run_args(ap, a)
    a.out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    seeds = list(range(1, a.seeds + 1))
    todo = variants() + ([] if a.no_eta else eta_variants())
    if a.arms:
        known = {v.name: v for v in todo}
        unknown = [n for n in a.arms.split(",") if n not in known]
        if unknown:
            ap.error(f"--arms: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        todo = [known[n] for n in a.arms.split(",")]
    records = (collect(a.evidence, a.out, todo, seeds) if a.report_only
               else run(a.evidence, a.out, todo, seeds, a.workers, a.threads))
    summary = summarize(records, {v.name: v for v in todo},
                        measured_bytes(a.evidence, a.out, todo), _gates(a.evidence))
    summary["sft"] = sft_reference(a.evidence, seeds)
    command = ("python benchmarks/storage_curve.py --evidence EV --out OUT"
               + (f" --seeds {a.seeds}" if a.seeds != 5 else "")
               + (" --report-only" if a.report_only else ""))
    result = {"command": command, "evidence": str(a.evidence), "seeds": seeds,
              "records": records, **summary}
    (a.out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(summary, a.out / "curve.png")
    (a.out / "curve.md").write_text(render(summary))
    print(render(summary))
    if a.write_doc:
        figs = a.write_doc.parent / "results"
        figs.mkdir(parents=True, exist_ok=True)
        plot(summary, figs / "storage-curve.png")
        write_section(a.write_doc, doc_section(summary, command, "results/storage-curve.png"))


if __name__ == "__main__":
    main()
