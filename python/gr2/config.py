"""TOML configs mapped onto dataclasses, with clear errors for unknown keys and wrong types.

Each stage owns a config dataclass (e.g. ``SidConfig``); a run config is a TOML file with one
table per stage. ``from_dict`` builds a dataclass from a plain dict, recursing into nested
dataclasses and rejecting anything it does not know.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from gr2.errors import ConfigError

import tomllib


T = TypeVar("T")


def _check_value(where: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _check_value(where, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected None, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(annotation, value, where=where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item_type = args[0] if args else Any
        items = [_check_value(f"{where}[{i}]", v, item_type) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no setting means anything at nan or inf (lr = inf trains a NaN model)
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value


# The range every numeric setting is checked against when a config is loaded, before any stage
# runs: >= 0, except the few that are signed by meaning; > 0 for sizes, rates, temperatures and the
# step cadences used as divisors (0 would be a ZeroDivisionError hours into a run). A stage's own
# __post_init__ adds the rules that are specific to it (upper bounds, relations between fields).
SIGNED = frozenset({"invalid_reward", "w_upstream", "w_evidence", "w_cooccur", "w_genre", "w_popularity", "w_year"})
POSITIVE = frozenset({
    "lr", "batch_size", "eval_batch_size", "embed_batch_size", "hidden_size", "intermediate_size", "num_layers",
    "num_heads", "vocab_size", "max_position_embeddings", "max_length", "embed_max_length", "max_tokens",
    "max_new_tokens", "temperature", "diversity_temperature", "contrastive_temperature", "save_every", "log_every",
    "checkpoint_every", "dead_code_every", "evidence_neighbors", "keep_checkpoints", "r",
})


def _check_range(where: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if name in POSITIVE and value <= 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    if name not in SIGNED and value < 0:
        raise ConfigError(f"{where}: must be >= 0, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and numbers out of range
    (:data:`SIGNED`, :data:`POSITIVE`) raise ConfigError naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {
        name: _check_value(f"{where + '.' if where else ''}{name}", value, hints[name])
        for name, value in data.items()
    }
    for name, value in kwargs.items():
        _check_range(f"{where + '.' if where else ''}{name}", name, value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file (a directory?); pass a TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); pass a TOML file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"sft.lambda_r=0.5"`` -> (["sft", "lambda_r"], 0.5); values are TOML, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set expects stage.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    keys = [k.strip() for k in dotted.split(".") if k.strip()]
    if not keys:
        raise ConfigError(f"--set expects stage.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return keys, value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = table
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a table")
        node[keys[-1]] = value
    return table
