"""Eval plots (PNG): method comparison bars with seed error bars, and training curves.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas) rather than pyplot, so nothing
global is switched and no display is ever needed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def _save(fig: Figure, path: Path) -> Path:
    """Write a PNG to a temp name, then rename: a half-written plot never has the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def method_bars_figure(
    table: Mapping[str, Mapping[str, tuple[float, float]]],
    columns: Sequence[str],
    *,
    ylabel: str = "ROUGE-L",
    title: str = "Method comparison (mean ± std over seeds)",
) -> Figure:
    """Grouped bars: one group per column (eval set, "Average"), one bar per model (row).

    table[model][column] = (mean, std); a missing cell is left empty.
    """
    models = list(table)
    if not models or not columns:
        raise ValueError("plot_method_bars needs at least one model and one column")
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(5.0, 1.2 + 1.1 * len(columns) * max(1, len(models)) * 0.6), 4.2))
    ax = fig.add_subplot()
    for j, model in enumerate(models):
        xs, means, stds = [], [], []
        for i, col in enumerate(columns):
            cell = table[model].get(col)
            if cell is None or cell[0] is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            means.append(cell[0])
            stds.append(cell[1] or 0.0)
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=model)
        for x, m, s in zip(xs, means, stds):  # value above its error bar, not hidden under it
            ax.annotate(f"{m:.1f}", (x, m + s), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(columns)), list(columns))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def plot_method_bars(table: Mapping[str, Mapping[str, tuple[float, float]]],
                     columns: Sequence[str], out: str | Path, **kw: str) -> Path:
    """`method_bars_figure` written to `out` (PNG)."""
    return _save(method_bars_figure(table, columns, **kw), Path(out))


# --------------------------------------------------------------------------- training curves


def find_run_metrics(model_dir: str | Path, levels_up: int = 2) -> Path | None:
    """`metrics.jsonl` in the model dir or up to `levels_up` parents (RUN/checkpoints/step-N)."""
    p = Path(model_dir).resolve()
    for d in [p, *p.parents][: levels_up + 1]:
        if (d / "metrics.jsonl").is_file():
            return d / "metrics.jsonl"
    return None


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a metrics.jsonl; an unparsable line (a run killed mid-write) is skipped."""
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


# The curves a reader needs, in panel order: the training objective, its CE and KD parts (and
# DSKD's two KD terms, one per space, which can diverge while their sum looks fine), and the
# validation numbers that pick the checkpoint. lr, throughput, grad norm, token counts,
# accuracies and validation copies of the loss terms stay in metrics.jsonl (and TensorBoard)
# for whoever debugs a run.
CURVES = ("loss", "ce_loss", "kd_loss", "t2s_kd_loss", "s2t_kd_loss", "valid_ce_loss",
          "valid_rougeL")


def curve_keys(runs: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The CURVES any run logged as numbers, in CURVES order."""
    logged = {k for rows in runs.values() for row in rows for k, v in row.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return [k for k in CURVES if k in logged]


def training_curves_figure(runs: Mapping[str, Sequence[Mapping]],
                           *, title: str = "Training curves") -> Figure:
    """One panel per CURVES key any run logged, one line per run, x = step."""
    keys = curve_keys(runs)
    if not keys:
        raise ValueError(f"no numeric columns to plot in the given metrics (plotted: {CURVES})")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows + 0.6), layout="constrained")
    fig.suptitle(title)
    # One color per run in every panel: a panel only some runs log (kd_loss) keeps the run's color.
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for n, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, n + 1)
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=name, color=colors[name],
                        marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, label=name) for name, c in colors.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9)
    return fig


def plot_training_curves(runs: Mapping[str, Sequence[Mapping]], out: str | Path,
                         **kw: str) -> Path:
    """`training_curves_figure` written to `out` (PNG)."""
    return _save(training_curves_figure(runs, **kw), Path(out))


# --------------------------------------------------------------------------- paired claims


def forest_figure(rows: Sequence[tuple[str, float, float, float, str]], *,
                  xlabel: str = "paired difference",
                  title: str = "Claims: mean paired difference, 95% t-interval") -> Figure:
    """One row per claim (name, mean, lo, hi, verdict): a dot, its interval, a line at 0."""
    if not rows:
        raise ValueError("forest plot needs at least one claim")
    colors = {"holds": "C2", "reversed": "C3", "inconclusive": "C7", "not testable": "C1"}
    fig = Figure(figsize=(7.5, 0.55 * len(rows) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, mean, lo, hi, verdict) in enumerate(rows):
        y = len(rows) - 1 - i
        c = colors.get(verdict, "k")
        ax.plot([lo, hi], [y, y], color=c, lw=2)
        ax.plot([mean], [y], "o", color=c)
        ax.annotate(verdict, (hi, y), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8, color=c)
    ax.axvline(0, color="k", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)])
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.25)
    return fig


def plot_forest(rows: Sequence[tuple[str, float, float, float, str]], out: str | Path,
                **kw: str) -> Path:
    """`forest_figure` written to `out` (PNG)."""
    return _save(forest_figure(rows, **kw), Path(out))
