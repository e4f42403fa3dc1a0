"""Rolling train cutoffs (``candidates.time.rolling``, issue 28): the training window is cut into
time slices, each ranked by a ranker fitted up to its own start, and every statistic shown next to
a list (evidence, teacher, eval baselines) comes from that list's slice -- checked against the plain
computation, with the no-leak invariant, and bad settings refused naming the key."""

import json
from collections import Counter

import numpy as np
import pytest
from datasets import load_from_disk

from gr2.candidates import CandidatesConfig, ItemKNNConfig, TimeSplitConfig, fit_ranker, list_fit_slices, rank_lists
from gr2.pipeline.inputs import load_fit_sequences
from gr2.pipeline.candidates import run_candidates
from gr2.errors import ConfigError
from gr2.splits import time_protocol

from test_midtrain_fixtures import make_run_dir


def random_log(n_users=40, seed=0):
    rng = np.random.default_rng(seed)
    users, seqs, stamps = list(range(n_users)), [], []
    for _ in users:
        n = int(rng.integers(3, 30))
        seqs.append(rng.permutation(300)[:n].tolist())
        stamps.append(np.sort(rng.integers(0, 100_000, size=n)).tolist())
    return users, seqs, stamps


def requests_of(split, name):
    req = split.requests[name]
    return Counter((int(u), int(t), len(h)) for u, t, h in zip(req.user_idx, req.targets, req.histories))


def test_rolling_slices_partition_the_window_and_fit_up_to_their_start():
    users, seqs, stamps = random_log()
    one = time_protocol(users, seqs, stamps, 0.3, 0.9, 0.2, seed=3)
    rolled = time_protocol(users, seqs, stamps, 0.3, 0.9, 0.2, seed=3, rolling=4)
    # the same requests, valid users and test lists: only which ranker ranks them changes
    for name in ("train", "valid", "test"):
        assert requests_of(rolled, name) == requests_of(one, name)
    assert rolled.fit["train"] is rolled.slice_fit[0]
    assert not one.slice_fit and not one.slices("train").any()
    starts = [c["timestamp"] for c in rolled.notes["rolling_cutoffs"]] + [rolled.notes["test_cutoff"]["timestamp"]]
    assert len(starts) == 5 and starts == sorted(starts)
    stamp_of, seq_of = dict(zip(users, stamps)), dict(zip(users, seqs))
    position = {int(u): i for i, u in enumerate(rolled.users)}
    seen_slices = set()
    for name in ("train", "valid"):
        req = rolled.requests[name]
        for u, h, t, r in zip(req.user_idx, req.histories, req.targets, rolled.slices(name)):
            seen_slices.add(int(r))
            when = stamp_of[int(u)][len(h)]
            assert starts[r] < when <= starts[r + 1]  # the target lies in its slice
            fit = rolled.fit_of_slice(name, int(r))[position[int(u)]].tolist()
            # the slice's fit data: exactly the user's interactions up to the slice start, a prefix of
            # the history, never the target
            assert fit == [i for i, s in zip(seq_of[int(u)], stamp_of[int(u)]) if s <= starts[r]]
            assert fit == h.tolist()[:len(fit)] and int(t) not in fit
    assert seen_slices == {0, 1, 2, 3}


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
def test_rolling_must_be_a_whole_number_of_slices(bad):
    users, seqs, stamps = random_log()
    with pytest.raises(ConfigError, match="candidates.time.rolling"):
        time_protocol(users, seqs, stamps, 0.3, 0.9, 0.2, rolling=bad)
    with pytest.raises(ConfigError, match="candidates.time.rolling"):
        TimeSplitConfig(rolling=bad)


def test_rolling_that_leaves_a_slice_empty_is_refused():
    # timestamps tie at the first slice boundaries: slices 0 and 1 start and end at the same time
    seqs = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    stamps = [[1, 5, 5, 5, 9, 10], [1, 5, 5, 5, 9, 10]]
    assert len(time_protocol([0, 1], seqs, stamps, 0.3, 0.9, 0.0).requests["train"]) == 2
    with pytest.raises(ConfigError, match=r"candidates.time.rolling=3 leaves time slice\(s\) \[0, 1\]"):
        time_protocol([0, 1], seqs, stamps, 0.3, 0.9, 0.0, rolling=3)


