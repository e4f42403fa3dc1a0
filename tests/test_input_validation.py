"""Bad input at the data and config boundary gets a typed gr2 error naming the file/key, row and
reason (issue 16 probes; each of these was silently accepted or a raw traceback on main)."""

from __future__ import annotations

import pytest

from gr2.data.formats import load_table
from gr2.errors import ConfigError, DataError, Gr2Error
from gr2.pipeline import build_run_config


def write_tables(tmp_path, timestamps: list[str]):
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp\n" + "".join(f"u{i % 2},i{i},{t}\n" for i, t in enumerate(timestamps)))
    items = tmp_path / "items.csv"
    items.write_text("item,title\n" + "".join(f"i{i},Item {i}\n" for i in range(len(timestamps))))
    return inter, items


@pytest.mark.parametrize("bad", ["inf", "-inf", "1e30", "-1e19", "9.3e18"])
def test_timestamps_outside_int64_are_rejected_with_the_row(tmp_path, bad):
    inter, items = write_tables(tmp_path, ["100", "200", bad, "300"])
    with pytest.raises(DataError, match=r"timestamp .*outside int64.*data row 3") as info:
        load_table(inter, items, {"user": "user", "item": "item", "timestamp": "timestamp", "title": "title"})
    assert str(inter) in str(info.value)


def test_valid_timestamps_still_load(tmp_path):
    inter, items = write_tables(tmp_path, ["100", "2.5e9", "-5", "300"])
    raw = load_table(inter, items, {"user": "user", "item": "item", "timestamp": "timestamp", "title": "title"})
    assert sorted(raw.interactions["timestamp"].tolist()) == [-5, 100, 300, 2_500_000_000]


@pytest.mark.parametrize("text", ["", "\n"])
def test_an_empty_csv_is_a_data_error(tmp_path, text):
    inter = tmp_path / "inter.csv"
    inter.write_text(text)
    items = tmp_path / "items.csv"
    items.write_text("item,title\ni0,x\n")
    with pytest.raises(DataError, match="empty"):
        load_table(inter, items)


def test_an_unknown_stage_table_names_the_stages():
    with pytest.raises(ConfigError, match=r"unknown stage table \[dta\] \(did you mean \[data\]\?\).*'sid'"):
        build_run_config({"dta": {"kcore": 5}})


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", ".hidden", "c:evil", "a\\b"])
def test_a_run_name_cannot_leave_runs(name):
    with pytest.raises(ConfigError, match="run.name"):
        build_run_config({"name": name})


def test_every_error_here_is_a_gr2_error():
    assert issubclass(DataError, Gr2Error) and issubclass(ConfigError, Gr2Error)
