# size: the sid stage with its --update and --ablation variants, which share its config, inputs and record
"""The ``sid`` stage: item text -> embeddings -> RQ-VAE -> codes -> a repaired, unique SID index.

Reads ``<run_dir>/data/items`` (and ``data/sequences`` for the optional contrastive loss); writes
``<run_dir>/sid/``:

* ``codebooks.safetensors``  ``codebooks`` float32 (L, K, latent_dim) plus the encoder/decoder
  weights and input standardisation (``encoder.*``, ``decoder.*``, ``input_mean``,
  ``input_scale``); the RQ-VAE config is in the safetensors metadata;
* ``index.gr2sid``           gr2.SidIndex over item ids = item_idx (uint64), every SID unique;
* ``report.json``            uniqueness before/after repair, utilisation, reconstruction error,
  collision group sizes, repair report, timings, and ``diagnostics`` (gr2.sid.diagnostics:
  code usage, aliasing, fan-out, neighbour agreement, popularity by code);
* ``diagnostics.png``        those diagnostics plotted (docs/sid-diagnostics.md).

Assignment (:mod:`gr2.sid.assign`): the latent of every item goes through the Rust encoder (``gr2.RQCodebooks.encode``,
greedy argmin). With ``random_last_level`` the last level is then overwritten by codes drawn
uniformly from 0..K-1 by ``numpy.random.default_rng(assign_seed)`` in item_idx order (see
gr2.sid.rqvae for why training keeps argmin). ``gr2.SidIndex.build`` then repairs what collisions
remain, so every item ends with a unique SID; both figures are reported.

``gr2 sid --update`` (:func:`update_index`) adds the items of ``data/items`` that the index lacks
without changing any existing item's SID: it encodes them with the saved RQ-VAE
(``codebooks.safetensors``), extends the index (collisions repaired among the new items only, see
``gr2.SidIndex.extend``) and replaces ``index.gr2sid`` atomically; on any error the old index is
left untouched.

``gr2 sid --ablation`` retrains the RQ-VAE with one technique switched at a time and writes
``ablation.json`` / ``ablation.md`` (see :func:`run_ablation`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gr2
from gr2 import rundir
from gr2._rows import id_array
from gr2.config import from_dict, load_toml
from gr2.data.catalog import load_items, load_sequences
from gr2.embed import default_model_path, embed_texts
from gr2.errors import ConfigError, DataError, InvalidInputError
from gr2.sid.assign import assign_codes, load_rqvae_file, reconstruction_of, save_rqvae_file
from gr2.sid.diagnostics import plot_diagnostics, sid_diagnostics
from gr2.sid.rqvae import RQVAEConfig, collision_groups, encode_latent, train_rqvae, uniqueness, utilisation
from gr2.splits import train_sequences

log = logging.getLogger(__name__)


@dataclass
class SidConfig:
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    embed_model: str | None = None  # local folder or hub name; None = offline all-MiniLM-L6-v2
    embed_batch_size: int = 64
    embed_max_length: int = 128
    cache_dir: str | None = None  # None = <run_dir>/../.cache/embeddings
    assign_seed: int = 0  # RNG seed of the random last level at assignment
    threads: int = 1  # torch CPU threads; small matrices run fastest (and steadiest) on one
    # ablation settings: the weights used for the "+diversity" and "+contrastive" rows when the
    # main config leaves them at 0, and the training seeds averaged over
    ablation_diversity_weight: float = 0.1
    ablation_contrastive_weight: float = 0.1
    ablation_seeds: list[int] = field(default_factory=lambda: [0])
    # diagnostics (report.json["diagnostics"], sid/diagnostics.png): neighbour agreement over
    # this many sampled items (0 = skip it) and their k nearest embedding neighbours
    diagnostics_sample: int = 1000
    diagnostics_k: int = 10
    diagnostics_seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("diagnostics_sample", 0), ("diagnostics_k", 1), ("diagnostics_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"sid.{name} must be an integer >= {minimum}, got {value!r}")
        if self.threads < 0:
            raise ConfigError(f"sid.threads must be >= 0 (0 = torch default), got {self.threads}")
        if not self.ablation_seeds:
            raise ConfigError("sid.ablation_seeds must name at least one seed")


def _stage_dirs(run_dir: str | Path) -> tuple[Path, Path]:
    return Path(run_dir) / "data", Path(run_dir) / "sid"


def _data_key(data_dir: Path) -> str:
    record = rundir.read_stage(data_dir)
    if record is None:
        raise DataError(f"{data_dir} has no finished data stage; run `gr2 data` first")
    return record["key"]


def _cache_dir(run_dir: str | Path, config: SidConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path(run_dir).resolve().parent / ".cache" / "embeddings"


def item_embeddings(run_dir: str | Path, config: SidConfig, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    items = load_items(run_dir)
    texts = list(items["text"])
    vectors = embed_texts(
        texts, config.embed_model, _cache_dir(run_dir, config), config.embed_batch_size,
        config.embed_max_length, progress,
    )
    return vectors, texts


def item_popularity(run_dir: str | Path, n_items: int) -> np.ndarray | None:
    """Interactions per item_idx over every user's whole sequence in ``data/sequences``; None when
    the data stage wrote no sequences."""
    rows = consumption_sequences(run_dir)
    if rows is None:
        return None
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    if len(flat) and (flat.min() < 0 or flat.max() >= n_items):
        raise DataError(f"data/sequences hold item_idx outside 0..{n_items - 1}; rerun the data stage")
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def consumption_sequences(run_dir: str | Path) -> list[np.ndarray] | None:
    """Every user's whole sequence of item_idx from ``data/sequences`` (for the co-occurrence
    diagnostics); None when the data stage wrote no sequences."""
    try:
        sequences = load_sequences(run_dir)
    except DataError:
        return None
    return [np.asarray(items, dtype=np.int64) for items in sequences["items"]]


def index_diagnostics(run_dir: str | Path, index: Any, codebook_size: int) -> dict[str, Any] | None:
    """The diagnostics recomputed on the SIDs an index holds now (after an update): the input
    codes of the items placed before are not kept, so every figure is computed on the index's
    first ``levels_in`` levels; neighbour agreement needs every item's embedding and is left out.
    Popularity and co-occurrence count the items of ``data/sequences`` the index holds (an item it
    lacks splits a sequence: no pair is made across it)."""
    if len(index) == 0:
        return None
    ids = np.sort(index.item_ids())  # item_idx, plus any explicit ids added above the data's
    sids = index.sids(ids)
    levels_in = int(index.repair_report()["levels_in"])
    sequences = consumption_sequences(run_dir)
    rows = None
    if sequences is not None and len(ids):
        rows = []
        for seq in sequences:
            pos = np.searchsorted(ids, seq.astype(np.uint64))
            present = ids[np.minimum(pos, len(ids) - 1)] == seq.astype(np.uint64)
            pieces = np.split(pos, np.flatnonzero(~present))
            rows.extend([pieces[0], *(piece[1:] for piece in pieces[1:])])
    popularity = None
    if rows is not None:
        flat = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        popularity = np.bincount(flat, minlength=len(ids)).astype(np.float64)
    diag = sid_diagnostics(sids[:, :levels_in], sids, codebook_size, popularity=popularity, sequences=rows)
    diag["computed_on"] = f"index SIDs, generation {index.generation} (earlier items' input codes are not kept)"
    return diag


def _duplicate_text_items(texts: list[str]) -> int:
    _, counts = np.unique(np.asarray(texts, dtype=object).astype(str), return_counts=True)
    return int(counts[counts > 1].sum())


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Run with ``threads`` torch CPU threads (0 = unchanged) and restore the caller's setting."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_sid(run_dir: str | Path, config: SidConfig | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the sid stage into ``<run_dir>/sid``; skipped when data and config are unchanged."""
    config = config or SidConfig()
    data_dir, stage_dir = _stage_dirs(run_dir)
    key = rundir.stage_key(config, _data_key(data_dir), config.embed_model or default_model_path())
    if not force and (finished := _finish_interrupted_update(stage_dir, key)) is not None:
        return finished
    if (done := rundir.begin_stage(stage_dir, key, force=force)) is not None:
        return done
    (stage_dir / UPDATE_MARKER).unlink(missing_ok=True)  # a rebuild supersedes any interrupted update
    with _torch_threads(config.threads):
        return _run_sid(run_dir, config, key, progress)


