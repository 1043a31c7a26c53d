"""Evidence: does distilling from the cache make a better student, measured against the truth?

    python benchmarks/evidence.py --out DIR [--world-seed N] [--seeds 5] [--write-doc FILE]
    python benchmarks/evidence.py --out DIR --sweep      (the one SFT-only lr/epochs sweep)

The paper's regime on the `evidence` toy world: a teacher fine-tuned on 20k teacher-only rows
plus the 300-row distillation split; students trained on those 300 rows only. Every method runs
under each training seed s = 1..N, and seed s fixes what all methods share: the student's init
(a fresh one per seed) and the data order (a paired design). Every run is scored exactly
against the truth on the test split (unseen prompts): excess KL per response, per reference
token, validity mass, excess NLL (pipeline/truth.py). Claims are tested on paired differences
of excess KL with Holm-corrected verdicts after two gates (pipeline/verdicts.py):

    G1  the teacher's excess KL is at most half the SFT student's (it has something to teach)
    G2  KD > SFT holds (distillation from this cache helps at all)

Writes DIR/evidence.json (per-run and per-claim records), DIR/evidence.md (tables) and
DIR/forest.png. Student lr/epochs are fixed in stages/quickstart.SIZES["evidence"] (chosen by
--sweep: SFT only, validation excess KL) and shared by every method; nothing is tuned per method.
A rerun skips finished runs. The student runs go through benchmarks/evidence_grid.py, which
studies on this world (other settings, other caches) call with the same seeds and records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import evidence_grid as grid  # benchmarks/ is on sys.path when run as a script
import torch
from evidence_grid import METRIC, PRESET, STUDENT_EXTRA

from dskd.pipeline import plots
from dskd.pipeline.data import load_examples
from dskd.pipeline.tokenize import tokenize_example
from dskd.pipeline.toyworld import build_toy_world, fresh_student
from dskd.pipeline.verdicts import Claim, judge
from dskd.stages import quickstart as qs

# name -> (world model key, method, divergence); the vocabulary follows the model key
METHODS: dict[str, tuple[str, str, str]] = dict(qs.STUDENT_RUNS)  # a copy: rows added here stay here
XVOCAB_KD = ("xvocab-uld", "xvocab-mined", "xvocab-dskd-cma")
BEST_XVOCAB = "best-xvocab-kd"  # per seed: the cross-vocab KD method best on validation (mean)
CLAIMS = [
    Claim("KD > SFT", "kd-fkl", "sft", gates=("G1",)),
    Claim("DSKD > KD (fkl)", "dskd-fkl", "kd-fkl", gates=("G1", "G2")),
    Claim("DSKD > KD (rkl)", "dskd-rkl", "kd-rkl", gates=("G1", "G2")),
    Claim("DSKD-CMA > ULD", "xvocab-dskd-cma", "xvocab-uld", gates=("G1", "G2")),
    Claim("DSKD-CMA > MinED", "xvocab-dskd-cma", "xvocab-mined", gates=("G1", "G2")),
    Claim("best cross-vocab KD > cross-vocab SFT", BEST_XVOCAB, "xvocab-sft", gates=("G1", "G2")),
]
G1_RATIO = 0.5
SWEEP = {"lr": [1e-3, 3e-3, 1e-2], "epochs": [10, 20]}


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rows(path: Path) -> int:
    return len(Path(path).read_text(encoding="utf-8").splitlines())


def _tokens(data: Path, model_dir: Path, template: str) -> int:
    """Tokens (prompt + response + eos) of one pass over `data` in the model's tokenization."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(tokenize_example(e, tok).num_tokens
               for e in load_examples(data, template=template))


