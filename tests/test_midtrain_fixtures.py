"""Run-directory fixtures for the training-stage tests: a slice of MovieLens-100k laid out as the
`data`, `sid` and `candidates` stages write it.

SIDs here are hand-made and semantic (built into a real gr2.SidIndex): level a = first genre,
level b = release decade, level c = running number inside (a, b), so every item is unique.
Candidates: the target plus the 9 most popular other items the user has not seen, ordered by
popularity plus per-user noise (a noisy popularity upstream; the target is always present).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

import gr2
from gr2.rundir import mark_done


def ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    return Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"


def read_ml100k(n_users: int | None):
    root = ml100k_dir()
    inter = np.loadtxt(root / "ml-100k.inter", skiprows=1, dtype=np.int64)  # user item rating ts
    users = np.unique(inter[:, 0])
    if n_users is not None:
        users = users[:n_users]
    inter = inter[np.isin(inter[:, 0], users)]
    meta = {}
    for line in (root / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]:
        item, title, year, genres = line.split("\t")
        meta[int(item)] = (title, int(year) if year.strip().isdigit() else -1, genres.split())
    return inter, meta


def make_run_dir(run_dir: Path, n_users: int | None = 60, k: int = 10, prompt=None) -> Path:
    """Write data/, sid/, candidates/ and prompts/ for the first ``n_users`` users of ml-100k
    (``prompt``: a gr2.prompts.PromptConfig, default max_history=8)."""
    import datasets

    inter, meta = read_ml100k(n_users)
    item_ext = np.unique(inter[:, 1])
    dense = {int(e): i for i, e in enumerate(item_ext)}
    titles = [meta[int(e)][0] for e in item_ext]
    years = [meta[int(e)][1] for e in item_ext]
    cats = [meta[int(e)][2] for e in item_ext]
    datasets.Dataset.from_dict({
        "item_idx": list(range(len(item_ext))), "item_id": [str(e) for e in item_ext], "title": titles,
        "categories": cats, "year": years,
        "text": [f"{t} ({y}) {' '.join(c)}" for t, y, c in zip(titles, years, cats)],
    }).save_to_disk(str(run_dir / "data" / "items"))
    seqs, stamps, uids = [], [], []
    for user in np.unique(inter[:, 0]):
        rows = inter[inter[:, 0] == user]
        rows = rows[np.argsort(rows[:, 3], kind="stable")]
        seqs.append([dense[int(i)] for i in rows[:, 1]])
        stamps.append(rows[:, 3].tolist())
        uids.append(str(user))
    datasets.Dataset.from_dict({"user_idx": list(range(len(seqs))), "user_id": uids, "items": seqs,
                                "timestamps": stamps}).save_to_disk(str(run_dir / "data" / "sequences"))
    mark_done(run_dir / "data", f"data-{n_users}", {"users": len(seqs), "items": len(item_ext)})

    genres = sorted({c[0] if c else "none" for c in cats})
    a = np.array([genres.index(c[0] if c else "none") for c in cats])
    b = np.array([min(9, max(0, (y - 1920) // 10)) if y > 0 else 0 for y in years])
    c = np.zeros(len(a), dtype=np.int64)
    seen: dict[tuple[int, int], int] = {}
    for i in range(len(a)):
        c[i] = seen.get((a[i], b[i]), 0)
        seen[(a[i], b[i])] = c[i] + 1
    codes = np.stack([a, b, c], axis=1).astype(np.uint16)
    sizes = [len(genres), 10, int(c.max()) + 1]
    (run_dir / "sid").mkdir(parents=True, exist_ok=True)
    gr2.SidIndex.build(np.arange(len(a), dtype=np.uint64), codes, codebook_size=sizes).save(str(run_dir / "sid" / "index.gr2sid"))
    mark_done(run_dir / "sid", f"sid-{n_users}", {"levels": 3})

    popularity = np.bincount(np.concatenate([s[:-2] for s in seqs]), minlength=len(item_ext))
    by_pop = np.argsort(-popularity, kind="stable")
    for split, cut in (("train", 3), ("valid", 2), ("test", 1)):
        rows = {"list_id": [], "user_idx": [], "history": [], "candidates": [], "scores": [], "target": []}
        for u, seq in enumerate(seqs):
            history, target = seq[:-cut], seq[-cut]
            seen_items = set(history) | {target}
            others = [int(i) for i in by_pop if int(i) not in seen_items][: k - 1]
            # a noisy upstream: popularity plus per-user noise, so the target lands anywhere
            noise = np.random.default_rng([u, cut]).normal(0, 0.5 * popularity.max() + 1, size=k)
            score = {i: popularity[i] + e for i, e in zip(others + [target], noise)}
            cand = sorted(score, key=lambda i: -score[i])
            rows["list_id"].append(u)
            rows["user_idx"].append(u)
            rows["history"].append(history[-50:])
            rows["candidates"].append(cand)
            rows["scores"].append([float(score[i]) for i in cand])
            rows["target"].append(target)
        datasets.Dataset.from_dict(rows).save_to_disk(str(run_dir / "candidates" / split))
        # fit data of the split: what its (here: popularity) upstream and the teacher may use
        fit_cut = 3 if split == "train" else 2
        datasets.Dataset.from_dict({"user_idx": list(range(len(seqs))), "items": [q[:-fit_cut] for q in seqs]}).save_to_disk(
            str(run_dir / "candidates" / f"fit_{split}"))
    mark_done(run_dir / "candidates", f"cand-{n_users}", {"k": k})
    from gr2.pipeline.prompts import run_prompts
    from gr2.prompts import PromptConfig

    run_prompts(run_dir, prompt or PromptConfig(max_history=8))
    return run_dir


def tiny_midtrain_config(**overrides):
    """A midtrain config small enough for a test on a busy 2-core machine."""
    from gr2.models import DemoModelConfig
    from gr2.train.midtrain import MidtrainConfig

    base = dict(steps=6, batch_size=4, lr=5e-3, warmup_steps=1, max_history=5, max_length=256,
                demo=DemoModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=1,
                                     num_heads=2, max_position_embeddings=2048),
                eval_users=4, eval_beams=4, eval_ks=[1, 4], eval_batch_size=4, checkpoint_every=2, log_every=1)
    base.update(overrides)
    return MidtrainConfig(**base)


def built_run(tmp_path_factory, monkeypatch_module=None, *, n_users=30, midtrain=True):
    """A fixture run directory (data, sid, candidates, and optionally a tiny midtrain)."""
    run_dir = make_run_dir(tmp_path_factory.mktemp("run"), n_users)
    if midtrain:
        from gr2.pipeline.midtrain import run_midtrain

        run_midtrain(run_dir, tiny_midtrain_config())
    return run_dir