# Written by update_index before it touches the stage record and removed after the new record: a
# run that finds it knows the index file is an update's (old or new, each saved atomically), not a
# half-built stage, and keeps it -- rebuilding would retrain the RQ-VAE and move every SID.
UPDATE_MARKER = "update.pending"


def _finish_interrupted_update(stage_dir: Path, key: str) -> dict[str, Any] | None:
    """The record of an update killed between its index and its record, rewritten for the index on
    disk; None when there is no such update (or it ran under other data or settings)."""
    marker = stage_dir / UPDATE_MARKER
    if not marker.exists():
        return None
    try:
        pending = rundir.load_json(marker)
        index = gr2.SidIndex.load(str(stage_dir / "index.gr2sid"))
    except (ValueError, OSError, gr2.Gr2Error):
        return None  # no usable index: the stage rebuilds as it would without the marker
    if not isinstance(pending, dict) or pending.get("key") != key:
        return None
    summary = _record_update(stage_dir, key, index, step=None)
    log.warning("sid: completed an interrupted update from the saved index (generation %d, %d items); "
                "nothing rebuilt", index.generation, len(index))
    return summary


def _record_update(stage_dir: Path, key: str, index: Any, step: dict[str, Any] | None) -> dict[str, Any]:
    """report.json and the stage record for ``index`` (the file already saved), then the marker goes."""
    report_path = stage_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if step is not None:
        report["updates"] = [*report.get("updates", []), step]
    report.update(items=len(index), index_levels=index.levels, generation=index.generation,
                  repair=index.repair_report())
    # the diagnostics describe the index as it is now (also when finishing an interrupted update)
    report["diagnostics"] = index_diagnostics(stage_dir.parent, index, int(report.get("codebook_size") or
                                                                           max(index.level_sizes)))
    if report["diagnostics"] is not None:
        plot_diagnostics(report["diagnostics"], stage_dir / "diagnostics.png")
    rundir.atomic_write_json(report_path, report)
    step = step or {}
    summary = {"items": len(index), "levels": index.levels, "generation": index.generation,
               "added": step.get("added", 0), "removed": step.get("removed", 0), "seconds": step.get("seconds", 0.0)}
    rundir.mark_done(stage_dir, key, summary, exclude=("ablation.*", UPDATE_MARKER))
    (stage_dir / UPDATE_MARKER).unlink(missing_ok=True)
    return summary


