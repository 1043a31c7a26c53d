"""Packaging: every package directory is listed in pyproject; docs/cli.md matches the app."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_dir_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"dskd"}
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in ("pipeline", "stages"):
            found.add(".".join(("dskd",) + rel.parts))
    assert found == listed, f"pyproject packages out of date: missing {found - listed}, extra {listed - found}"


def cli_markdown() -> str:
    out = subprocess.run([sys.executable, "-m", "typer", "dskd.cli", "utils", "docs", "--name", "dskd"],
                         capture_output=True, text=True, check=True, env={"COLUMNS": "100", "PATH": "",
                                                                           "HF_HUB_OFFLINE": "1"})
    return out.stdout


def test_docs_cli_md_is_in_sync_with_the_app():
    """Regenerate with: python -m typer dskd.cli utils docs --name dskd --output docs/cli.md"""
    assert (ROOT / "docs" / "cli.md").read_text().strip() == cli_markdown().strip(), (
        "docs/cli.md is stale: run `python -m typer dskd.cli utils docs --name dskd --output docs/cli.md`")
