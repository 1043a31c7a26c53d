"""Sensitivity: KD and DSKD (same vocabulary, fkl) over α (--kd-rate) × τ (--kd-temperature).

    python benchmarks/sensitivity.py --evidence DIR --out DIR2 [--seeds 5] [--workers 2]

On the world of a finished or running `benchmarks/evidence.py --out DIR` run: its teacher cache,
its per-seed student inits and data orders (paired seeds 1..N), everything else at the evidence
settings (stages/quickstart.SIZES["evidence"]). The paper's defaults (α 0.5, τ 2) stay the
defaults; this measures how much the result depends on them. Arms at the defaults reuse the
evidence run's own kd-fkl / dskd-fkl runs where they have finished (evidence_grid reuse: same
resolved config), so they are the very runs of docs/results.md. DSKD at α 1 is known to
collapse and distill refuses it; it runs here with --force, marked in the table.

Writes DIR2/sensitivity.json (per-run records, the table, paired differences vs the default
cell of each method) and DIR2/sensitivity.md. Metric: test excess KL per response (nats, lower
is better), mean ± 95% t half-width over seeds; validity mass beside it. A rerun skips
finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import evidence_grid as grid  # benchmarks/ is on sys.path when run as a script
import torch

from dskd.pipeline.train.setup import collapse_reason

METHODS = {"kd": "kd", "dskd": "dskd"}  # label -> --method (same vocabulary, fkl)
RATES = (0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 2.0)
DEFAULT = (0.5, 2.0)  # the paper's α, τ: the defaults of dskd distill, kept


def arm_name(method: str, rate: float, temperature: float) -> str:
    return f"{method}-a{rate:g}-t{temperature:g}"


def arms() -> list[grid.Arm]:
    """Every cell; settings distill refuses as collapsing get force=True (named in the table)."""
    out = []
    for label, method in METHODS.items():
        for rate in RATES:
            for temp in TEMPERATURES:
                over: dict[str, Any] = {"kd_rate": rate, "kd_temperature": temp}
                if collapse_reason(method, rate):
                    over["force"] = True
                out.append(grid.Arm(arm_name(label, rate, temp), method, "fkl", "student", over))
    return out


def summarize(records: list[dict]) -> dict[str, Any]:
    """The table and the paired differences vs each method's default cell, from the records."""
    table = grid.method_table(records, ("excess_kl", "validity"))
    cells = []
    for label in METHODS:
        default = arm_name(label, *DEFAULT)
        for rate in RATES:
            for temp in TEMPERATURES:
                name = arm_name(label, rate, temp)
                if name not in table:
                    continue
                rows = [r for r in records if r["method_name"] == name]
                cell = {"arm": name, "method": label, "kd_rate": rate, "kd_temperature": temp,
                        "default": (rate, temp) == DEFAULT,
                        "forced": bool(rows[0]["overrides"].get("force")),
                        "seeds": sorted(r["seed"] for r in rows),
                        "reused": sorted(r["seed"] for r in rows if r["reused_from"]),
                        "excess_kl": table[name]["excess_kl"],
                        "validity": table[name]["validity"]}
                common = set(cell["seeds"]) & {r["seed"] for r in records
                                               if r["method_name"] == default}
                if name != default and len(common) >= 2:
                    d = grid.paired(records, name, default)  # > 0: this cell beats the default
                    cell["vs_default"] = {k: d[k] for k in ("seeds", "mean", "ci95", "p")}
                    lo, hi = d["ci95"]
                    cell["vs_default"]["reading"] = (
                        "better" if lo > 0 else "worse" if hi < 0 else "inconclusive")
                cells.append(cell)
    return {"metric": "excess_kl", "split": "test", "default": {"kd_rate": DEFAULT[0],
            "kd_temperature": DEFAULT[1]}, "cells": cells, "records": records}