def _run_sid(run_dir: str | Path, config: SidConfig, key: str, progress: bool) -> dict[str, Any]:
    stage_dir = _stage_dirs(run_dir)[1]
    rq = config.rqvae
    timings: dict[str, float] = {}
    start = time.perf_counter()

    embeddings, texts = item_embeddings(run_dir, config, progress)
    timings["embed_s"] = time.perf_counter() - start

    sequences = train_sequences(load_sequences(run_dir)) if rq.contrastive_weight > 0 else None
    t = time.perf_counter()
    model, log = train_rqvae(embeddings, rq, sequences, progress)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    argmin_codes, codes, codebooks = assign_codes(model, embeddings, rq, config.assign_seed)
    timings["assign_s"] = time.perf_counter() - t

    t = time.perf_counter()
    item_ids = np.arange(len(texts), dtype=np.uint64)
    index = gr2.SidIndex.build(item_ids, codes, codebook_size=rq.codebook_size)
    stage_dir.mkdir(parents=True, exist_ok=True)
    index.save(str(stage_dir / "index.gr2sid"))  # atomic (temporary file, fsync, rename)
    _save_catalog_ids(stage_dir, _data_item_ids(run_dir))
    save_rqvae_file(stage_dir / "codebooks.safetensors", model, rq, config.assign_seed)
    timings["index_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    final_codes = index.sids(item_ids)
    t = time.perf_counter()
    diagnostics = sid_diagnostics(
        codes, final_codes, rq.codebook_size, embeddings=embeddings, popularity=item_popularity(run_dir, len(texts)),
        sample=config.diagnostics_sample, k=config.diagnostics_k, seed=config.diagnostics_seed,
        sequences=consumption_sequences(run_dir),
    )
    plot_diagnostics(diagnostics, stage_dir / "diagnostics.png")
    timings["diagnostics_s"] = time.perf_counter() - t
    report = {
        "items": len(texts),
        "levels": rq.levels,
        "index_levels": index.levels,
        "codebook_size": rq.codebook_size,
        "latent_dim": rq.latent_dim,
        "embedding_model": config.embed_model or default_model_path(),
        "embedding_dim": int(embeddings.shape[1]),
        "random_last_level": rq.random_last_level,
        "assign_seed": config.assign_seed,
        "uniqueness_before_repair": float(index.uniqueness_before_repair),
        "uniqueness_before_repair_check": uniqueness(codes),
        "uniqueness_argmin_all_levels": uniqueness(argmin_codes),
        "uniqueness_prefix": uniqueness(codes[:, :-1]) if rq.levels > 1 else None,
        "uniqueness_after_repair": uniqueness(final_codes),
        "items_with_duplicate_text": _duplicate_text_items(texts),
        "utilisation": utilisation(codes, rq.codebook_size),
        "utilisation_argmin": utilisation(argmin_codes, rq.codebook_size),
        "reconstruction": reconstruction_of(model, embeddings, codebooks, argmin_codes),
        "reconstruction_assigned": reconstruction_of(model, embeddings, codebooks, codes),
        "collision_groups": collision_groups(codes),
        "repair": index.repair_report(),
        "train": {"final_loss": log["loss"][-1], "final_reconstruction": log["reconstruction"][-1],
                  "dead_codes_reset": log["dead_codes_reset"], "epochs": rq.epochs},
        "diagnostics": diagnostics,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "config": config,
    }
    rundir.atomic_write_json(stage_dir / "report.json", report)
    summary = {k: report[k] for k in ("items", "levels", "codebook_size", "uniqueness_before_repair", "uniqueness_after_repair")}
    summary["seconds"] = report["timings"]["total_s"]
    rundir.mark_done(stage_dir, key, summary, exclude=("ablation.*",))  # `gr2 sid --ablation` writes those
    return summary


def load_rqvae(run_dir: str | Path) -> tuple[Any, RQVAEConfig, int, np.ndarray]:
    """(model, RQVAEConfig, assign_seed, codebooks) as the sid stage saved them in
    ``<run_dir>/sid/codebooks.safetensors``: enough to encode new items exactly as the stage did."""
    path = Path(run_dir) / "sid" / "codebooks.safetensors"
    if not path.exists():
        raise DataError(f"{path} does not exist; run the sid stage first (`gr2 sid --run-dir {run_dir}`)")
    return load_rqvae_file(path)


def encode_items(run_dir: str | Path, item_ids: np.ndarray, embeddings: np.ndarray, generation: int = 1) -> np.ndarray:
    """uint16 (m, L) codes of new items with the saved RQ-VAE, assigned as the stage assigns them
    (Rust argmin encoder, then the random last level when configured, drawn in ascending item id
    order by ``numpy.random.default_rng([assign_seed, generation])``).

    InvalidInputError for embeddings of the wrong shape/width or with a non-finite value (naming
    the first such row and its item id)."""
    model, rq, assign_seed, codebooks = load_rqvae(run_dir)
    item_ids = np.asarray(item_ids)
    embeddings = np.asarray(embeddings)
    width = int(model.input_mean.shape[0])
    if embeddings.ndim != 2 or embeddings.shape[0] != item_ids.shape[0]:
        raise InvalidInputError(f"embeddings must have shape ({item_ids.shape[0]}, {width}) (one row per item id), "
                                f"got {embeddings.shape}")
    if embeddings.shape[1] != width:
        raise InvalidInputError(f"embeddings have width {embeddings.shape[1]} (every row, from row 0), but the RQ-VAE "
                                f"of {run_dir} was trained on width {width}: embed the items with the same model")
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size:
        row = int(bad[0])
        raise InvalidInputError(f"embeddings row {row} (item id {item_ids[row]}) holds NaN or inf")
    codes = gr2.RQCodebooks(codebooks).encode(np.ascontiguousarray(encode_latent(model, embeddings), dtype=np.float32))
    if rq.random_last_level and len(codes):
        order = np.argsort(item_ids, kind="stable")
        rng = np.random.default_rng([assign_seed, generation])
        codes[order, -1] = rng.integers(0, rq.codebook_size, size=len(order), dtype=np.uint16)
    return codes


def update_index(run_dir: str | Path, config: SidConfig | None = None, item_ids: np.ndarray | None = None,
                 embeddings: np.ndarray | None = None, remove: np.ndarray | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Add items to the sid stage's index (and optionally remove some) without changing any other
    item's SID; replaces ``<run_dir>/sid/index.gr2sid`` atomically and records the step.

    By default the new items are those of ``data/items`` (item id = item_idx) that the index
    lacks, embedded with the stage's sentence encoder (``config.embed_model``, else the one in
    ``report.json``). ``item_ids`` + ``embeddings`` (float32 (m, D)) add given items instead;
    ``remove`` drops ids (before the new items are added; the default new items are counted
    before the removal, so removed items are not added straight back). Errors (an id already in the index, wrong width, NaN, no free SID
    without a new level) are gr2 errors naming the row; the old index file is then untouched.
    The stage record is rewritten for the current data and config, so ``gr2 run`` keeps the
    updated index (``--force`` rebuilds from scratch, and then SIDs change). An update killed part way
    leaves either index file (each save is atomic); the next run of the stage finishes its records
    from the file on disk instead of rebuilding."""
    config = config or SidConfig()
    data_dir, stage_dir = _stage_dirs(run_dir)
    key = rundir.stage_key(config, _data_key(data_dir), config.embed_model or default_model_path())
    index_path = stage_dir / "index.gr2sid"
    start = time.perf_counter()
    index = load_index(run_dir)
    catalog_ids = _data_item_ids(run_dir)
    _check_catalog_ids(stage_dir, index, catalog_ids)
    report_path = stage_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    embed_model = config.embed_model or report.get("embedding_model") or default_model_path()
    if item_ids is None:
        if embeddings is not None:
            raise InvalidInputError("embeddings given without item_ids")
        texts = list(load_items(run_dir)["text"])
        # missing before any removal: removed items are not added straight back
        item_ids = np.setdiff1d(np.arange(len(texts), dtype=np.uint64), index.item_ids(), assume_unique=True)
        embeddings = (embed_texts([texts[i] for i in item_ids], embed_model, _cache_dir(run_dir, config),
                                  config.embed_batch_size, config.embed_max_length, progress)
                      if len(item_ids) else None)
    elif embeddings is None:
        raise InvalidInputError("item_ids given without embeddings")
    item_ids = id_array(item_ids, "item_ids")  # -1 or 7000.7 are errors, not 2**64 - 1 or 7000
    if remove is not None:
        remove = id_array(remove, "remove")
    if remove is not None and len(remove):
        index = index.remove(remove)
    parent = rundir.hash_file(index_path)
    generation = index.generation + 1
    if len(item_ids):
        with _torch_threads(config.threads):
            codes = encode_items(run_dir, item_ids, embeddings, generation)
        index = index.extend(item_ids, codes)
    elif remove is None or not len(remove):
        return {"items": len(index), "added": 0, "removed": 0, "generation": index.generation}
    # Every check passed: replace the file (atomic), then the records. The marker makes a kill in
    # between finish the records at the next run instead of rebuilding the stage.
    record_path = stage_dir / rundir.STAGE_FILE
    record = record_path.read_bytes() if record_path.exists() else None
    with _typed_write_errors(f"the update marker {stage_dir / UPDATE_MARKER}"):
        rundir.atomic_write_json(stage_dir / UPDATE_MARKER, {"key": key, "parent_sha256": parent})
    record_path.unlink(missing_ok=True)
    try:
        index.save(str(index_path))
    except Exception:
        # the save is atomic and failed (a full disk): the old index is still there, so its record
        # is valid again (if this fails too, or on a kill, the marker makes the next run re-record
        # the index on disk)
        if record is not None:
            with contextlib.suppress(OSError):
                rundir.atomic_write_bytes(record_path, record)
                (stage_dir / UPDATE_MARKER).unlink(missing_ok=True)
        raise
    step = {"generation": index.generation, "parent_sha256": parent, "added": int(len(item_ids)),
            "removed": 0 if remove is None else int(len(remove)), "items": len(index),
            "seconds": round(time.perf_counter() - start, 2)}
    # The new index is in place; a failure from here on leaves the marker, and the next run of the
    # stage finishes these records from it.
    with _typed_write_errors(f"the records in {stage_dir} after the update (the new index is saved; the next "
                             "`gr2 sid` run finishes them)"):
        _save_catalog_ids(stage_dir, catalog_ids)
        return _record_update(stage_dir, key, index, step)


@contextlib.contextmanager
def _typed_write_errors(what: str):
    """An OSError (a full disk) while writing ``what`` as a Gr2IOError naming the file."""
    try:
        yield
    except gr2.Gr2Error:
        raise
    except OSError as e:
        raise gr2.Gr2IOError(f"cannot write {what}: {e}") from e


# The catalog's own item id of every item_idx the index was built or updated for. The index is
# keyed on item_idx, which the data stage assigns; an update checks the data still gives the same
# item_idx to the same catalog items, else every moved item would silently get another's SID.
CATALOG_IDS = "catalog_ids.parquet"


def _data_item_ids(run_dir: str | Path) -> np.ndarray:
    """data/items' catalog ids in item_idx order, as strings (ids may be ints or strings)."""
    return np.asarray([str(i) for i in load_items(run_dir)["item_id"]], dtype=object)


def _save_catalog_ids(stage_dir: Path, ids: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"item_id": pa.array(ids.tolist(), pa.string())}), buffer)
    rundir.atomic_write_bytes(stage_dir / CATALOG_IDS, buffer.getvalue().to_pybytes())


