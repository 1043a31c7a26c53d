"""CLI: the commands exist; options come from stage configs; unbuilt commands fail loudly and
broken ones with their own error."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from dskd.cli import app, make_command
from dskd.pipeline.config import save_config


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "dskd.cli", "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0
    for cmd in ("cache-teacher", "distill", "eval", "quickstart", "cache"):
        assert cmd in out.stdout
    out = CliRunner().invoke(app, ["cache", "--help"])  # the same app; one process start is enough
    assert out.exit_code == 0 and "inspect" in out.stdout and "verify" in out.stdout


@dataclass
class EchoConfig:
    out: str = field(default="", metadata={"help": "output dir"})
    max_len: int = field(default=512, metadata={"help": "max length"})
    seeds: list[int] = field(default_factory=lambda: [10, 20], metadata={"help": "seeds"})
    greedy: bool = field(default=False, metadata={"help": "greedy"})


def _echo_run(cfg: EchoConfig) -> Path:
    return save_config(cfg, cfg.out)


def test_flags_override_config_file_and_config_yaml_reruns(tmp_path):
    demo = typer.Typer()
    demo.command("echo")(make_command(EchoConfig, _echo_run))
    demo.command("noop")(lambda: None)  # two commands so "echo" is a subcommand
    f = tmp_path / "in.yaml"
    f.write_text(yaml.safe_dump({"out": str(tmp_path / "a"), "max_len": 128, "seeds": "1,2"}))
    r = CliRunner().invoke(demo, ["echo", "--config", str(f), "--max-len", "64", "--greedy"])
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved == {"out": str(tmp_path / "a"), "max-len": 64, "seeds": [1, 2], "greedy": True}
    # the saved config.yaml re-run gives the same resolved config
    r = CliRunner().invoke(demo, ["echo", "--config", str(tmp_path / "a" / "config.yaml")])
    assert r.exit_code == 0
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text()) == saved
    r = CliRunner().invoke(demo, ["echo", "--out", str(tmp_path / "b"), "--max-len", "lots"])
    assert r.exit_code != 0 and "--max-len" in r.output


def test_real_stage_commands_have_config_option():
    r = CliRunner().invoke(app, ["cache-teacher", "--help"])
    assert r.exit_code == 0


# --------------------------------------------------------------------------- help at 80 columns


def _leaf_commands(group, path=()):
    """(path, click command) for every runnable command of the real app, sub-groups included."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer's own click or the click package's)
            yield from _leaf_commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _help_at_80(path) -> str:
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    return r.output


def test_help_at_80_columns_shows_every_flag_name_whole():
    import re

    commands = list(_leaf_commands(typer.main.get_command(app)))
    assert {p[-1] for p, _ in commands} >= {"cache-teacher", "distill", "eval", "report",
                                            "quickstart", "inspect", "verify"}
    for path, cmd in commands:
        text = _help_at_80(path)
        assert max(len(line) for line in text.splitlines()) <= 80, (path, text)
        names = [n for p in cmd.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")]
        for n in names:  # whole: not followed by more name characters or an ellipsis
            assert re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-]|…)", text), (path, n, text)


def test_help_shows_every_default():
    """Every config field with a default (scalars, choices, lists, switches) shows it, in the
    help entry of its own flag."""
    import dataclasses
    import importlib
    import re

    from dskd.cli import STAGES, _shown_default

    group = typer.main.get_command(app)
    for command, (module, cls_name, _) in STAGES.items():
        cls = getattr(importlib.import_module(module), cls_name)
        text = re.sub(r"\s+", "", _help_at_80((command,)))  # undo the wrapping
        cmd = group.commands[command]
        ctx = cmd.context_class(cmd, info_name=command)
        params = {p.name: p for p in cmd.params}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = _shown_default(default)
            if shown is None or f.metadata.get("positional"):
                continue
            names, help_text = params[f.name].get_help_record(ctx)
            assert help_text.endswith(f"[default: {shown}]"), (command, names, help_text)
            assert re.sub(r"\s+", "", names + help_text) in text, (command, names)


def test_a_broken_stage_import_raises_its_own_error_not_not_built_yet(tmp_path, monkeypatch):
    """Only a missing stage module is "not built yet"; an AttributeError or ImportError inside an
    existing stage (or a dependency it lacks) surfaces as itself."""
    import pytest

    from dskd import cli

    pkg = tmp_path / "fake_stages_12"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "attr.py").write_text("import os\nBROKEN = os.no_such_function\n")
    (pkg / "name.py").write_text("from os import no_such_name\n")
    (pkg / "dep.py").write_text("import no_such_dependency_12\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "app", typer.Typer())
    with pytest.raises(AttributeError, match="no_such_function"):
        cli._register("attr", "fake_stages_12.attr", "Cfg", "help")
    with pytest.raises(ImportError, match="no_such_name"):
        cli._register("name", "fake_stages_12.name", "Cfg", "help")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_12"):
        cli._register("dep", "fake_stages_12.dep", "Cfg", "help")
    cli._register("gone", "fake_stages_12.gone", "Cfg", "help")  # the module itself is missing
    cli.app.command("noop")(lambda: None)
    r = CliRunner().invoke(cli.app, ["gone"])
    assert r.exit_code == 2 and "not built yet" in r.output
