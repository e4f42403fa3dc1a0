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


# ---------------------------------------------------------------------------------------------
# issue 32: typed errors instead of raw tracebacks or silent truncation


def _tiny_index():
    import numpy as np

    import gr2

    codes = np.array([[0, 0], [0, 1], [1, 0]], dtype=np.uint16)
    return gr2.SidIndex.build(np.arange(3, dtype=np.uint64), codes, codebook_size=[2, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha="x"), "alpha must be a finite number"),
    (dict(alpha=float("nan")), "alpha must be a finite number"),
    (dict(invalid_reward=True), "invalid_reward must be a finite number"),
    (dict(graded_k=2.5), "graded_k must be an int"),
    (dict(graded_k=True), "graded_k must be an int"),
    (dict(metric_ks=[1, 2.5]), "metric_ks must be a list of int"),
    (dict(conditional="yes"), "conditional must be True or False"),
])
def test_verify_rewards_rejects_bad_settings_instead_of_casting_them(kwargs, match):
    import numpy as np

    from gr2 import InvalidInputError, verify_rewards

    completion = "<answer><|sid_begin|><s_a_0><s_b_0><|sid_end|></answer>"
    with pytest.raises(InvalidInputError, match=match):
        verify_rewards([completion], np.arange(3, dtype=np.uint64)[None], [0], _tiny_index(), **kwargs)


@pytest.mark.parametrize("completions, match", [
    ([None, "<answer></answer>"], "completion 0 is NoneType, completion 1 is str"),
    ([[1, 2], "<answer></answer>"], "completion 0 is list, completion 1 is str"),
    (["<answer></answer>", None], "completion 1 is NoneType, not str"),
])
def test_mixed_completions_name_the_rows(completions, match):
    import numpy as np

    from gr2 import InvalidInputError, verify_rewards

    candidates = np.tile(np.arange(3, dtype=np.uint64), (2, 1))
    with pytest.raises(InvalidInputError, match=match):
        verify_rewards(completions, candidates, [0, 0], _tiny_index())


def test_encode_npy_into_a_directory_is_a_typed_error(tmp_path):
    import numpy as np

    import gr2

    np.save(tmp_path / "x.npy", np.zeros((4, 2), dtype=np.float32))
    (tmp_path / "codes.npy").mkdir()
    with pytest.raises(gr2.InvalidInputError, match="is a directory"):
        gr2.encode_npy(gr2.RQCodebooks(np.zeros((2, 3, 2), dtype=np.float32)), tmp_path / "x.npy",
                       tmp_path / "codes.npy", progress=False)


@pytest.mark.parametrize("argv, match", [
    (["run", "--preset", "demo", "--run-dir", "{file}"], "is a file, not a directory"),
    (["data", "--run-dir", "{file}/sub"], "is a file, not a directory"),
    (["run", "--config", "{dir}", "--run-dir", "{tmp}/r"], "is not a file"),
    (["run", "--config", "{binary}", "--run-dir", "{tmp}/r"], "not a UTF-8 text file"),
])
def test_cli_paths_of_the_wrong_kind_are_one_line_errors(tmp_path, capsys, argv, match):
    from gr2 import cli

    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "binary.toml").write_bytes(b"\x00\x01\xff")
    paths = {"file": tmp_path / "file", "dir": tmp_path / "dir", "binary": tmp_path / "binary.toml", "tmp": tmp_path}
    assert cli.main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "Traceback" not in err[0]


COLUMNS = {"user": "user", "item": "item", "timestamp": "timestamp", "title": "title", "rating": "rating"}


def _table(tmp_path, rows: list[str]):
    inter = tmp_path / "inter.csv"
    inter.write_text("user,item,timestamp,rating\n" + "".join(r + "\n" for r in rows))
    items = tmp_path / "items.csv"
    items.write_text("item,title\n" + "".join(f"i{i},Item {i}\n" for i in range(4)))
    return inter, items


@pytest.mark.parametrize("rows, match", [
    (["u1,i0,100,4", ",i1,200,5", "u2,i2,300,3"], r"row 2 has an empty user id"),
    (["u1,i0,100,4", "  ,i1,200,5"], r"row 2 has an empty user id"),
    (["u1,,100,4", "u1,i1,200,5"], r"row 1 has an empty item id"),
    (["u1,i0,100,4", "u1,i1,200,five"], r"row 2: rating 'five' is not a number"),
])
def test_empty_ids_and_non_numeric_ratings_are_data_errors_naming_the_row(tmp_path, rows, match):
    """issue 32: an empty user id became a real user "" (merging unrelated rows); a non-numeric
    rating was counted as below_min_rating."""
    inter, items = _table(tmp_path, rows)
    with pytest.raises(DataError, match=match) as info:
        load_table(inter, items, COLUMNS)
    assert str(inter) in str(info.value)