def _check_catalog_ids(stage_dir: Path, index: Any, current: np.ndarray) -> None:
    """DataError when an item the index holds now has another catalog id at its item_idx."""
    import pyarrow.parquet as pq

    path = stage_dir / CATALOG_IDS
    if not path.exists():  # an index built before this record existed: nothing to compare
        return
    recorded = np.asarray(pq.read_table(path).column("item_id").to_pylist(), dtype=object)
    held = index.item_ids()
    both = held[held < min(len(recorded), len(current))].astype(np.int64)
    moved = both[recorded[both] != current[both]]
    # catalog items the index holds that the data no longer reaches (ids outside the catalog, added
    # with explicit item_ids, are not the data's business)
    gone = int(((held >= len(current)) & (held < len(recorded))).sum())
    if moved.size or gone:
        first = int(moved[0]) if moved.size else None
        example = (f"item_idx {first} was catalog item {recorded[first]!r} and is now {current[first]!r}"
                   if first is not None else f"{gone} indexed item_idx values are past the data's {len(current)} items")
        raise DataError(f"the data stage gave {moved.size + gone} indexed items another item_idx since the SID index "
                        f"was built ({example}); an update would move their SIDs. Rerun the data stage on the "
                        "catalog the index was built from, or rebuild the SIDs (gr2 sid --force)")


