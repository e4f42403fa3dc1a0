"""Every raw-format reader on a small fixture of its real format (tests/fixtures/data/)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gr2.data import default_ml100k_dir, load_raw
from gr2.data.formats import iter_json_records, load_amazon, load_movielens, load_recbole, load_table, read_atomic_file
from gr2.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def items_by_id(raw):
    return {row.item_id: row for row in raw.items.itertuples()}


def test_recbole_typed_header_token_seq_and_int_ids():
    raw = load_recbole(FIXTURES / "recbole")
    assert list(raw.interactions.columns) == ["user_id", "item_id", "timestamp", "rating"]
    assert raw.interactions["timestamp"].dtype == np.int64
    assert len(raw.interactions) == 16
    # file order is kept (it is the tie-break): user 1 logged item 11 before item 10
    assert raw.interactions["item_id"].tolist()[:2] == ["11", "10"]
    items = items_by_id(raw)
    assert items["10"].title == "Toy Story" and items["10"].year == 1995
    assert items["10"].categories == ["Animation", "Children's", "Comedy"]
    assert items["13"].year == -1  # 'unkonwn' year
    assert len(items) == 5


def test_recbole_crlf_string_ids_and_column_mapping():
    columns = {"user": "uid", "item": "sku", "timestamp": "ts", "title": "name", "categories": "cats", "description": "blurb"}
    raw = load_recbole(FIXTURES / "recbole_crlf" / "shop.inter", columns)
    assert raw.interactions["user_id"].tolist()[:3] == ["alice", "alice", "alice"]
    assert not any("\r" in v for v in raw.interactions["item_id"])
    items = items_by_id(raw)
    assert items["B001"].title == "Rose Shampoo"
    assert items["B001"].categories == ["Hair", "Shampoo"]
    assert items["B001"].description == "Gentle daily shampoo"
    assert items["B002"].description == ""


def test_recbole_mapping_to_a_missing_column_names_it():
    with pytest.raises(DataError, match="'nope'.*not found"):
        load_recbole(FIXTURES / "recbole_crlf", {"user": "nope"})


def test_recbole_missing_required_column_says_how_to_map_it():
    with pytest.raises(DataError, match="no user column.*columns.user"):
        load_recbole(FIXTURES / "recbole_crlf")


def test_recbole_bad_header_and_ragged_rows(tmp_path):
    (tmp_path / "x.inter").write_text("user_id\titem_id:token\n1\t2\n")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n2\tA\n")
    with pytest.raises(DataError, match="not 'name:type'"):
        load_recbole(tmp_path)
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\n")
    with pytest.raises(DataError, match=r"x.inter:2: 2 fields, the header has 3"):
        load_recbole(tmp_path)


def test_recbole_non_numeric_timestamp(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\tyesterday\n")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n2\tA\n")
    with pytest.raises(DataError, match="timestamp value.*'yesterday'"):
        load_recbole(tmp_path)


def test_recbole_without_item_text_columns(tmp_path):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    (tmp_path / "x.item").write_text("item_id:token\tprice:float\n2\t3.5\n")
    with pytest.raises(DataError, match="no title, categories or description"):
        load_recbole(tmp_path)


def test_bundled_ml100k_atomic_files():
    inter, types = read_atomic_file(default_ml100k_dir() / "ml-100k.item")
    assert types["movie_title"] == "token_seq"
    raw = load_raw("recbole")
    assert len(raw.interactions) == 100_000
    assert raw.interactions["user_id"].nunique() == 943
    assert len(raw.items) == 1682
    item = items_by_id(raw)["267"]
    assert item.title == "unkonwn"  # the placeholder title the dataset ships; kept, noted later


def test_movielens_100k_latin1_and_genre_flags():
    raw = load_movielens(FIXTURES / "ml-100k")
    assert raw.source["variant"] == "ml-100k"
    items = items_by_id(raw)
    assert items["3"].title == "Café au Lait"  # latin-1 'é'
    assert items["3"].year == 1993
    assert items["1"].categories == ["Animation", "Children's", "Comedy"]
    assert raw.interactions["timestamp"].tolist()[:3] == [881250949, 881250950, 881250951]


def test_movielens_100k_bad_genre_flags(tmp_path):
    (tmp_path / "u.data").write_text("1\t1\t5\t100\n")
    (tmp_path / "u.item").write_text("1|A (1990)|||url|" + "|".join(["2"] + ["0"] * 18) + "\n")
    with pytest.raises(DataError, match="genre flags"):
        load_movielens(tmp_path)


def test_movielens_1m_double_colon():
    raw = load_movielens(FIXTURES / "ml-1m")
    assert raw.source["variant"] == "ml-1m"
    items = items_by_id(raw)
    assert items["661"].title == "James and the Giant Peach"
    assert items["661"].categories == ["Animation", "Children's", "Musical"]
    assert items["1193"].year == 1975
    assert len(raw.interactions) == 9


def test_movielens_folder_without_known_files(tmp_path):
    with pytest.raises(DataError, match="neither u.data"):
        load_movielens(tmp_path)


def test_amazon_2014_json_reviews_and_python_literal_metadata_gz():
    raw = load_amazon(FIXTURES / "amazon2014" / "reviews_Beauty_5.json", FIXTURES / "amazon2014" / "meta_Beauty.json.gz")
    assert len(raw.interactions) == 9
    assert raw.interactions["timestamp"].iloc[1] == 1391040000 + 86400
    items = items_by_id(raw)
    assert items["9759091062"].categories == ["Beauty", "Makeup", "Lips", "Gifts"]  # flattened, de-duplicated
    assert items["9788072216"].title == ""
    assert items["9788072216"].description == "Eau de parfum, 50 ml."


def test_amazon_2018_gz_reviews_category_list_and_html_description():
    raw = load_raw(
        "amazon", FIXTURES / "amazon2018" / "All_Beauty_5.json.gz", FIXTURES / "amazon2018" / "meta_All_Beauty.json"
    )
    items = items_by_id(raw)
    assert items["B00006L9LC"].categories == ["All Beauty", "Hair Care"]
    assert items["B00006L9LC"].description == "Shampoo for dry hair."
    assert items["B00006L9LC"].year == 2009
    assert items["B00008JOL0"].categories == []


def test_json_records_reader_rejects_garbage(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"a": 1}\nthis is not json\n')
    with pytest.raises(DataError, match=r"bad.json:2: neither JSON nor a Python literal"):
        list(iter_json_records(path))
    path.write_text("[1, 2]\n")
    path2 = tmp_path / "array.json"
    path2.write_text('[{"a": 1}, {"a": 2}]')
    assert [r["a"] for r in iter_json_records(path2)] == [1, 2]


def test_amazon_review_without_timestamp(tmp_path):
    reviews = tmp_path / "r.json"
    reviews.write_text(json.dumps({"reviewerID": "u", "asin": "a"}) + "\n")
    meta = tmp_path / "m.json.gz"
    with gzip.open(meta, "wt") as f:
        f.write(json.dumps({"asin": "a", "title": "t"}) + "\n")
    with pytest.raises(DataError, match="no timestamp column"):
        load_amazon(reviews, meta)


def test_table_csv_with_mapping():
    columns = {"user": "customer", "item": "product", "timestamp": "event_time", "title": "name", "categories": "tags", "description": "blurb"}
    raw = load_table(FIXTURES / "table" / "interactions.csv", FIXTURES / "table" / "items.csv", columns)
    items = items_by_id(raw)
    assert items["p1"].title == "Red Mug" and items["p1"].year == 2020
    assert items["p1"].categories == ["Kitchen", "Mugs"]
    assert items["p1"].description == "A red, 300 ml mug"
    assert len(raw.interactions) == 9


def test_table_parquet(tmp_path):
    pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [3, 4, 5]}).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"item_id": [5, 6], "title": ["A", "B"], "categories": [["x", "y"], []]}).to_parquet(tmp_path / "m.parquet")
    raw = load_raw("table", tmp_path / "i.parquet", tmp_path / "m.parquet")
    assert raw.interactions["user_id"].tolist() == ["1", "1", "2"]
    assert items_by_id(raw)["5"].categories == ["x", "y"]


def test_table_unknown_extension(tmp_path):
    (tmp_path / "i.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown table format"):
        load_table(tmp_path / "i.xlsx", tmp_path / "i.xlsx")


def test_unknown_format_and_missing_paths(tmp_path):
    with pytest.raises(DataError, match="unknown data format 'excel'"):
        load_raw("excel", tmp_path)
    with pytest.raises(DataError, match="needs items_path"):
        load_raw("amazon", tmp_path / "r.json")
    with pytest.raises(DataError, match="does not exist"):
        load_raw("table", tmp_path / "nope.csv", tmp_path / "nope2.csv")
