"""Test fixtures for the upstream/candidates/eval/prompt tests.

Builds the data stage's ``data/items`` and ``data/sequences`` (exact run-dir schema) from a small
synthetic catalog whose users walk item chains, or from MovieLens-100k's atomic files (the same
tables gr2.data produces: checked in test_upstream_ml100k.py), and random SID indexes.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np


def ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("recbole (ml-100k asset package) is not installed")
    return Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"


def _read_atomic(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader)]
        return [dict(zip(header, row)) for row in reader]


def ml100k_tables(k_core: int = 5) -> tuple[dict, dict]:
    """(items, sequences) column dicts in the data-stage schema."""
    root = ml100k_dir()
    inter = _read_atomic(root / "ml-100k.inter")
    meta = {r["item_id"]: r for r in _read_atomic(root / "ml-100k.item")}
    users = np.array([r["user_id"] for r in inter])
    items = np.array([r["item_id"] for r in inter])
    times = np.array([int(float(r["timestamp"])) for r in inter], dtype=np.int64)
    keep = np.ones(len(inter), dtype=bool)
    while True:  # k-core until stable
        _, ui, uc = np.unique(users[keep], return_inverse=True, return_counts=True)
        _, ii, ic = np.unique(items[keep], return_inverse=True, return_counts=True)
        ok = (uc[ui] >= k_core) & (ic[ii] >= k_core)
        if ok.all():
            break
        keep[np.nonzero(keep)[0][~ok]] = False
    users, items, times = users[keep], items[keep], times[keep]
    item_ids = sorted(set(items.tolist()), key=int)
    item_idx = {iid: i for i, iid in enumerate(item_ids)}
    user_ids = sorted(set(users.tolist()), key=int)
    order = np.lexsort((times, np.array([int(u) for u in users])))  # stable: file order within ties
    seqs: dict[str, list] = {u: [] for u in user_ids}
    stamps: dict[str, list] = {u: [] for u in user_ids}
    for i in order:
        seqs[users[i]].append(item_idx[items[i]])
        stamps[users[i]].append(int(times[i]))
    titles, cats, years, texts = [], [], [], []
    for iid in item_ids:
        m = meta.get(iid, {})
        title = m.get("movie_title", "").strip() or f"item {iid}"
        genres = m.get("class", "").split()
        year = int(m["release_year"]) if m.get("release_year", "").isdigit() else -1
        titles.append(title)
        cats.append(genres)
        years.append(year)
        texts.append(f"{title} ({year if year >= 0 else 'unknown'}). Genres: {', '.join(genres) or 'unknown'}.")
    items_cols = {
        "item_idx": list(range(len(item_ids))),
        "item_id": item_ids,
        "title": titles,
        "categories": cats,
        "year": years,
        "text": texts,
    }
    seq_cols = {
        "user_idx": list(range(len(user_ids))),
        "user_id": user_ids,
        "items": [seqs[u] for u in user_ids],
        "timestamps": [stamps[u] for u in user_ids],
    }
    return items_cols, seq_cols


def synthetic_tables(n_users: int = 60, n_items: int = 40, seed: int = 0) -> tuple[dict, dict]:
    """A small catalog whose users walk item chains (item i tends to be followed by i+1)."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]
    items_cols = {
        "item_idx": list(range(n_items)),
        "item_id": [f"i{i}" for i in range(n_items)],
        "title": [f"Movie {i}" for i in range(n_items)],
        "categories": [[genres[i % 5], genres[(i * 7) % 5]] if i % 3 else [genres[i % 5]] for i in range(n_items)],
        "year": [1980 + i % 30 if i % 4 else -1 for i in range(n_items)],
        "text": [f"Movie {i}" for i in range(n_items)],
    }
    seqs = []
    for _ in range(n_users):
        length = min(int(rng.integers(6, 15)), n_items)  # distinct items only
        start = int(rng.integers(0, n_items))
        seq, seen = [], set()
        cur = start
        while len(seq) < length:
            if cur not in seen:
                seq.append(cur)
                seen.add(cur)
            cur = (cur + 1) % n_items if rng.random() < 0.8 else int(rng.integers(0, n_items))
        seqs.append(seq)
    seq_cols = {
        "user_idx": list(range(n_users)),
        "user_id": [f"u{u}" for u in range(n_users)],
        "items": seqs,
        "timestamps": [list(range(1000, 1000 + len(s))) for s in seqs],
    }
    return items_cols, seq_cols


def ITEM_FEATURES():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "item_idx": Value("int64"),
            "item_id": Value("string"),
            "title": Value("string"),
            "categories": Sequence(Value("string")),
            "year": Value("int64"),
            "text": Value("string"),
        }
    )


def write_data_stage(run_dir: Path, items_cols: dict, seq_cols: dict) -> None:
    """Write data/items, data/sequences, data/stats.json and stage.json like the data stage."""
    from datasets import Dataset, Features, Sequence, Value

    from gr2.rundir import atomic_write_json, mark_done

    data = Path(run_dir) / "data"
    item_features = ITEM_FEATURES()
    seq_features = Features(
        {
            "user_idx": Value("int64"),
            "user_id": Value("string"),
            "items": Sequence(Value("int64")),
            "timestamps": Sequence(Value("int64")),
        }
    )
    Dataset.from_dict(items_cols, features=item_features).save_to_disk(str(data / "items"))
    Dataset.from_dict(seq_cols, features=seq_features).save_to_disk(str(data / "sequences"))
    n_inter = sum(len(s) for s in seq_cols["items"])
    stats = {
        "users": len(seq_cols["items"]),
        "items": len(items_cols["item_idx"]),
        "interactions": n_inter,
        "avg_seq_len": n_inter / len(seq_cols["items"]),
        "dropped": {},
    }
    atomic_write_json(data / "stats.json", stats)
    mark_done(data, "fixture-" + str(n_inter), stats)


def items_dataset(items_cols: dict):
    """The data/items table as an in-memory HF dataset."""
    from datasets import Dataset

    return Dataset.from_dict(items_cols, features=ITEM_FEATURES())


def random_sid_index(n_items: int, levels: int = 3, codebook_size: int = 8, seed: int = 0):
    """A gr2.SidIndex over items 0..n_items-1 with distinct random codes (no repair needed)."""
    import gr2

    rng = np.random.default_rng(seed)
    codes: set[tuple[int, ...]] = set()
    while len(codes) < n_items:
        codes.add(tuple(int(c) for c in rng.integers(0, codebook_size, levels)))
    table = np.array(sorted(codes), dtype=np.uint16)[rng.permutation(n_items)]
    return gr2.SidIndex.build(np.arange(n_items, dtype=np.uint64), table, codebook_size=codebook_size)