def load_index(run_dir: str | Path):
    """The SID index the sid stage wrote (``<run_dir>/sid/index.gr2sid``)."""
    path = Path(run_dir) / "sid" / "index.gr2sid"
    if not path.exists():
        raise DataError(f"{path} does not exist; run the sid stage first (`gr2 sid --run-dir {run_dir}`)")
    return gr2.SidIndex.load(str(path))


# ----------------------------------------------------------------------------------------------
# ablation


def ablation_variants(config: SidConfig) -> list[tuple[str, dict[str, Any]]]:
    """(row name, RQVAEConfig overrides). ``base`` is k-means init with gradient-trained
    codebooks, argmin at every level. The random last level changes assignment only, so each
    "+random last level" row reuses the model of the row without it."""
    diversity = config.rqvae.diversity_weight or config.ablation_diversity_weight
    contrastive = config.rqvae.contrastive_weight or config.ablation_contrastive_weight
    plain = dict(ema=False, random_last_level=False, diversity_weight=0.0, dead_code_reset=False, contrastive_weight=0.0)
    ema_rll = dict(plain, ema=True, random_last_level=True)
    return [
        ("base", plain),
        ("+EMA", dict(plain, ema=True)),
        ("+random last level", dict(plain, random_last_level=True)),
        ("+EMA +random last level", ema_rll),
        ("+EMA +RLL +diversity loss", dict(ema_rll, diversity_weight=diversity)),
        ("+EMA +RLL +dead-code reset", dict(ema_rll, dead_code_reset=True)),
        ("+EMA +RLL +contrastive", dict(ema_rll, contrastive_weight=contrastive)),
        ("base, unstandardised inputs", dict(plain, standardize_inputs=False)),
        ("+EMA, unstandardised inputs", dict(plain, ema=True, standardize_inputs=False)),
    ]


