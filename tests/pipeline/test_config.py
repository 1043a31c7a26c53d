"""Config: file + flags → resolved dataclass; config.yaml round-trips."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from dskd.pipeline.config import ConfigError, load_config, load_config_file, resolve, save_config


@dataclass
class DemoConfig:
    data: str = field(default="x.jsonl", metadata={"help": "data"})
    max_len: int = field(default=512, metadata={"help": "max len"})
    lr: float = 5e-4
    template: Literal["dskd", "chat", "none"] = "dskd"
    seeds: list[int] = field(default_factory=lambda: [10, 20])
    limit: Optional[int] = None  # noqa: UP045 (the typing.Optional spelling must parse too)
    overwrite: bool = False


def test_precedence_and_coercion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max-len: 128\nlr: 1e-3\nseeds: 1,2,3\ntemplate: chat\n")
    cfg = resolve(DemoConfig, load_config_file(f, DemoConfig), {"max_len": "64", "overwrite": "true"})
    assert cfg.max_len == 64 and cfg.lr == 1e-3 and cfg.seeds == [1, 2, 3]
    assert cfg.template == "chat" and cfg.overwrite is True and cfg.limit is None


def test_round_trip(tmp_path):
    cfg = resolve(DemoConfig, {"max_len": 100, "seeds": ["5", "6"], "limit": 3})
    path = save_config(cfg, tmp_path)
    assert "max-len: 100" in path.read_text()
    assert load_config(DemoConfig, path) == cfg
    # and again: the saved file of a re-run is byte-identical
    path2 = save_config(load_config(DemoConfig, path), tmp_path / "again")
    assert path2.read_text() == path.read_text()


def test_errors_name_the_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max-lenn: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'max-lenn'"):
        load_config_file(f, DemoConfig)
    with pytest.raises(ConfigError, match="--template"):
        resolve(DemoConfig, {"template": "alpaca"})
    with pytest.raises(ConfigError, match="--max-len"):
        resolve(DemoConfig, {"max_len": "many"})
