"""Run logs: `metrics.jsonl` (one JSON object per line), TensorBoard if installed, a rich bar
(plain periodic lines when stderr is not a terminal; cache-teacher and eval follow the same rule
through stage_progress).

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
from collections.abc import Callable
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


DISTILL_LINE = "step {completed}/{total} · loss {loss:.4f} · {tps:,.0f} tok/s · ETA {eta}"


class PlainProgress:
    """A rich Progress's interface (add_task, update, advance) printed as plain lines, for
    stderr that is not a terminal: a log file gets lines, never bar frames.

    With `on_field` (distill: "loss") a line goes out on each update carrying that field, i.e.
    each logged step. Without it (cache-teacher, eval) one goes out when the description changes
    (a new phase), at most every `every_s` seconds while it advances, and once at the end.
    `line` is formatted with the task's fields plus description, completed, total, rate (per
    second), elapsed and eta."""

    def __init__(self, enabled: bool = True, stream: Any = None, line: str = DISTILL_LINE,
                 on_field: str | None = "loss", every_s: float = 30.0):
        self.enabled = enabled
        self.stream = stream
        self.line, self.on_field, self.every_s = line, on_field, every_s
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on_field is None:  # the final count of each task that moved since its last line
            for tid, t in self._tasks.items():
                if t["completed"] != t["said"]:
                    self._say(tid)

    def add_task(self, description: str, total: float | None = None, completed: int = 0,
                 **fields: Any) -> int:
        tid = len(self._tasks)
        now = time.perf_counter()
        self._tasks[tid] = {"description": description, "total": total, "start": completed,
                            "completed": completed, "said": completed, "t0": now, "last": now,
                            "fields": fields}
        return tid

    def update(self, task_id: int, *, completed: int | None = None, advance: int | None = None,
               total: float | None = None, description: str | None = None, **fields: Any
               ) -> None:
        t = self._tasks[task_id]
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if total is not None:
            t["total"] = total
        t["fields"].update(fields)
        if self.on_field is not None:
            if fields.get(self.on_field) is not None and completed is not None:
                self._say(task_id)
        elif description is not None and description != t["description"]:
            t["description"] = description  # a new phase: say what it is and how far we are
            self._say(task_id)
        elif time.perf_counter() - t["last"] >= self.every_s:
            self._say(task_id)

    def advance(self, task_id: int, advance: int = 1) -> None:
        self.update(task_id, advance=advance)

    def _say(self, task_id: int) -> None:
        t = self._tasks[task_id]
        now = time.perf_counter()
        t["last"], t["said"] = now, t["completed"]
        if not self.enabled:
            return
        done, elapsed = t["completed"] - t["start"], now - t["t0"]
        eta = "?"
        if t["total"] and done > 0:
            left = elapsed / done * (t["total"] - t["completed"])
            eta = str(datetime.timedelta(seconds=round(max(left, 0.0))))
        values = {"tps": 0.0, **{k: v for k, v in t["fields"].items() if v is not None},
                  "description": t["description"], "completed": t["completed"],
                  "total": t["total"] or "?", "rate": done / elapsed if elapsed > 0 else 0.0,
                  "elapsed": str(datetime.timedelta(seconds=round(elapsed))), "eta": eta}
        print(self.line.format(**values), file=self.stream or sys.stderr, flush=True)


def stage_progress(bar: Callable[[], Progress], line: str, enabled: bool = True
                   ) -> Progress | PlainProgress:
    """`bar()` on a terminal; plain lines (`line`, see PlainProgress) when stderr is not one."""
    if not is_terminal():
        return PlainProgress(enabled, line=line, on_field=None)
    return bar()


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
