"""``SidIndex.extend`` against a plain-Python reference of its extension rule (the final SID of
every new item and the repair report), on random and adversarial inputs (forced collisions, codes
copied from existing items, full prefixes, a disambiguation level), and byte for byte against
what extend produced before it was rewritten to cost O(m) plus sequential passes (issue 31.1):
the sha256 of ``to_bytes()`` of each seeded case was recorded with gr2 at fa9d319.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import pytest

import gr2


def reference_extend(index, new_ids, new_codes):
    """Final SIDs ({id: tuple}) of the new items and the report deltas, or None where the
    extension must fail (a mover with no free code nor disambiguation slot)."""
    report = index.repair_report()
    levels_in, appended = report["levels_in"], report["level_appended"]
    sizes = list(index.level_sizes)
    levels = len(sizes)
    repair = levels_in - 1
    old = {tuple(int(c) for c in row) for row in index.codes()}
    rows = [tuple(int(c) for c in row) + (0,) * (levels - len(row)) for row in new_codes]
    order = sorted(range(len(rows)), key=lambda r: (rows[r], int(new_ids[r])))
    taken = set(old)
    codes_under = defaultdict(set)  # prefix (repair-level prefix) -> repair-level codes held
    for sid in old:
        codes_under[sid[:repair]].add(sid[repair])
    out = {}
    unique = distinct = 0
    groups = defaultdict(int)
    movers = []
    i = 0
    while i < len(order):
        sid = rows[order[i]]
        run = 1
        while i + run < len(order) and rows[order[i + run]] == sid:
            run += 1
        held = sid in old
        group = run + held
        if group == 1:
            unique += 1
        else:
            groups[group] += 1
        if not held:
            distinct += 1
            taken.add(sid)
            codes_under[sid[:repair]].add(sid[repair])
            out[int(new_ids[order[i]])] = sid
        movers.extend(order[i + (not held): i + run])
        i += run
    moved = max_move = full = disambiguated = 0
    full_blocks = set()
    for r in movers:
        sid = rows[r]
        prefix, own = sid[:repair], sid[repair]
        used = codes_under[prefix]
        free = [c for c in range(sizes[repair]) if c not in used]
        if free:
            c = min(free, key=lambda c: (abs(c - own), c))
            new = prefix + (c,) + (0,) * (levels - levels_in)
            used.add(c)
            taken.add(new)
            out[int(new_ids[r])] = new
            moved += 1
            max_move = max(max_move, abs(c - own))
            continue
        if prefix not in full_blocks:
            full_blocks.add(prefix)
            full += 1
        if not appended:
            return None
        slots = [d for d in range(sizes[levels_in]) if sid[:levels_in] + (d,) not in taken]
        if not slots:
            return None
        d = min(slots, key=lambda d: (abs(d - sid[levels_in]), d))
        new = sid[:levels_in] + (d,)
        taken.add(new)
        out[int(new_ids[r])] = new
        disambiguated += d != 0
    deltas = {
        "unique_items_before": unique,
        "distinct_sids_before": distinct,
        "collision_group_sizes": dict(groups),
        "items_moved": moved,
        "max_move_distance": max_move,
        "full_prefixes": full,
        "items_disambiguated": disambiguated,
    }
    return out, deltas


def _report_deltas(before, after):
    b, a = before.repair_report(), after.repair_report()
    groups = {int(k): int(v) - int(b["collision_group_sizes"].get(k, 0)) for k, v in a["collision_group_sizes"].items()}
    return {
        "unique_items_before": a["unique_items_before"] - b["unique_items_before"],
        "distinct_sids_before": a["distinct_sids_before"] - b["distinct_sids_before"],
        "collision_group_sizes": {k: v for k, v in groups.items() if v},
        "items_moved": a["items_moved"] - b["items_moved"],
        "max_move_distance": (a["max_move_distance"], b["max_move_distance"]),
        "full_prefixes": a["full_prefixes"] - b["full_prefixes"],
        "items_disambiguated": a["items_disambiguated"] - b["items_disambiguated"],
    }


def _with_max(deltas, before):
    """The reference deltas with the report's max move distance (the larger of before and new)."""
    old = before.repair_report()["max_move_distance"]
    return {**deltas, "max_move_distance": (max(old, deltas["max_move_distance"]), old)}


