"""The co-occurrence alignment probe of gr2.sid.diagnostics against a plain computation, on random
data, on planted data (co-consumed items made to share prefixes: the lift must show it) and on
shuffled pairs (lift about 1)."""

from __future__ import annotations

import numpy as np
import pytest

from gr2.errors import InvalidInputError
from gr2.sid.diagnostics import consecutive_pairs, sid_diagnostics


def plain_alignment(codes, sequences):
    """Per prefix length: (share of co-consumed pairs sharing it, expected share for random pairs
    with the same item frequencies, for uniformly random pairs), by loops."""
    pairs = [(int(s[i]), int(s[i + 1])) for s in sequences for i in range(len(s) - 1) if s[i] != s[i + 1]]
    n, levels = codes.shape
    firsts, seconds = np.zeros(n), np.zeros(n)
    for a, b in pairs:
        firsts[a] += 1
        seconds[b] += 1
    out = []
    for length in range(1, levels + 1):
        key = [tuple(row[:length]) for row in codes.tolist()]
        share = sum(key[a] == key[b] for a, b in pairs) / len(pairs)
        num = den = 0.0
        for i in np.flatnonzero(firsts):
            for j in np.flatnonzero(seconds):
                if i != j:
                    w = firsts[i] * seconds[j]
                    den += w
                    num += w * (key[i] == key[j])
        uniform = sum(key[i] == key[j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        out.append((share, num / den, uniform))
    return out


def _random_sequences(rng, n, users, length):
    return [rng.integers(0, n, int(rng.integers(1, length + 1))) for _ in range(users)]


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_plain_computation(seed):
    rng = np.random.default_rng(seed)
    n, levels = 40, 3
    codes = rng.integers(0, 3, (n, levels))
    sequences = _random_sequences(rng, n, 30, 12)
    sequences.append(np.array([5, 5, 5, 7]))  # repeats are not pairs
    diag = sid_diagnostics(codes, codes, 3, sequences=sequences)["cooccurrence_alignment"]
    want = plain_alignment(codes, sequences)
    assert diag["pairs"] == sum(int((s[1:] != s[:-1]).sum()) for s in sequences)
    assert diag["repeats_skipped"] >= 2
    for row, (share, matched, uniform) in zip(diag["per_prefix"], want):
        assert row["share"] == pytest.approx(share)
        assert row["random_baseline"] == pytest.approx(matched)
        assert row["uniform_baseline"] == pytest.approx(uniform)
        assert row["lift"] == pytest.approx(share / matched)


def test_planted_pairs_show_a_lift_and_shuffled_pairs_do_not():
    rng = np.random.default_rng(0)
    n, levels, k = 2000, 3, 8
    codes = rng.integers(0, k, (n, levels))
    by_code = [np.flatnonzero(codes[:, 0] == c) for c in range(k)]
    planted = []
    for _ in range(800):  # every next item is drawn under the current item's level-1 code
        seq = [int(rng.integers(n))]
        for _ in range(int(rng.integers(2, 15))):
            seq.append(int(rng.choice(by_code[codes[seq[-1], 0]])))
        planted.append(np.array(seq))
    diag = sid_diagnostics(codes, codes, k, sequences=planted)["cooccurrence_alignment"]
    level1 = diag["per_prefix"][0]
    assert level1["share"] > 0.99
    assert level1["lift"] > 5  # random pairs share a level-1 code about 1 time in 8
    # level 2 was not planted: given level 1, pairs share a level-2 code 1 time in 8, as at random
    assert diag["per_prefix"][1]["share"] == pytest.approx(1 / k, abs=0.03)
    # the same items in random order: the alignment is gone
    flat = rng.permutation(np.concatenate(planted))
    cuts = np.cumsum([len(s) for s in planted])[:-1]
    shuffled = np.split(flat, cuts)
    diag = sid_diagnostics(codes, codes, k, sequences=shuffled)["cooccurrence_alignment"]
    for row in diag["per_prefix"][:2]:
        assert row["lift"] == pytest.approx(1.0, abs=0.15)


def test_pairs_stop_at_sequence_ends_and_bad_sequences_are_typed_errors():
    first, second, repeats = consecutive_pairs([np.array([0, 1]), np.array([2]), np.array([3, 3, 4])], 5)
    assert list(zip(first.tolist(), second.tolist())) == [(0, 1), (3, 4)]
    assert repeats == 1
    codes = np.zeros((5, 2), dtype=np.int64)
    assert sid_diagnostics(codes, codes, 1, sequences=[np.array([1])])["cooccurrence_alignment"] is None
    assert sid_diagnostics(codes, codes, 1)["cooccurrence_alignment"] is None
    with pytest.raises(InvalidInputError, match="outside 0..4"):
        sid_diagnostics(codes, codes, 1, sequences=[np.array([0, 5])])
    with pytest.raises(InvalidInputError, match="1-D integer"):
        sid_diagnostics(codes, codes, 1, sequences=[np.array([0.5, 1.0])])
    with pytest.raises(InvalidInputError, match="list of 1-D"):
        sid_diagnostics(codes, codes, 1, sequences=np.zeros((2, 3), dtype=np.int64))
