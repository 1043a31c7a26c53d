"""`dskd report RUN_DIR…`: several eval outputs side by side in one table and one plot.

Also home of the table/plot writer that `dskd eval` uses for its own report.md, so a single eval
and a merged report look the same: rows = models, columns = eval sets + Average, cells
ROUGE-L mean ± std over seeds (the paper's table layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dskd.pipeline import metrics, plots
from dskd.pipeline.config import atomic_write_text, save_config

RESULTS_FILE = "results.json"
AVERAGE = "Average"
METRIC_TITLES = {"rougeL": "ROUGE-L", "exact_match": "Exact match"}


class ReportError(ValueError):
    """A run dir that cannot be reported; the message names it."""


@dataclass
class ReportConfig:
    run_dirs: list[str] = field(default_factory=list, metadata={
        "help": "eval output dirs (each holding results.json) to put side by side",
        "positional": True})  # `dskd report RUN_DIR... --out DIR`
    out: str = field(default="", metadata={"help": "output dir for report.md, results.json, PNGs"})
    allow_mixed_templates: bool = field(default=False, metadata={
        "help": "put models trained on different prompt templates side by side (refused "
                "otherwise: the comparison would be unfair)"})


# --------------------------------------------------------------------------- tables


def score_table(scores: dict, metric: str = "rougeL") -> tuple[dict, list[str]]:
    """({model: {column: (mean, std)}}, columns) from results["scores"]; Average last."""
    columns: list[str] = []
    table: dict[str, dict[str, tuple[float, float | None]]] = {}
    for model, sets in scores.items():
        table[model] = {}
        for name, cell in sets.items():
            if metric not in cell:
                continue
            if name != AVERAGE and name not in columns:
                columns.append(name)
            table[model][name] = (cell[metric]["mean"], cell[metric]["std"])
    if len(columns) > 1 or any(AVERAGE in row for row in table.values()):
        columns.append(AVERAGE)
    return table, columns


def _fmt(cell: tuple[float, float | None] | None) -> str:
    if cell is None:
        return "–"
    mean, std = cell
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown_table(table: dict, columns: list[str]) -> str:
    lines = ["| model | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for model, row in table.items():
        lines.append(f"| {model} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def fidelity_table(fidelity: dict) -> str:
    cols = [("kl", "KL(T‖S)"), ("top1_agreement", "top-1 agree %"), ("nll", "NLL"), ("ppl", "PPL")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " | tokens |",
             "|---|" + "---:|" * (len(cols) + 1)]
    for model, f in fidelity.items():
        vals = ["–" if f.get(k) is None else f"{f[k]:.4g}" for k, _ in cols]
        if f.get("note"):
            vals[0] = f"– ({f['note']})"
        lines.append(f"| {model} | " + " | ".join(vals) + f" | {f.get('nll_tokens', '–')} |")
    return "\n".join(lines)


def heldout_table(heldout: dict) -> str:
    """Rows = models, columns = eval sets: held-out NLL per response token (and its PPL)."""
    sets = list(dict.fromkeys(s for row in heldout.values() for s in row))
    lines = ["| model | " + " | ".join(f"{s} NLL (PPL)" for s in sets) + " |",
             "|---|" + "---:|" * len(sets)]
    for model, row in heldout.items():
        cells = ["–" if row.get(s, {}).get("nll") is None else
                 f"{row[s]['nll']:.4f} ({row[s]['ppl']:.3g})" for s in sets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRUTH_COLUMNS = [("excess_kl", "excess KL (nats/response)"),
                 ("excess_kl_per_token", "excess KL / ref. token"),
                 ("validity", "validity mass %"), ("excess_nll", "excess NLL (nats/response)")]
TRUTH_NOTE = ("Exact, no sampling: excess KL = KL(p_true ‖ model) over each prompt's valid "
              "answers (0 = the truth; lower is better), validity mass = the model's probability "
              "of producing any valid answer, excess NLL = held-out NLL minus the true entropy. "
              "Per-token numbers divide by the expected answer length in the reference "
              "tokenizer ({ref}), so vocabularies compare fairly.")
ROUGE_NOTE = ("ROUGE-L (the paper's metric) scores each sampled answer against its best-matching "
              "reference: it sees whether an answer is valid and how close its wording is, not "
              "whether the model spreads its probability over the valid answers as the truth "
              "does, and it carries sampling noise.")


def truth_rows(truth: dict) -> list[tuple[str, list[str]]]:
    """(row name, cells) per model and eval set: named "model · set" when there are several
    sets; cells are TRUTH_COLUMNS (validity in %). One layout for report.md and the console."""
    sets = {s for per_set in truth.values() for s in per_set}
    return [(model if len(sets) == 1 else f"{model} · {sname}",
             ["–" if t.get(k) is None else f"{100 * t[k]:.1f}" if k == "validity"
              else f"{t[k]:.4f}" for k, _ in TRUTH_COLUMNS])
            for model, per_set in truth.items() for sname, t in per_set.items()]


def truth_table(truth: dict) -> str:
    """Rows model (· set when several), columns TRUTH_COLUMNS."""
    lines = ["| model | " + " | ".join(c[1] for c in TRUTH_COLUMNS) + " |",
             "|---|" + "---:|" * len(TRUTH_COLUMNS)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in truth_rows(truth)]
    return "\n".join(lines)


def _protocol_line(p: dict) -> str:
    if p.get("decoding") == "greedy":
        how = "greedy decoding"
    else:
        how = (f"sampling (temperature {p.get('temperature')}, top-p {p.get('top_p')}, "
               f"top-k {p.get('top_k')})")
    return (f"{how}, no_repeat_ngram_size {p.get('no_repeat_ngram_size')}, "
            f"seeds {p.get('seeds')}, max_new_tokens {p.get('max_new_tokens')}, "
            f"backend {p.get('backend')}")


# --------------------------------------------------------------------------- writing


def write_report(results: dict, out_dir: str | Path, title: str = "dskd eval") -> list[Path]:
    """report.md + rouge_l.png (+ training_curves.png when any model has a run) in out_dir."""
    out = Path(out_dir)
    written = []
    table, columns = score_table(results["scores"], "rougeL")
    em_table, _ = score_table(results["scores"], "exact_match")
    parts = [f"# {title}", ""]
    for proto in results.get("protocols", [results.get("protocol")]):
        if proto:
            parts.append(f"Protocol: {_protocol_line(proto)}.")
    if results.get("truth"):  # the exact numbers first: they are what ROUGE-L cannot show
        ref = next((t.get("reference_tokenizer") for per_set in results["truth"].values()
                    for t in per_set.values()), "")
        parts += ["", "## Against the truth (exact; eval data with `probs`)", "",
                  truth_table(results["truth"]), "", TRUTH_NOTE.format(ref=ref or "the first model's")]
    if columns:  # nothing generated (--no-generate): no text-score tables
        parts += ["", "## ROUGE-L (mean ± std over seeds, ×100)", "", ROUGE_NOTE, "",
                  markdown_table(table, columns), "", "## Exact match (mean ± std over seeds, %)",
                  "", markdown_table(em_table, columns)]
    if results.get("heldout"):
        parts += ["", "## Held-out NLL per response token (no generation)", "",
                  heldout_table(results["heldout"])]
    coverage = {m: tuple(c for c in columns if c in row and c != AVERAGE) for m, row in table.items()}
    if len(set(coverage.values())) > 1:
        parts += ["", ("Note: models were scored on different eval sets; each Average covers only "
                  "its own row's sets.")]
    if results.get("fidelity"):
        parts += ["", "## Fidelity to the teacher (held-out cache)", "",
                  fidelity_table(results["fidelity"])]
    if columns:
        png = plots.plot_method_bars(table, columns, out / "rouge_l.png")
        parts += ["", f"![ROUGE-L]({png.name})"]
        written.append(png)
    runs = {m: plots.read_metrics(info["metrics_jsonl"]) for m, info in results["models"].items()
            if info.get("metrics_jsonl") and Path(info["metrics_jsonl"]).is_file()}
    runs = {m: rows for m, rows in runs.items() if rows}
    if runs and plots.curve_keys(runs):
        png = plots.plot_training_curves(runs, out / "training_curves.png")
        parts += ["", f"![Training curves]({png.name})"]
        written.append(png)
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return [path, *written]


def load_results(run_dir: str | Path) -> dict:
    p = Path(run_dir) / RESULTS_FILE
    if not p.is_file():
        raise ReportError(f"{run_dir}: no {RESULTS_FILE}; is it a finished `dskd eval` output dir?")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{p}: not valid JSON ({e})") from None


def merge_results(run_dirs: list[str | Path]) -> dict:
    """One results-like dict over several eval outputs.

    A model evaluated (same fingerprint) on different sets in different runs becomes one row; a
    name clash between different models, or the same set twice, is told apart as `name [run]`.
    Average is recomputed over each row's sets.
    """
    merged: dict[str, Any] = {"scores": {}, "models": {}, "fidelity": {}, "heldout": {},
                              "truth": {}, "protocols": [],
                              "runs": [str(Path(r)) for r in run_dirs]}
    for run_dir in run_dirs:
        res = load_results(run_dir)
        if res.get("protocol") and res["protocol"] not in merged["protocols"]:
            merged["protocols"].append(res["protocol"])
        for model, info in res["models"].items():
            sets = res["scores"].get(model, {})
            key = model
            prev = merged["models"].get(key)
            proto = {k: v for k, v in (res.get("protocol") or {}).items() if k != "seeds"}
            clash = prev is not None and (
                prev.get("fingerprint", {}).get("sha256") != info.get("fingerprint", {}).get("sha256")
                or prev.get("protocol") != proto  # greedy and sampled cells never share a row
                or any(s in merged["scores"].get(key, {}) for s in sets if s != AVERAGE))
            if clash:
                key = f"{model} [{Path(run_dir).name}]"
            merged["models"].setdefault(key, {**info, "protocol": proto, "run": str(run_dir)})
            if sets:  # a --no-generate eval has no text scores
                row = merged["scores"].setdefault(key, {})
                row.update({s: c for s, c in sets.items() if s != AVERAGE})
            if res.get("fidelity", {}) and model in res["fidelity"]:
                merged["fidelity"][key] = res["fidelity"][model]
            if model in (res.get("heldout") or {}):
                merged["heldout"].setdefault(key, {}).update(res["heldout"][model])
            if res.get("truth") and model in res["truth"]:
                merged["truth"].setdefault(key, {}).update(res["truth"][model])
    for row in merged["scores"].values():
        cells = [c for s, c in row.items() if s != AVERAGE]
        if len(cells) > 1:
            row[AVERAGE] = {m: metrics.average_over_sets([c[m] for c in cells])
                            for m in METRIC_TITLES if all(m in c for c in cells)}
    return merged


def check_templates(merged: dict) -> None:
    """Models trained (by `dskd distill`) on different prompt templates are not comparable."""
    trained = {m: i["train_template"] for m, i in merged["models"].items() if i.get("train_template")}
    if len(set(trained.values())) > 1:
        raise ReportError("the models were trained on different prompt templates ("
                          + ", ".join(f"{m}: {t}" for m, t in trained.items()) + "), so side by "
                          "side they are not comparable; retrain with one --template, or pass "
                          "--allow-mixed-templates")


def report(run_dirs: list[str | Path], out: str | Path, allow_mixed_templates: bool = False) -> Path:
    """Merge eval outputs into OUT/report.md, OUT/results.json and OUT/rouge_l.png."""
    if not run_dirs:
        raise ReportError("give at least one eval output dir to report on")
    if not str(out):
        raise ReportError("--out is required: the directory for the merged report")
    merged = merge_results(list(run_dirs))
    if not allow_mixed_templates:
        check_templates(merged)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_FILE, json.dumps(merged, indent=2) + "\n")
    write_report(merged, out, title="dskd report")
    return out / "report.md"


def run(cfg: ReportConfig) -> Path:
    path = report(cfg.run_dirs, cfg.out, cfg.allow_mixed_templates)
    save_config(cfg, cfg.out)
    return path
