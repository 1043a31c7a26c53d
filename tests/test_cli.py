"""CLI: the commands exist; options come from stage configs; unbuilt commands fail loudly."""

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
    out = subprocess.run([sys.executable, "-m", "dskd.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("cache-teacher", "distill", "eval", "quickstart", "cache"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "dskd.cli", "cache", "--help"], capture_output=True, text=True)
    assert "inspect" in out.stdout and "verify" in out.stdout


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
