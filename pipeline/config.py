"""Stage configs: YAML file + CLI flags → one resolved dataclass, saved next to every output.

Each stage defines a dataclass whose field names are its long flag names (``max_prompt_len`` is
``--max-prompt-len``). A config file uses the same keys, with dashes or underscores. Flags given on
the command line override the file; the file overrides the dataclass defaults. The resolved config
is written as ``config.yaml`` (dashed keys) so ``--config config.yaml`` repeats the run exactly.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from .atomic import atomic_write_text

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or flag value that cannot be used; the message says which key and why."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _key(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass (handles ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` → ``(X, True)``; anything else → ``(tp, False)``."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag_name(name)}: a value is required (got null)")
    origin = get_origin(base)
    try:
        if origin is Literal:
            choices = get_args(base)
            if value not in choices:
                raise ConfigError(f"{flag_name(name)}: {value!r} is not one of {list(choices)}")
            return value
        if origin is list:
            (item,) = get_args(base) or (str,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            out: list[Any] = []
            for v in value:
                # "10,20" inside a repeated flag is split too, so `--seeds 10,20,30` works.
                parts = v.split(",") if isinstance(v, str) else [v]
                out.extend(coerce(name, item, p.strip() if isinstance(p, str) else p) for p in parts if p != "")
            return out
        if base is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ConfigError(f"{flag_name(name)}: {value!r} is not a boolean")
            return bool(value)
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{flag_name(name)}: {value!r} is not an integer")
            return base(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{flag_name(name)}: cannot read {value!r} as {base}: {e}") from None
    return value


def load_config_file(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    """Read a YAML config; every key must be a field of ``cls`` (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of flag names to values")
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in raw.items():
        key = _key(str(k))
        if key not in names:
            valid = ", ".join(sorted(flag_name(n)[2:] for n in names))
            raise ConfigError(f"config file {path}: unknown key {k!r}; valid keys: {valid}")
        out[key] = v
    return out


def resolve(cls: type[C], file_values: dict[str, Any] | None = None,
            cli_values: dict[str, Any] | None = None) -> C:
    """defaults < file < explicit CLI values, each coerced to its field type."""
    hints = field_types(cls)
    merged: dict[str, Any] = {}
    for src in (file_values or {}, cli_values or {}):
        for k, v in src.items():
            merged[k] = coerce(k, hints[k], v)
    return cls(**merged)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dashed-key dict of a resolved config, in field order (the form written to config.yaml)."""
    return {flag_name(f.name)[2:]: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config next to a stage's outputs so the run can be repeated exactly."""
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    return path


def load_config(cls: type[C], path: str | os.PathLike) -> C:
    """Resolve a saved ``config.yaml`` back into its dataclass."""
    return resolve(cls, load_config_file(path, cls))
