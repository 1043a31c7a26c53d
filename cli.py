"""The `dskd` command line: a thin Typer app over the stages.

Each stage module defines a config dataclass and ``run(cfg)``; its options are generated from the
dataclass fields, so a flag, a config-file key and a ``config.yaml`` key are always the same name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import inspect
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import typer

from .pipeline.config import (
    ConfigError,
    field_types,
    flag_name,
    load_config_file,
    resolve,
    unwrap_optional,
)

app = typer.Typer(
    help="dskd: cache a teacher once, distill students with DSKD, evaluate them like the paper.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: it wraps help text and never cuts a flag name at 80 columns (rich's
    # option table does), and "[default: …]" is not taken for markup and dropped.
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="Inspect and verify a teacher cache.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(cache_app, name="cache")

# command name -> (stage module, config class, issue that builds it)
STAGES = {
    "cache-teacher": ("dskd.stages.cache_teacher", "CacheTeacherConfig",
                      "Run the teacher once over a dataset and write the cache (stage 1)."),
    "distill": ("dskd.stages.distill", "DistillConfig",
                "Train a student from the cache (or online / SFT) (stage 2)."),
    "eval": ("dskd.stages.evaluate", "EvalConfig",
             "Generate with models and score them the paper's way (stage 3)."),
    "report": ("dskd.stages.report", "ReportConfig",
               "Put several eval outputs side by side in one table and plot."),
    "quickstart": ("dskd.stages.quickstart", "QuickstartConfig",
                   "The whole pipeline on a generated toy world, on a laptop CPU."),
}


def fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _option_for(name: str, tp: Any, default: Any, help_text: str) -> tuple[Any, Any]:
    """Typer annotation + Option for one config field. Values stay raw; resolve() coerces them.

    Options default to None so that only flags actually given override a --config file; the
    dataclass default is written into the help text instead ("[default: 0.5]").
    """
    base, _ = unwrap_optional(tp)
    origin = get_origin(base)
    shown = _shown_default(default)
    if origin is Literal:
        # typer 0.29 has no click_type; resolve()/coerce() rejects values outside the choices.
        help_text += " (one of: " + ", ".join(str(c) for c in get_args(base)) + ")"
        annot: Any = Optional[str]
    elif origin is list:
        annot = Optional[list[str]]
        help_text += " (repeat the flag or separate values with commas)"
    elif base in (int, float, str):
        annot = Optional[base]
    else:
        annot = Optional[str]
    if shown is not None:
        help_text += f" [default: {shown}]"
    flag = flag_name(name)
    if base is bool:
        return Optional[bool], typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text,
                                            show_default=False)
    return annot, typer.Option(None, flag, help=help_text, show_default=False)


def _shown_default(default: Any) -> str | None:
    """The default as a user types it; None (nothing shown) for unset or empty ones."""
    if default is None or default == "" or default == []:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return ",".join(str(v) for v in default)
    return str(default)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def make_command(cls: type, run: Any):
    """A Typer callback whose signature lists one option per dataclass field, plus --config."""
    hints = field_types(cls)
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                default=typer.Option(None, "--config",
                                                     help="YAML file whose keys are these flag names; flags override it."))]
    for f in dataclasses.fields(cls):
        annot, opt = _option_for(f.name, hints[f.name], _default(f), f.metadata.get("help", ""))
        if f.metadata.get("positional"):  # e.g. `dskd report RUN_DIR...`; still a config-file key
            opt = typer.Argument(None, help=f.metadata.get("help", ""), show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annot, default=opt))

    def callback(**kwargs: Any) -> None:
        config_file = kwargs.pop("config")
        explicit = {k: v for k, v in kwargs.items() if v is not None}
        try:
            file_values = load_config_file(config_file, cls) if config_file else {}
            cfg = resolve(cls, file_values, explicit)
        except (ConfigError, TypeError) as e:
            fail(str(e))
        from .pipeline.train.logger import is_terminal, quiet_progress_bars

        if not is_terminal():  # a log file: no bar frames from other libraries
            quiet_progress_bars()
        with user_errors(getattr(cfg, "out", None)):
            out = run(cfg)
        if out is not None and os.environ.get("RANK", "0") == "0":  # one "done" line (torchrun: rank 0)
            typer.echo(f"done: {out}")

    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return callback


@contextlib.contextmanager
def user_errors(out: str | None = None):
    """Our own errors and a full disk print one clear line (exit 1); bugs keep a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        fail("interrupted; rerun the same command to resume", code=130)
    except Exception as e:
        if _is_disk_full(e):
            fail(_disk_full_message(e, out), code=1)
        if _is_user_error(e):
            fail(str(e), code=1)
        raise


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain (writers often wrap the OSError)."""
    return any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in _chain(e))


def _disk_full_message(e: BaseException, out: str | None) -> str:
    """Which path filled up, how much space is left there, and that nothing committed is lost."""
    path = next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None) or out
    where = Path(path) if path else Path.cwd()
    probe = next((p for p in [where, *where.parents] if p.exists()), Path.cwd())
    free = shutil.disk_usage(probe).free
    return (f"disk full while writing {path or 'the output'}: {free / 2**20:.1f} MiB free on "
            f"{probe}. Nothing committed was lost (partial files are temp names); free space or "
            "point --out elsewhere, then rerun the same command to resume.")


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _is_user_error(e: Exception) -> bool:
    """Our own error types (data, config, cache, tokenizer problems) print as one clear line."""
    return type(e).__module__.startswith("dskd.") and isinstance(e, (ValueError, OSError, RuntimeError))


def _not_built(name: str, reason: str):
    def callback() -> None:
        fail(f"`dskd {name}` is not built yet ({reason})")

    return callback


def _register(name: str, module: str, cls_name: str, help_text: str) -> None:
    """Add a stage's command. Only a stage module that does not exist is "not built yet": any
    other error while importing it (an AttributeError or ImportError inside the stage or one of
    its imports) is a bug or a broken install and propagates as itself, traceback and all."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        app.command(name, help=help_text + " [not built yet]")(_not_built(name, f"{module} is missing"))
        return
    cls, run = getattr(mod, cls_name), mod.run
    app.command(name, help=(mod.__doc__ or help_text).strip().split("\n")[0])(make_command(cls, run))