def run_ablation(run_dir: str | Path, config: SidConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Uniqueness before repair (and reconstruction error) per technique; ablation.json/.md."""
    config = config or SidConfig()
    _data_key(_stage_dirs(run_dir)[0])
    with _torch_threads(config.threads):
        return _run_ablation(run_dir, config, progress)


def _run_ablation(run_dir: str | Path, config: SidConfig, progress: bool) -> dict[str, Any]:
    embeddings, texts = item_embeddings(run_dir, config, progress)
    sequences = train_sequences(load_sequences(run_dir))
    trained: dict[str, tuple] = {}  # training config (sans random_last_level) -> model
    rows = []
    for name, overrides in ablation_variants(config):
        per_seed = []
        for seed in config.ablation_seeds:
            rq = dataclasses.replace(config.rqvae, **overrides, seed=seed)
            train_key = json.dumps(dataclasses.asdict(dataclasses.replace(rq, random_last_level=False)), sort_keys=True)
            t = time.perf_counter()
            if train_key not in trained:
                trained[train_key] = train_rqvae(embeddings, rq, sequences, progress=False)[0]
            model = trained[train_key]
            train_s = time.perf_counter() - t
            argmin_codes, codes, codebooks = assign_codes(model, embeddings, rq, config.assign_seed + seed)
            per_seed.append({
                "seed": seed,
                "uniqueness_before_repair": uniqueness(codes),
                "uniqueness_argmin": uniqueness(argmin_codes),
                "uniqueness_prefix": uniqueness(codes[:, :-1]) if rq.levels > 1 else None,
                "reconstruction_relative": reconstruction_of(model, embeddings, codebooks, codes)["relative"],
                "reconstruction_relative_argmin": reconstruction_of(model, embeddings, codebooks, argmin_codes)["relative"],
                "utilisation": utilisation(codes, rq.codebook_size),
                "collision_groups": collision_groups(codes),
                "train_s": round(train_s, 1),
            })
        row = {"name": name, "overrides": overrides, "seeds": per_seed}
        for metric in ("uniqueness_before_repair", "uniqueness_prefix", "reconstruction_relative", "reconstruction_relative_argmin"):
            values = np.array([s[metric] if s[metric] is not None else np.nan for s in per_seed], dtype=float)
            row[metric] = float(values.mean())
            row[metric + "_std"] = float(values.std())
        rows.append(row)
        if progress:
            log.info("  %-32s uniqueness %.2f%%  recon %.3f", name, 100 * row["uniqueness_before_repair"],
                     row["reconstruction_relative"])
    result = {
        "items": len(texts),
        "items_with_duplicate_text": _duplicate_text_items(texts),
        "levels": config.rqvae.levels,
        "codebook_size": config.rqvae.codebook_size,
        "seeds": config.ablation_seeds,
        "rows": rows,
        "config": config,
    }
    stage_dir = _stage_dirs(run_dir)[1]
    rundir.atomic_write_json(stage_dir / "ablation.json", result)
    rundir.atomic_write_text(stage_dir / "ablation.md", ablation_markdown(result))
    return result


def ablation_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# SID uniqueness ablation: {result['levels']} x {result['codebook_size']}, "
        f"{result['items']} items, seeds {result['seeds']}",
        "",
        "Uniqueness = share of items whose SID no other item has, before index repair. Reconstruction "
        "= decoder MSE on the assigned codes relative to the embeddings' variance (1.0 = no better "
        "than the mean); argmin = all levels by nearest codeword. Rows marked RLL share the trained "
        "model of the row without it (the random last level changes assignment only).",
        "",
        "| variant | uniqueness before repair | first L-1 levels unique | recon (assigned) | recon (argmin) | largest collision group |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        groups = [int(k) for s in row["seeds"] for k in s["collision_groups"]]
        std = f" ± {row['uniqueness_before_repair_std']:.2%}" if len(row["seeds"]) > 1 else ""
        lines.append(
            f"| {row['name']} | {row['uniqueness_before_repair']:.2%}{std} | {row['uniqueness_prefix']:.2%} "
            f"| {row['reconstruction_relative']:.3f} "
            f"| {row['reconstruction_relative_argmin']:.3f} | {max(groups) if groups else 1} |"
        )
    lines += [
        "",
        f"{result['items_with_duplicate_text']} items share their exact text with another item; their "
        "embeddings are identical, so argmin assignment can never separate them; only the random "
        "last level (or the index repair) can.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI


def config_from_file(path: str | None) -> SidConfig:
    if path is None:
        return SidConfig()
    return from_dict(SidConfig, load_toml(path).get("sid", {}), where="sid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gr2 sid``'s own flags (the common ones come from gr2.pipeline.registry)."""
    parser.add_argument("--levels", type=int, help="RQ levels L (default 4)")
    parser.add_argument("--codebook-size", type=int, help="codes per level K (default 256)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--embed-model", help="sentence encoder folder (default: offline all-MiniLM-L6-v2)")
    parser.add_argument("--cache-dir", help="embedding cache (default RUN_DIR/../.cache/embeddings)")
    parser.add_argument("--ablation", action="store_true", help="write sid/ablation.{json,md} instead of the index")
    parser.add_argument("--update", action="store_true",
                        help="add the items of data/items that the index lacks, keeping every existing SID")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {"rqvae.levels": args.levels, "rqvae.codebook_size": args.codebook_size, "rqvae.epochs": args.epochs,
              "embed_model": args.embed_model, "cache_dir": args.cache_dir}
    return {k: v for k, v in values.items() if v is not None}


def main(args: argparse.Namespace, config: SidConfig) -> int:
    if args.ablation:
        result = run_ablation(args.run_dir, config, progress=not args.quiet)
        print(ablation_markdown(result))
        return 0
    if args.update:
        summary = update_index(args.run_dir, config, progress=not args.quiet)
        print(f"sid --update: {summary['added']} items added, {summary['items']} in the index "
              f"(generation {summary['generation']}); existing SIDs unchanged")
        return 0
    summary = run_sid(args.run_dir, config, force=args.force, progress=not args.quiet)
    print(
        f"sid: {summary['items']} items, {summary['levels']} x {summary['codebook_size']}; unique before repair "
        f"{summary['uniqueness_before_repair']:.2%}, after {summary['uniqueness_after_repair']:.2%} "
        f"({summary['seconds']:.0f} s)"
    )
    return 0