def sweep(a: argparse.Namespace) -> None:
    """SFT only, seed 1: pick the student lr and epochs with the lowest validation excess KL."""
    sz = qs.SIZES[PRESET]
    world = build_toy_world(a.out / "world", seed=a.world_seed, preset=PRESET)
    init = fresh_student(world, "student", 1, a.out / "inits" / "student-s1")
    # SFT needs no teacher: train from the data files (same rows and tokenization as the
    # cache), so the sweep can run before / beside the teacher
    jobs = [{"world": str(world.root), "out": str(a.out / "sweep"), "run": f"lr{lr:g}-ep{ep}",
             "init": str(init), "caches": None,
             "sizes": dataclasses.replace(sz, lr=lr, student_epochs=ep),
             "common": {"device": "cpu", "template": sz.template, "tensorboard": False, "seed": 1},
             "method": "sft", "divergence": "fkl", "extra": STUDENT_EXTRA, "lr": lr, "epochs": ep}
            for lr in SWEEP["lr"] for ep in SWEEP["epochs"]]
    rows = [{"lr": j["lr"], "epochs": j["epochs"], "valid": j["scores"]["valid"][METRIC],
             "test_not_used": j["scores"]["test"][METRIC]}
            for j in grid.run_jobs(jobs, a.workers, a.threads)]
    for r in rows:
        print(json.dumps(r))
    best = min(rows, key=lambda r: r["valid"])
    (a.out / "sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=2) + "\n")
    print("best:", json.dumps(best))


def run(a: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    sz = qs.SIZES[PRESET]
    out = a.out
    world = build_toy_world(out / "world", seed=a.world_seed, preset=PRESET)
    common = {"device": "cpu", "template": sz.template, "tensorboard": False}
    teacher = qs.train_teacher(out, world, sz, {**common, "seed": a.world_seed})
    qs.cache_splits(out, world, teacher, sz, "cpu")  # run_grid distils from out/cache
    ref_tok = AutoTokenizer.from_pretrained(world.tokenizers["bpe"])
    seeds = list(range(1, a.seeds + 1))
    t_teacher = time.perf_counter() - t0
    cpu_teacher = _cpu_seconds()  # one process: on a quiet machine its wall ≈ this
    arms = [grid.Arm(name, method, div, key) for name, (key, method, div) in METHODS.items()]
    records = grid.run_grid(out, arms, seeds, out, a.workers, a.threads)
    t_students = time.perf_counter() - t0 - t_teacher
    tgot = grid.scores(teacher, world, sz, ref_tok)
    teacher_rec = {"run": "teacher", "params": tgot["params"], "valid": tgot["valid"],
                   "test": tgot["test"], "epochs": sz.teacher_epochs,
                   "rows": _rows(world.teacher_train),
                   "tokens_seen": sz.teacher_epochs * _tokens(world.teacher_train, teacher,
                                                              sz.template)}
    student_tokens = {key: sz.student_epochs * _tokens(world.train, getattr(world, key),
                                                       sz.template)
                      for key in ("student", "student_xvocab")}
    result = summarize(records, teacher_rec, seeds)
    result.update({
        "command": "python benchmarks/evidence.py --out OUT" + (
            f" --world-seed {a.world_seed}" if a.world_seed else "") + (
            f" --seeds {a.seeds}" if a.seeds != 5 else ""),
        "world_seed": a.world_seed, "preset": PRESET, "seeds": seeds,
        "world": world_stats(world.root),
        "sizes": {"teacher": {"params": teacher_rec["params"], "rows": teacher_rec["rows"],
                              "epochs": sz.teacher_epochs, "lr": sz.teacher_lr,
                              "tokens_seen": teacher_rec["tokens_seen"]},
                  "students": {key: {"params": next(r["params"] for r in records
                                                    if r["model"] == key),
                                     "rows": _rows(world.train),
                                     "epochs": sz.student_epochs, "lr": sz.lr,
                                     "projector_lr": 2 * sz.lr, "tokens_seen": n}
                               for key, n in student_tokens.items()}},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "wall_s": {"teacher_and_caches": round(t_teacher, 1), "students": round(t_students, 1),
                   "total": round(time.perf_counter() - t0, 1)},
        # CPU seconds of this process and its finished workers: on a shared machine the wall
        # time says more about the neighbours; on a quiet one wall ≈ cpu_s / workers
        "cpu_s": round(_cpu_seconds(), 1),
        "cpu_s_teacher_and_caches": round(cpu_teacher, 1), "workers": a.workers,
    })
    return result


def summarize(records: list[dict], teacher: dict, seeds: list[int]) -> dict[str, Any]:
    """Per-claim verdicts from the per-run records (nothing else): the gates, then the claims."""
    per_seed = grid.per_seed(records)
    valid_mean = {name: sum(v.values()) / len(v)
                  for name, v in grid.per_seed(records, split="valid").items()}
    best = min(XVOCAB_KD, key=lambda n: valid_mean.get(n, float("inf")))
    per_seed[BEST_XVOCAB] = per_seed[best]
    sft_mean = sum(per_seed["sft"].values()) / len(per_seed["sft"])
    g1 = teacher["test"][METRIC] <= G1_RATIO * sft_mean
    claims, gates = judge(per_seed, CLAIMS, {"G1": g1}, {"G2": "KD > SFT"})
    for c in claims:
        if c["better"] == BEST_XVOCAB:
            c["best_xvocab_kd"] = best
    return {
        "metric": METRIC, "records": records, "teacher": teacher, "claims": claims,
        "gates": {"G1": {"holds": gates["G1"], "teacher": teacher["test"][METRIC],
                         "sft_mean": sft_mean, "ratio": teacher["test"][METRIC] / sft_mean,
                         "needs": f"≤ {G1_RATIO}"},
                  "G2": {"holds": gates["G2"], "claim": "KD > SFT"}},
        "best_xvocab_kd": {"method": best, "valid_means": {n: valid_mean[n] for n in XVOCAB_KD}},
    }


# --------------------------------------------------------------------------- rendering


def method_table(result: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """table[method][metric] = (mean, 95% t half-width over seeds) on the test split."""
    return grid.method_table(result["records"])


def render(result: dict, forest: str | None = "forest.png") -> str:
    t = result["teacher"]["test"]
    table = method_table(result)
    lines = [("| model | vocab | excess KL (nats/response) | excess KL / ref. token | "
              "validity mass % | excess NLL (nats/response) |"), "|---|---|---:|---:|---:|---:|",
             (f"| teacher | bpe | {t['excess_kl']:.3f} | {t['excess_kl_per_token']:.4f} | "
              f"{100 * t['validity']:.1f} | {t['excess_nll']:.3f} |")]
    vocab = {r["method_name"]: r["vocab"] for r in result["records"]}
    for name, row in table.items():
        def cell(m: str, scale: float = 1.0, fmt: str = ".3f", row=row) -> str:
            mean, half = row[m]
            return f"{scale * mean:{fmt}} ± {scale * half:{fmt}}"

        lines.append(f"| {name} | {vocab[name]} | {cell('excess_kl')} | "
                     f"{cell('excess_kl_per_token', fmt='.4f')} | "
                     f"{cell('validity', 100, '.1f')} | {cell('excess_nll')} |")
    g = result["gates"]
    lines += ["", "| gate | value | holds |", "|---|---|---|",
              (f"| G1: teacher excess KL ≤ {G1_RATIO} × SFT student's | "
               f"{g['G1']['teacher']:.3f} vs {g['G1']['sft_mean']:.3f} (ratio "
               f"{g['G1']['ratio']:.2f}) | {'yes' if g['G1']['holds'] else 'NO'} |"),
              f"| G2: KD > SFT holds | see claim | {'yes' if g['G2']['holds'] else 'NO'} |",
              "", "| claim | mean paired diff (nats/response) | 95% CI | p (Holm) | verdict |",
              "|---|---:|---|---:|---|"]
    for c in result["claims"]:
        name = c["claim"] + (f" ({c['best_xvocab_kd']})" if c.get("best_xvocab_kd") else "")
        lines.append(f"| {name} | {c['mean']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
                     f"| {c['p_holm']:.3g} | **{c['verdict']}** |")
    if forest:
        lines += ["", f"![paired differences]({forest})"]
    return "\n".join(lines) + "\n"


def plain_summary(result: dict) -> str:
    """What holds, what is reversed, what is inconclusive, in one paragraph, from the verdicts."""
    by: dict[str, list[str]] = {}
    for c in result["claims"]:
        by.setdefault(c["verdict"], []).append(
            f"{c['claim']} ({c['mean']:+.3f} nats/response, 95% CI "
            f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}])")
    parts = []
    for verdict, say in (("holds", "Holds"), ("reversed", ("Reversed (the other method is "
                         "closer to the truth)")), ("inconclusive", ("Inconclusive (the interval "
                         "straddles 0 after Holm correction)")), ("not testable", ("Not testable "
                         "(a gate failed)"))):
        if by.get(verdict):
            parts.append(f"{say}: " + "; ".join(by[verdict]) + ".")
    return " ".join(parts)


def sweep_table(sweep_result: dict) -> str:
    lines = ["| student lr | epochs | valid excess KL (nats/response) |", "|---:|---:|---:|"]
    for r in sweep_result["rows"]:
        chosen = " ← chosen" if r == sweep_result["best"] else ""
        lines.append(f"| {r['lr']:g} | {r['epochs']} | {r['valid']:.2f}{chosen} |")
    return "\n".join(lines)


def world_stats(world_root: Path) -> dict[str, Any]:
    """The second vocabulary's build-time checks (toyworld.json), recorded with the run."""
    built = json.loads((Path(world_root) / "toyworld.json").read_text())
    return {"vs_teacher": built["tokenizers"]["spbpe"]["vs_teacher"]}


def _vocab_stats(results: list[dict]) -> str:
    out = []
    for r in results:
        v = r.get("world", {}).get("vs_teacher")
        if v:
            out.append(f"{v['label_token_ratio']:.2f}x, {100 * v['boundary_agreement']:.0f}% "
                       f"(world seed {r['world_seed']})")
    return "; ".join(out) or "see toyworld.json"


def _quiet_estimate(r: dict) -> str:
    """Wall time on a quiet machine, from CPU time: the teacher phase runs in one process,
    the student runs in `workers` single-thread processes."""
    if "cpu_s_teacher_and_caches" not in r:
        return ""
    t = r["cpu_s_teacher_and_caches"]
    est = t + (r["cpu_s"] - t) / r["workers"]
    return f"; ≈ {est / 60:.1f} min on {r['workers']} quiet cores"


# sections of a results page written by other studies (or by hand, with their own command):
# regenerating the evidence part keeps them, in their order, after it
KEPT_SECTIONS = ("## The SFT-only sweep", "## Reading", "## Storage–accuracy curve", "## DSKD-ETA")


def kept_sections(old: str, new: str) -> str:
    """The `## ` sections of `old` whose heading starts with one of KEPT_SECTIONS and that
    `new` does not have."""
    return "\n".join(s.rstrip("\n") + "\n" for s in grid.doc_sections(old)
                     if s.startswith(KEPT_SECTIONS) and s.split("\n", 1)[0] not in new)


def render_doc(results: list[dict], figure_dir: str = "results",
               sweep_result: dict | None = None) -> str:
    """docs/results.md from one or more evidence.json (one per world seed)."""
    first = results[0]
    lines = ["# Results: does distilling from the cache make a better student?", "",
             ("Measured against the truth on the `evidence` toy world (it records every prompt's "
             "true answer distribution), with paired training seeds and pre-registered claims. "
             "Produced by `benchmarks/evidence.py`; every number below is in its evidence.json."),
             "", "## Setup", ""]
    sz = first["sizes"]
    t, st = sz["teacher"], sz["students"]
    lines += [
        (f"- Teacher: Llama, bpe vocabulary, {t['params'] / 1e6:.2f}M parameters, fine-tuned on "
        f"{t['rows']} rows (20k teacher-only + the 300 distillation rows), {t['epochs']} "
        f"epoch(s), lr {t['lr']:g}: {t['tokens_seen']:,} tokens seen."),
        (f"- Students: one Llama architecture for both vocabularies: bpe (teacher's) "
        f"{st['student']['params'] / 1e6:.2f}M, spbpe (other vocabulary; label tokens and "
        f"boundary agreement vs the teacher's: {_vocab_stats(results)}) "
        f"{st['student_xvocab']['params'] / 1e6:.2f}M; "
        f"{st['student']['rows']} rows, {st['student']['epochs']} epochs, lr "
        f"{st['student']['lr']:g}, projector lr {st['student']['projector_lr']:g} (2x, the "
        f"paper's ratio): {st['student']['tokens_seen']:,} / "
        f"{st['student_xvocab']['tokens_seen']:,} tokens seen."),
        ("- Student lr and epochs were chosen once by an SFT-only sweep on validation excess KL "
        "(`python benchmarks/evidence.py --out OUT --sweep`, world seed 0) and are the same for "
        "every method; KD settings are the defaults (α 0.5, τ 2.0) for every method. Nothing "
        "is tuned per method."),
        ("- Test split: 300 rows whose prompts no model has seen (split by prompt). Metric of the "
        "claims: excess KL to the truth, KL(p_true ‖ q) over each prompt's valid answers, in "
        "nats per response (exact; lower is better). See docs/eval.md for the metrics."),
        (f"- Seeds {first['seeds']}: seed s = a fresh student init and a data order shared by "
        "all methods (paired). Intervals: 95% t over seeds; verdicts Holm-corrected over the "
        "six claims; gates G1 (teacher excess KL ≤ half the SFT student's) and G2 (KD > SFT "
        "holds) come first, and a claim they guard reads `not testable` if one fails."), ""]
    if sweep_result:
        lines += ["## The SFT-only sweep that fixed the student lr and epochs", "",
                  ("`python benchmarks/evidence.py --out OUT --sweep` (training seed 1, world "
                   "seed 0, validation split):"), "", sweep_table(sweep_result), ""]
    for r in results:
        m, w = r["machine"], r["wall_s"]
        lines += [f"## World seed {r['world_seed']}", "",
                  (f"Command: `{r['command']}` — {w['total'] / 60:.1f} min wall "
                  f"({w['teacher_and_caches'] / 60:.1f} min teacher + caches, "
                  f"{w['students'] / 60:.1f} min for {len(r['records'])} student runs; "
                  f"{r.get('cpu_s', 0) / 60:.1f} CPU-min in all{_quiet_estimate(r)}) on "
                  f"{m['platform']}, {m['cpus']} CPUs shared with other jobs, "
                  f"torch {m['torch']}."), "",
                  "Test split, mean ± 95% t half-width over seeds:", "",
                  render(r, forest=f"{figure_dir}/forest-world{r['world_seed']}.png"),
                  plain_summary(r), ""]
    return "\n".join(lines) + "\n"


def forest(result: dict, path: Path) -> Path:
    rows = [(c["claim"], c["mean"], c["ci95"][0], c["ci95"][1], c["verdict"])
            for c in result["claims"]]
    return plots.plot_forest(rows, path, xlabel="paired difference in excess KL "
                             "(nats/response; > 0 = claimed-better method closer to the truth)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--world-seed", type=int, default=0)
    grid.add_run_args(ap)
    ap.add_argument("--sweep", action="store_true", help="run the SFT-only lr/epochs sweep")
    ap.add_argument("--write-doc", type=Path, default=None, help="also write this markdown file")
    ap.add_argument("--doc-from", type=Path, nargs="*", default=None,
                    help="render --write-doc from these finished evidence dirs (no training)")
    a = ap.parse_args()
    grid.check_run_args(ap, a)
    torch.set_num_threads(a.threads)  # the teacher: see _init_worker
    if a.doc_from:
        results = [json.loads((d / "evidence.json").read_text()) for d in a.doc_from]
        for d, r in zip(a.doc_from, results):  # records written before "world" was kept
            if "world" not in r and (d / "world" / "toyworld.json").is_file():
                r["world"] = world_stats(d / "world")
        sweeps = [d / "sweep.json" for d in a.doc_from if (d / "sweep.json").is_file()]
        doc = render_doc(results, sweep_result=json.loads(sweeps[0].read_text()) if sweeps else None)
        if a.write_doc:
            figs = a.write_doc.parent / "results"
            figs.mkdir(parents=True, exist_ok=True)
            for d, r in zip(a.doc_from, results):
                forest(r, figs / f"forest-world{r['world_seed']}.png")
            old = a.write_doc.read_text() if a.write_doc.is_file() else ""
            kept = kept_sections(old, doc)
            a.write_doc.write_text(doc + ("\n" + kept if kept else ""))
        print(doc)
        return
    if a.sweep:
        sweep(a)
        return
    result = run(a)
    (a.out / "evidence.json").write_text(json.dumps(result, indent=2) + "\n")
    forest(result, a.out / "forest.png")
    md = render(result)
    (a.out / "evidence.md").write_text(md)
    print(md)
    print(f"wall: {result['wall_s']}")
    if a.write_doc:
        a.write_doc.write_text(md)


if __name__ == "__main__":
    main()