for _name, (_module, _cls, _help) in STAGES.items():
    _register(_name, _module, _cls, _help)


@cache_app.command("inspect")
def cache_inspect(cache_dir: str = typer.Argument(..., help="cache directory or store URL (s3://…)"),
                  as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Teacher, counts, fingerprints, bytes/token per field, dtypes."""
    import json

    from .pipeline.cache.inspect import format_inspect, inspect_cache

    with user_errors():
        info = inspect_cache(cache_dir)
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else format_inspect(info))


@cache_app.command("verify")
def cache_verify(cache_dir: str = typer.Argument(..., help="cache directory or store URL (s3://…)"),
                 full: bool = typer.Option(False, "--full", help=(
                     "recompute hidden @ head for every token row, not a sample of each shard")),
                 repair: bool = typer.Option(False, "--repair", help=(
                     "un-commit the bad shards so rerunning the same cache-teacher command "
                     "rewrites only them"))) -> None:
    """Checksums, shapes, offsets, ids, NaN/inf, Σ p = 1, hidden @ head vs the stored log-probs."""
    from .pipeline.cache.verify import SAMPLE_ROWS, check_cache, uncommit_bad_shards

    with user_errors():
        report = check_cache(cache_dir, sample_rows=None if full else SAMPLE_ROWS)
    problems = report.problems
    if report.shards:
        typer.echo(f"hidden @ head recomputed on {'every row' if full else f'≤ {SAMPLE_ROWS} rows'} "
                   "per shard; max |error| in nats of lse and log-probs, and of Σ p − 1:")
        for name, r in report.shards.items():
            rc = r.recompute
            typer.echo(f"  {name}  rows {rc.rows}/{r.n_rows}  log-prob err {rc.max_err:.2e} "
                       f"({rc.max_ratio:.2g}x tolerance)  mass err {r.mass_err:.1e}")
    if not problems:
        typer.echo(f"OK: {cache_dir}")
        return
    for p in problems:
        typer.secho(f"BAD {p}", fg=typer.colors.RED, err=True)
    if repair:
        fixed = uncommit_bad_shards(cache_dir, problems)
        rest = [p for p in problems if p.shard not in fixed]
        if fixed:
            typer.echo(f"un-committed {len(fixed)} shard(s): {', '.join(fixed)}; rerun the same "
                       "`dskd cache-teacher` command to rewrite them", err=True)
        if any(p.shard is None and "incomplete" not in p.message for p in rest):
            fail("the manifest, head or tokenizer is damaged and cannot be repaired shard by "
                 "shard; rebuild with `dskd cache-teacher ... --overwrite`", code=1)
        raise typer.Exit(1)
    fail(f"{len(problems)} problem(s) in {cache_dir}; `dskd cache verify --repair {cache_dir}` "
         "then rerunning the same cache-teacher command rewrites only the bad shards", code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
