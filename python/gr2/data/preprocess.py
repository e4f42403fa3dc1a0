"""From raw interactions + item metadata to the k-cored, chronological tables of the run directory.

Order of operations (every removed row is counted under a named reason in ``stats["dropped"]``):

1. metadata rows with a duplicate item id            -> ``duplicate_item_metadata`` (first kept)
2. items whose text is empty (no title, categories or description) -> ``item_no_text``; their
   interactions -> ``interaction_item_no_text``
3. interactions naming an item the metadata lacks    -> ``interaction_unknown_item``
4. interactions below ``min_rating`` (when set)      -> ``below_min_rating``
5. repeated (user, item) pairs, the earliest kept    -> ``duplicate_interaction`` (when ``dedupe``)
6. iterative k-core on users and items               -> ``kcore``
7. the oldest interactions beyond ``max_seq_len``    -> ``history_cap`` (when set)
   (items left with no interaction at all are counted as ``items_without_kept_interactions``;
   every other reason counts interactions or metadata rows)
8. users with fewer than 3 interactions (leave-one-out needs train, valid and test) -> ``user_too_short``

Chronological order is (timestamp, position in the source file): a stable sort, because many
datasets log several interactions with the same timestamp (about 76% of ml-100k rows share a
(user, timestamp) with another row) and the file order is the only honest tie-break.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gr2.data.formats import PLACEHOLDER_TITLES, RawData
from gr2.errors import DataError

MIN_SEQ_LEN = 3  # leave-one-out: at least one training item, a valid target and a test target


@dataclass
class Processed:
    items: pd.DataFrame  # item_idx, item_id, title, categories, year, text
    sequences: pd.DataFrame  # user_idx, user_id, items, timestamps
    stats: dict[str, Any]


def item_text(title: str, year: int, categories: list[str], description: str, max_description_chars: int) -> str:
    """The text the sentence encoder embeds: ``title (year) | cat1, cat2 | description``."""
    parts = []
    if title:
        parts.append(f"{title} ({year})" if year >= 0 else title)
    if categories:
        parts.append(", ".join(categories))
    if description:
        parts.append(description[:max_description_chars].rstrip())
    return " | ".join(parts)


def _natural_order(ids: pd.Series) -> np.ndarray:
    """Sort keys: numerically when every id is an integer (ml-100k '2' < '10'), else as strings."""
    numeric = pd.to_numeric(ids, errors="coerce")
    if not numeric.isna().any():
        return np.argsort(numeric.to_numpy(), kind="stable")
    return np.argsort(ids.to_numpy().astype(str), kind="stable")


def kcore(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than ``k`` interactions until none are left."""
    if k <= 1:
        return frame
    while True:
        user_counts = frame["user_id"].map(frame["user_id"].value_counts())
        item_counts = frame["item_id"].map(frame["item_id"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return frame
        frame = frame[keep]


def preprocess(
    raw: RawData,
    kcore_k: int = 5,
    max_seq_len: int = 0,
    min_rating: float | None = None,
    dedupe: bool = True,
    max_description_chars: int = 400,
) -> Processed:
    dropped: dict[str, int] = dict(raw.dropped)
    notes = list(raw.notes)

    def count(reason: str, n: int) -> None:
        if n:
            dropped[reason] = dropped.get(reason, 0) + int(n)

    inter = raw.interactions.copy()
    meta = raw.items.copy()
    if inter.empty:
        raise DataError("the source has no interactions")
    if meta.empty:
        raise DataError("the source has no item metadata")
    raw_counts = {
        "interactions": len(inter),
        "users": int(inter["user_id"].nunique()),
        "items_in_interactions": int(inter["item_id"].nunique()),
        "items_in_metadata": len(meta),
    }
    inter["source_row"] = np.arange(len(inter), dtype=np.int64)

    # 1-2. metadata: unique ids, non-empty text
    duplicated = meta["item_id"].duplicated(keep="first")
    count("duplicate_item_metadata", duplicated.sum())
    meta = meta[~duplicated].reset_index(drop=True)
    meta["text"] = [
        item_text(t, int(y), c, d, max_description_chars)
        for t, y, c, d in zip(meta["title"], meta["year"], meta["categories"], meta["description"])
    ]
    no_text = meta["text"].str.len() == 0
    count("item_no_text", no_text.sum())
    textless = set(meta.loc[no_text, "item_id"])
    meta = meta[~no_text]
    in_textless = inter["item_id"].isin(textless)
    count("interaction_item_no_text", in_textless.sum())
    inter = inter[~in_textless]

    # 3. interactions must name a known item
    unknown = ~inter["item_id"].isin(set(meta["item_id"]))
    count("interaction_unknown_item", unknown.sum())
    if unknown.any():
        notes.append(
            f"{int(unknown.sum())} interactions name {inter.loc[unknown, 'item_id'].nunique()} item ids "
            "that the metadata lacks; they were dropped"
        )
    inter = inter[~unknown]

    # 4-5. ratings and repeats
    if min_rating is not None:
        if "rating" not in inter:
            raise DataError("min_rating is set but the source has no rating column")
        low = ~(inter["rating"] >= min_rating)
        count("below_min_rating", low.sum())
        inter = inter[~low]
    inter = inter.sort_values(["user_id", "timestamp", "source_row"], kind="stable")
    if dedupe:
        repeated = inter.duplicated(["user_id", "item_id"], keep="first")
        count("duplicate_interaction", repeated.sum())
        inter = inter[~repeated]

    # 6. k-core
    before = len(inter)
    inter = kcore(inter, kcore_k)
    count("kcore", before - len(inter))
    if inter.empty:
        raise DataError(
            f"no interactions are left after the {kcore_k}-core filter ({before} before it); "
            "lower kcore or use a denser dataset"
        )

    # 7-8. per-user sequences, capped, long enough for leave-one-out
    if max_seq_len and max_seq_len > 0:
        position_from_end = inter.groupby("user_id", sort=False).cumcount(ascending=False)
        over = position_from_end >= max_seq_len
        count("history_cap", over.sum())
        inter = inter[~over]
    user_len = inter["user_id"].map(inter["user_id"].value_counts())
    short = user_len < MIN_SEQ_LEN
    count("user_too_short", short.sum())
    inter = inter[~short]
    if inter.empty:
        raise DataError(f"no user has the {MIN_SEQ_LEN} interactions leave-one-out needs")

    # dense indices, in natural id order
    meta = meta[meta["item_id"].isin(set(inter["item_id"]))]
    count("items_without_kept_interactions", raw_counts["items_in_metadata"] - dropped.get("duplicate_item_metadata", 0)
          - dropped.get("item_no_text", 0) - len(meta))
    meta = meta.iloc[_natural_order(meta["item_id"])].reset_index(drop=True)
    meta.insert(0, "item_idx", np.arange(len(meta), dtype=np.int64))
    item_index = dict(zip(meta["item_id"], meta["item_idx"]))
    placeholders = meta[meta["title"].str.lower().isin(PLACEHOLDER_TITLES)]
    if len(placeholders):
        notes.append(
            "items with a placeholder title (kept; their text carries little meaning): "
            + ", ".join(f"{i} ({t!r})" for i, t in zip(placeholders["item_id"], placeholders["title"]))
        )

    users = pd.Series(inter["user_id"].unique())
    users = users.iloc[_natural_order(users)].reset_index(drop=True)
    inter = inter.assign(item_idx=inter["item_id"].map(item_index).astype(np.int64))
    grouped = inter.groupby("user_id", sort=False)
    item_lists = grouped["item_idx"].apply(list)
    time_lists = grouped["timestamp"].apply(list)
    sequences = pd.DataFrame(
        {
            "user_idx": np.arange(len(users), dtype=np.int64),
            "user_id": users.astype(str).to_numpy(),
            "items": [item_lists[u] for u in users],
            "timestamps": [time_lists[u] for u in users],
        }
    )
    lengths = sequences["items"].map(len).to_numpy()
    tie_share = float(inter.duplicated(["user_id", "timestamp"], keep=False).mean())
    notes.append(
        f"{tie_share:.1%} of kept interactions share (user, timestamp) with another; order within a "
        "tie is the source file order"
    )
    stats = {
        "users": len(sequences),
        "items": len(meta),
        "interactions": int(lengths.sum()),
        "avg_seq_len": float(lengths.mean()),
        "median_seq_len": float(np.median(lengths)),
        "min_seq_len": int(lengths.min()),
        "max_seq_len": int(lengths.max()),
        "density": float(lengths.sum() / (len(sequences) * len(meta))),
        "kcore": kcore_k,
        "raw": raw_counts,
        "dropped": dict(sorted(dropped.items())),
        "same_timestamp_share": tie_share,
        "notes": notes,
        "source": raw.source,
    }
    items = meta[["item_idx", "item_id", "title", "categories", "year", "text"]]
    return Processed(items=items, sequences=sequences, stats=stats)