def test_a_missing_rating_is_still_allowed(tmp_path):
    import math

    inter, items = _table(tmp_path, ["u1,i0,100,4", "u1,i1,200,"])
    raw = load_table(inter, items, COLUMNS)
    assert raw.interactions["rating"].iloc[0] == 4 and math.isnan(raw.interactions["rating"].iloc[1])


def test_an_empty_user_in_ml100k_u_data_is_a_data_error(tmp_path):
    from gr2.data.formats import load_movielens

    (tmp_path / "u.data").write_text("1\t10\t4\t100\n\t11\t5\t200\n")
    (tmp_path / "u.item").write_text("10|A (1995)|01-Jan-1995||x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                      "11|B (1995)|01-Jan-1995||x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
    with pytest.raises(DataError, match="row 2 has an empty user id"):
        load_movielens(tmp_path)


def test_a_few_bad_rows_are_dropped_and_counted_past_the_threshold_the_load_fails(tmp_path):
    """issue 32: with data.max_bad_fraction, unusable interaction rows (a line with the wrong field
    count, an empty user or item id, a rating that is not a number) are left out and counted per
    reason -- in data/stats.json through the data stage -- and past the threshold the load fails
    naming the first bad row and the counts."""
    from gr2.data.formats import load_movielens

    good = [f"{u}\t{10 + (u + k) % 2}\t4\t{100 * u + k}" for u in range(1, 50) for k in range(2)]
    lines = good[:10] + ["7\t10\t4"] + good[10:20] + ["\t11\t5\t200"] + good[20:30] + ["8\t11\tfive\t300"] + good[30:]
    (tmp_path / "u.data").write_text("\n".join(lines) + "\n")
    (tmp_path / "u.item").write_text("10|A (1995)|01-Jan-1995||x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
                                      "11|B (1995)|01-Jan-1995||x|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
    raw = load_movielens(tmp_path, max_bad_fraction=0.05)
    assert raw.dropped == {"malformed_line": 1, "empty_user_id": 1, "non_numeric_rating": 1}
    assert len(raw.interactions) == len(good)
    assert (raw.interactions["user_id"] != "").all() and not raw.interactions["rating"].isna().any()
    with pytest.raises(DataError, match=r"line 11: expected 4 .*3 unusable rows of 101.*max_bad_fraction = 0.01"):
        load_movielens(tmp_path, max_bad_fraction=0.01)
    with pytest.raises(DataError, match="line 11"):
        load_movielens(tmp_path)  # the loaders' default: any bad row fails


def test_the_data_stage_counts_dropped_bad_rows_in_stats(tmp_path):
    import json

    from gr2.pipeline.data import DataConfig, run_data

    rows = [f"u{u},i{(u + k) % 4},{100 * u + k},4" for u in range(40) for k in range(3)] + [",i1,5,3", "u1,i2,6,x"]
    inter, items = _table(tmp_path, rows)
    config = DataConfig(format="table", path=str(inter), items_path=str(items), columns=COLUMNS, kcore=0,
                        max_bad_fraction=0.05)
    run_data(tmp_path / "run", config)
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    assert stats["dropped"]["empty_user_id"] == 1 and stats["dropped"]["non_numeric_rating"] == 1
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        DataConfig(max_bad_fraction=1.0)


def test_too_many_rqvae_levels_fail_when_the_config_is_loaded():
    """issue 32: sid.rqvae.levels = 40 used to fail only after the RQ-VAE had trained (the SID
    tokens name levels a..z); now the config is refused up front."""
    from gr2.pipeline.sid import SidConfig
    from gr2.config import from_dict

    with pytest.raises(ConfigError, match=r"sid.rqvae.levels must be in 1..25, got 40"):
        from_dict(SidConfig, {"rqvae": {"levels": 40}}, where="sid")
    assert from_dict(SidConfig, {"rqvae": {"levels": 25}}, where="sid").rqvae.levels == 25


def test_a_stage_record_that_is_a_directory_is_a_typed_error_from_the_cli(tmp_path, capsys):
    """issue 32: a directory where a stage writes stage.json raised a raw IsADirectoryError."""
    from gr2.cli import main as cli_main

    run = tmp_path / "run"
    (run / "data" / "stage.json").mkdir(parents=True)
    assert cli_main(["data", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage.json is a directory where the stage keeps its record" in err[0] and "Traceback" not in err[0]
    assert cli_main(["data", "--run-dir", str(run), "--force"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert (run / "data" / "stage.json").is_dir()  # nothing of the user's was removed