def make_case(name):
    """(base index, new ids, new codes) of a named, seeded case."""
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "random":
        n, m, sizes = 3000, 400, [16, 16, 32]
        ids = rng.permutation(np.arange(1, 3 * (n + m), 3, dtype=np.uint64))[: n + m]
        codes = np.stack([rng.integers(0, s, n + m) for s in sizes], axis=1).astype(np.uint16)
        base = gr2.SidIndex.build(ids[:n], codes[:n], sizes)
        return base, ids[n:], codes[n:]
    if name == "copies_of_old_sids":
        # every new item asks for an existing item's SID, several for the same one
        n, m, sizes = 500, 300, [4, 4, 64]
        ids = rng.permutation(np.arange(n + m, dtype=np.uint64) * 7 + 11)
        codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.uint16)
        base = gr2.SidIndex.build(ids[:n], codes, sizes)
        taken = base.codes()
        new_codes = taken[rng.integers(0, len(taken), m)]
        return base, ids[n:], new_codes
    if name == "full_prefixes_appended_level":
        # few codes per prefix: the build appends a disambiguation level; the new items fill
        # prefixes up and need it too (given with the input levels and with all levels)
        n, sizes = 600, [2, 2, 4]
        ids = np.arange(10**12, 10**12 + 2 * n, 2, dtype=np.uint64)
        codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.uint16)
        codes[:200] = (1, 0, 2)  # one crowded SID sizes the disambiguation level
        base = gr2.SidIndex.build(ids, codes, sizes).remove(ids[:200:2])  # frees half its slots
        assert base.repair_report()["level_appended"]
        m = 200
        new_ids = np.arange(10**12 + 1, 10**12 + 1 + 2 * m, 2, dtype=np.uint64)
        new_codes = np.stack([rng.integers(0, s, m) for s in sizes], axis=1).astype(np.uint16)
        return base, new_ids, new_codes
    if name == "appended_level_full_codes":
        n, sizes = 400, [2, 3, 3]
        ids = rng.permutation(np.arange(n, dtype=np.uint64) * 5)
        codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.uint16)
        codes[:150] = (0, 2, 1)  # one crowded SID sizes the disambiguation level
        base = gr2.SidIndex.build(ids, codes, sizes).remove(ids[:150:2])  # frees half its slots
        assert base.repair_report()["level_appended"]
        m = 150
        new_ids = np.arange(m, dtype=np.uint64) * 5 + 2
        full = base.codes()
        new_codes = full[rng.integers(0, len(full), m)].copy()
        new_codes[::3, -1] = rng.integers(0, base.level_sizes[-1], len(new_codes[::3]))
        return base, new_ids, new_codes
    if name == "extreme_ids_and_one_block":
        # ids at both ends of u64, all new items under one prefix with the same SID
        n, sizes = 300, [16, 16, 64]
        ids = np.concatenate([np.arange(n // 2, dtype=np.uint64), np.uint64(2**64 - 1) - np.arange(n - n // 2, dtype=np.uint64)])
        codes = np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.uint16)
        base = gr2.SidIndex.build(ids, codes, sizes)
        m = 40
        new_ids = np.uint64(2**63) + np.arange(m, dtype=np.uint64)
        new_codes = np.tile(np.array([[3, 5, 60]], dtype=np.uint16), (m, 1))
        return base, new_ids, new_codes
    if name == "large_crossing_chunks":
        # more than one 65,536-row fill chunk and step-count stride; new ids appended and scattered
        n, m, sizes = 150_000, 20_000, [32, 32, 32]
        ids = rng.permutation(np.arange(n + m, dtype=np.uint64) * 3)
        ids[n : n + m // 2] = np.arange(m // 2, dtype=np.uint64) * 3 + 10**9  # above every old id
        codes = np.stack([rng.integers(0, s, n + m) for s in sizes], axis=1).astype(np.uint16)
        base = gr2.SidIndex.build(ids[:n], codes[:n], sizes)
        return base, ids[n:], codes[n:]
    if name == "empty_base":
        sizes = [4, 4]
        base = gr2.SidIndex.build(np.zeros(0, dtype=np.uint64), np.zeros((0, 2), dtype=np.uint16), sizes)
        new_ids = rng.permutation(np.arange(12, dtype=np.uint64))
        new_codes = np.stack([rng.integers(0, s, 12) for s in sizes], axis=1).astype(np.uint16)
        return base, new_ids, new_codes
    raise KeyError(name)


# sha256 of extend(...).to_bytes() for each case, recorded with gr2 at fa9d319 (before the rewrite)
GOLDEN = {
    "random": "7c2739c3eb3a910da352706e0c187f08531d0a8d0aa8494e10cfc11bc5f39f2a",
    "copies_of_old_sids": "838a1ef11b6d063e6f4f1b43bf6998fb790e201ddb6bbc619921f452929c8f19",
    "full_prefixes_appended_level": "d8c694d643ceca732882655db2f4757e58d86322074bbceeb881b18dd4a1de0a",
    "appended_level_full_codes": "d7e69404ead5aa34d0110f80a42909869318a6f66f09da2bcabdd46fe38ffc79",
    "extreme_ids_and_one_block": "8ee553885605d4bcfb259cbcabc71d247618bdba6c909acfd98b6729c31b0070",
    "large_crossing_chunks": "a8818b345d687b884ebd2fb916c46493e49ed36bbdd52f98d1cf4afb36a20581",
    "empty_base": "6ecd49a5908d7a828aca2ff30a052d4b19f2d0e875381fad612e6d37b0dc3e52",
}

CASES = [
    "random",
    "copies_of_old_sids",
    "full_prefixes_appended_level",
    "appended_level_full_codes",
    "extreme_ids_and_one_block",
    "large_crossing_chunks",
    "empty_base",
]


@pytest.mark.parametrize("name", CASES)
def test_extend_matches_the_reference_and_the_bytes_of_before(name):
    base, new_ids, new_codes = make_case(name)
    want = reference_extend(base, new_ids, new_codes)
    assert want is not None, "every case extends"
    after = base.extend(new_ids, new_codes)
    sids, deltas = want
    got = after.sids(new_ids)
    assert {int(i): tuple(int(c) for c in row) for i, row in zip(new_ids, got)} == sids
    old_ids = base.item_ids()
    np.testing.assert_array_equal(after.sids(old_ids), base.sids(old_ids))
    assert _report_deltas(base, after) == _with_max(deltas, base)
    assert hashlib.sha256(after.to_bytes()).hexdigest() == GOLDEN[name]


@pytest.mark.parametrize("seed", range(40))
def test_extend_matches_the_reference_on_random_collisions(seed):
    rng = np.random.default_rng(seed)
    levels = int(rng.integers(1, 4))
    sizes = [int(s) for s in rng.integers(1, 6, levels)]
    n, m = int(rng.integers(0, 80)), int(rng.integers(0, 60))
    ids = rng.choice(2**40, n + m, replace=False).astype(np.uint64)
    codes = np.stack([rng.integers(0, s, n + m) for s in sizes], axis=1).astype(np.uint16).reshape(n + m, levels)
    base = gr2.SidIndex.build(ids[:n], codes[:n], sizes)
    new_codes = codes[n:]
    if base.repair_report()["level_appended"] and rng.random() < 0.5:
        new_codes = np.concatenate([new_codes, rng.integers(0, base.level_sizes[-1], (m, 1)).astype(np.uint16)], axis=1)
    want = reference_extend(base, ids[n:], new_codes)
    if want is None:
        with pytest.raises(gr2.Gr2Error, match="cannot get a unique SID"):
            base.extend(ids[n:], new_codes)
        return
    after = base.extend(ids[n:], new_codes)
    sids, deltas = want
    got = after.sids(ids[n:])
    assert {int(i): tuple(int(c) for c in row) for i, row in zip(ids[n:], got)} == sids
    np.testing.assert_array_equal(after.sids(ids[:n]), base.sids(ids[:n]))
    assert _report_deltas(base, after) == _with_max(deltas, base)
