"""Every numeric setting of every stage is checked when the config is loaded (issue 32): a table
over every dataclass field reachable from the stage registry, nested tables included. Wrong types,
NaN and inf are refused everywhere; negative numbers everywhere but the settings signed by meaning
(gr2.config.SIGNED); zero where it is no size, rate or cadence (gr2.config.POSITIVE)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gr2.config import POSITIVE, SIGNED, from_dict
from gr2.errors import ConfigError
from gr2.pipeline.registry import STAGES


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def numeric_settings():
    """(stage, dotted key, default) for every int/float setting of every stage config."""
    def walk(cls, prefix):
        for field in dataclasses.fields(cls):
            value = _default(field)
            if dataclasses.is_dataclass(value):
                yield from walk(type(value), f"{prefix}{field.name}.")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{prefix}{field.name}", value

    for name, stage in STAGES.items():
        for key, default in walk(stage.config_class(), ""):
            yield pytest.param(name, key, default, id=f"{name}.{key}")


def _table(key: str, value):
    table: dict = {}
    node = table
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value
    return table


SETTINGS = list(numeric_settings())


def test_the_table_covers_every_stage():
    assert {p.values[0] for p in SETTINGS} == set(STAGES)
    assert len(SETTINGS) > 100


@pytest.mark.parametrize("stage, key, default", SETTINGS)
def test_numeric_setting_is_checked_on_load(stage, key, default):
    cls = STAGES[stage].config_class()
    leaf = key.rsplit(".", 1)[-1]
    from_dict(cls, _table(key, default), where=stage)  # the default itself loads
    for bad in (math.nan, math.inf, "1", True, [1]):
        with pytest.raises(ConfigError, match=key.rsplit(".", 1)[-1]):
            from_dict(cls, _table(key, bad), where=stage)
    if leaf not in SIGNED:
        with pytest.raises(ConfigError, match=rf"\.{leaf}: must be (>= 0|> 0), got -1"):
            from_dict(cls, _table(key, -1), where=stage)
    if leaf in POSITIVE:
        with pytest.raises(ConfigError, match=rf"\.{leaf}: must be > 0, got 0"):
            from_dict(cls, _table(key, 0), where=stage)