@pytest.fixture(scope="module")
def rolled_run(tmp_path_factory):
    """A tiny ml-100k run (data, sid, prompts fixture), its candidates redone with 3 rolling slices."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("rolling"), n_users=40)
    # max_history above any user's length: the stored histories are the ranker's whole input
    config = CandidatesConfig(upstream="itemknn", k=10, max_history=10_000, protocol="time",
                              itemknn=ItemKNNConfig(neighbors=20),
                              time=TimeSplitConfig(train_cutoff=0.3, test_cutoff=0.9, valid_users=0.2, rolling=3))
    run_candidates(run_dir, config, force=True)
    return run_dir, config


def test_candidates_rank_each_slice_with_its_own_ranker(rolled_run):
    run_dir, config = rolled_run
    report = json.loads((run_dir / "candidates" / "report.json").read_text())
    assert len(report["splits"]["train"]["coverage_by_slice"]) == 3
    assert "3 rolling train slices" in report["train_protocol"]
    items = load_from_disk(str(run_dir / "data" / "items"))
    for split in ("train", "valid"):
        table = load_from_disk(str(run_dir / "candidates" / split))
        slices = list_fit_slices(table)
        assert set(slices.tolist()) <= {0, 1, 2} and len(set(slices.tolist())) > 1
        for r in np.unique(slices):
            rows = np.nonzero(slices == r)[0]
            # plain computation: a ranker fitted on the slice's fit data ranks the slice's histories
            ranker = fit_ranker("itemknn", load_fit_sequences(run_dir, split, int(r)), len(items), config)
            full = [np.asarray(h, np.int64) for h in np.asarray(table["history"], dtype=object)[rows]]
            expected = rank_lists(ranker, np.zeros(len(rows), np.int64), full, np.asarray(table["target"])[rows], config)
            got = np.asarray(table["candidates"])[rows]
            # histories are stored capped at max_history (50 > any fixture history): the same input
            assert np.array_equal(got, expected.candidates)
    # slices >= 1 are shared by train and valid; slice 0 stays the split's own fit data
    assert (run_dir / "candidates" / "fit_slice_1").exists() and (run_dir / "candidates" / "fit_slice_2").exists()
    first = [len(s) for s in load_fit_sequences(run_dir, "train", 0)]
    later = [len(s) for s in load_fit_sequences(run_dir, "train", 2)]
    assert sum(later) > sum(first)


def test_prompts_evidence_and_teacher_use_the_lists_slice(rolled_run):
    from gr2.data.catalog import ItemCatalog
    from gr2.pipeline.prompts import run_prompts
    from gr2.pipeline.inputs import load_requests
    from gr2.prompts import PromptConfig, candidate_evidence
    from gr2.pipeline.traces import TeacherConfig, heuristic_teachers, load_examples

    run_dir, _ = rolled_run
    prompt = PromptConfig(max_history=8, evidence="cooccur")
    run_prompts(run_dir, prompt, force=True)
    table = load_requests(run_dir, "train")
    slices = list_fit_slices(table)
    assert len(np.unique(slices)) > 1
    n_items = len(load_from_disk(str(run_dir / "data" / "items")))
    evidence = np.asarray(table["evidence"], dtype=np.float32)
    for r in np.unique(slices):
        rows = np.nonzero(slices == r)[0]
        histories = [np.asarray(table[int(i)]["history"], np.int64) for i in rows]
        want = candidate_evidence(histories, np.asarray(table["candidates"])[rows],
                                  load_fit_sequences(run_dir, "train", int(r)), n_items, prompt)
        assert np.array_equal(evidence[rows], want)
    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    teacher_of = heuristic_teachers(run_dir, catalog, TeacherConfig(), "train")
    for example in load_examples(run_dir, "train", 0, 0):
        fit = load_fit_sequences(run_dir, "train", example.fit_slice)
        teacher = teacher_of(example)
        assert teacher.popularity.sum() == sum(len(s) for s in fit)
        assert example.target not in fit[example.user_idx].tolist()
