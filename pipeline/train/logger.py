"""Run logs: `metrics.jsonl` (one JSON object per line), TensorBoard if installed, a rich bar
(plain periodic lines when stderr is not a terminal).

Only rank 0 logs. On resume the log is cut back to the checkpoint's step, so a killed-and-resumed
run's `metrics.jsonl` reads like an uninterrupted one (no steps logged twice).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Self

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


def is_terminal() -> bool:
    """Whether stderr (where progress goes) is a terminal; a log file or pipe gets plain lines."""
    return sys.stderr.isatty()


def quiet_progress_bars() -> None:
    """Turn off third-party progress bars (transformers' "Loading weights", "Writing model
    shards", hub downloads, datasets): in a log file each frame would be a line."""
    # read when those libraries are imported (here or in a subprocess) ...
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                      TQDM_DISABLE="1")
    # ... and for the ones already imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()


class PlainProgress:
    """The distill bar's interface, printed as one line per logged step when not on a terminal:
    `step 20/400 · loss 1.2345 · 1,234 tok/s · ETA 0:03:10`."""

    def __init__(self, enabled: bool = True, stream: Any = None):
        self.enabled = enabled
        self.stream = stream
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: int | None = None, completed: int = 0,
                 **fields: Any) -> int:
        tid = len(self._tasks)
        self._tasks[tid] = {"description": description, "total": total, "start": completed,
                            "t0": time.perf_counter()}
        return tid

    def update(self, task_id: int, completed: int | None = None, loss: float | None = None,
               tps: float | None = None, **_: Any) -> None:
        """A line only when a loss comes with the update (the logged steps)."""
        if not self.enabled or loss is None or completed is None:
            return
        t = self._tasks[task_id]
        done = completed - t["start"]
        eta = "?"
        if t["total"] and done > 0:
            left = (time.perf_counter() - t["t0"]) / done * (t["total"] - completed)
            eta = str(datetime.timedelta(seconds=round(max(left, 0.0))))
        line = (f"step {completed}/{t['total'] or '?'} · loss {loss:.4f} · {tps or 0:,.0f} tok/s"
                f" · ETA {eta}")
        print(line, file=self.stream or sys.stderr, flush=True)


def train_progress(enabled: bool, terminal: bool | None = None) -> Progress | PlainProgress:
    """A rich bar showing step, loss, tokens/s and ETA (fields `loss` and `tps` set per update);
    plain periodic lines instead when stderr is not a terminal."""
    if not (is_terminal() if terminal is None else terminal):
        return PlainProgress(enabled)
    return Progress(
        TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        disable=not enabled, transient=False,
    )