def render(result: dict) -> str:
    """Markdown table: one row per cell, the paired difference vs its method's default cell."""
    lines = [("| method | α (kd-rate) | τ | seeds | excess KL (nats/response) | validity mass % "
              "| vs default: paired diff (> 0 = better) | 95% CI | reading |"),
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in result["cells"]:
        n = len(c["seeds"])
        m, h = c["excess_kl"]
        vm, vh = c["validity"]
        kl = f"{m:.3f} ± {h:.3f}" if n > 1 else f"{m:.3f}"
        valid = f"{100 * vm:.1f} ± {100 * vh:.1f}" if n > 1 else f"{100 * vm:.1f}"
        name = c["method"].upper() + (" (--force)" if c["forced"] else "")
        if c["default"]:
            diff, ci, reading = "—", "—", "default (paper)"
        elif "vs_default" in c:
            d = c["vs_default"]
            diff, ci, reading = (f"{d['mean']:+.3f}", f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]",
                                 d["reading"])
        else:
            diff, ci, reading = "—", "—", "fewer than 2 paired seeds"
        lines.append(f"| {name} | {c['kd_rate']:g} | {c['kd_temperature']:g} | {n} | {kl} "
                     f"| {valid} | {diff} | {ci} | {reading} |")
    return "\n".join(lines) + "\n"


def plain_reading(result: dict) -> str:
    """Per method: which cells beat / trail the default with an interval that excludes 0."""
    parts = []
    for label in METHODS:
        cells = [c for c in result["cells"] if c["method"] == label and "vs_default" in c]
        say = []
        for reading in ("better", "worse", "inconclusive"):
            got = [c for c in cells if c["vs_default"]["reading"] == reading]
            if got:
                how = "than" if reading != "inconclusive" else "against"
                say.append(f"{reading} {how} the default: " + "; ".join(
                    f"α {c['kd_rate']:g} τ {c['kd_temperature']:g} "
                    f"({c['vs_default']['mean']:+.3f}, 95% CI [{c['vs_default']['ci95'][0]:+.3f}, "
                    f"{c['vs_default']['ci95'][1]:+.3f}])" for c in got))
        if say:
            parts.append(f"{label.upper()}: " + "; ".join(say) + ".")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--evidence", type=Path, required=True,
                    help="a benchmarks/evidence.py --out dir (its world, caches and inits)")
    ap.add_argument("--out", type=Path, required=True, help="where the new runs and tables go")
    grid.add_run_args(ap)
    ap.add_argument("--only", nargs="*", default=None, help="run only these arm names (a check)")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: tables from the runs finished so far (a grid cut short)")
    a = ap.parse_args()
    grid.check_run_args(ap, a)
    chosen = [x for x in arms() if a.only is None or x.name in a.only]
    if a.only and len(chosen) != len(a.only):
        ap.error(f"--only: unknown arm(s); the arms are {[x.name for x in arms()]}")
    t0 = time.perf_counter()
    seeds = list(range(1, a.seeds + 1))
    records = grid.run_grid(a.evidence, chosen, seeds, a.out, 1 if a.collect else a.workers,
                            a.threads, train=not a.collect)
    result = summarize(records)
    result.update({
        "command": "python benchmarks/sensitivity.py --evidence EVIDENCE --out OUT"
                   + (f" --seeds {a.seeds}" if a.seeds != 5 else "")
                   + (" --collect" if a.collect else ""),
        "evidence": str(a.evidence), "seeds": seeds, "wall_s": round(time.perf_counter() - t0, 1),
        "own_runs": sum(1 for r in records if not r["reused_from"]),
        "reused_runs": sum(1 for r in records if r["reused_from"]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "workers": a.workers, "torch_threads": a.threads, "torch": torch.__version__}})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
    md = render(result) + "\n" + plain_reading(result) + "\n"
    (a.out / "sensitivity.md").write_text(md)
    print(md)
    print(f"wall: {result['wall_s']} s; {result['own_runs']} runs of its own (trained now or by "
          f"an earlier call), {result['reused_runs']} reused from the evidence run")


if __name__ == "__main__":
    main()
