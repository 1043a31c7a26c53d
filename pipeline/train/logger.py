"""Run logs: `metrics.jsonl` (one JSON object per line), TensorBoard if installed, a rich bar.

Only rank 0 logs. On resume the log is cut back to the checkpoint's step, so a killed-and-resumed
run's `metrics.jsonl` reads like an uninterrupted one (no steps logged twice).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    p = Path(run_dir) / name
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    return rows


def truncate_metrics(run_dir: str | os.PathLike, last_step: int, name: str = METRICS_FILE) -> None:
    """Keep only rows with step <= last_step (rewritten atomically; any `{"step": …}` jsonl)."""
    p = Path(run_dir) / name
    if not p.is_file():
        return
    keep = [r for r in read_metrics(run_dir, name) if r.get("step", 0) <= last_step]
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, p)


class MetricsLogger:
    """Appends `{"step": …, **values}` rows; mirrors scalars to TensorBoard when available."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None
        # held for the whole run (closed in close()); each row is flushed as written
        self._f = open(self.path, "a", encoding="utf-8") if enabled else None  # noqa: SIM115

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


def train_progress(enabled: bool) -> Progress:
    """A rich bar showing step, loss, tokens/s and ETA (fields `loss` and `tps` set per update)."""
    return Progress(
        TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )
