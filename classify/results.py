"""``results.csv`` and ``layers.csv``: one row per experiment, merged under a lock, never torn.

Every row of ``results.csv`` is keyed by what determined it (``RESULT_KEY``: the store's
fingerprint, layer, classifier, protocol, normalisation, C search and criterion, C grid,
seed, repeats),
so a rerun with the same settings finds its rows (``cached``) and a store rebuilt with other
settings replaces its rows. Several commands may update the same file at once (two
``make classify`` of different stores, ``make tsne`` beside them): each read-merge-write
holds an exclusive ``flock`` on ``<file>.lock`` and publishes through a uniquely named
temporary file, fsync'ed and renamed, so no row is lost and no reader sees half a file.

Model selection reads ``cv_score`` only: the cross-validation (or validation-split) score
of a row's chosen C, computed on training rows. ``select_best`` is the one place that
picks "the best" of a set of rows; the test metric never takes part in it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from classify import fusion

RESULT_COLUMNS = [
    "dataset", "features", "kind", "views", "recipe", "layer", "layer_depth", "classifier", "protocol", "train_split", "test_split",
    "normalization", "search", "select_by", "Cs", "selection", "C", "cv_score", "converged", "cv_splits", "seed", "repeats",
    "n_train", "n_test", "n_features", "classes_unseen_in_train",
    "top1", "top1_std", "mean_per_class_acc", "mean_per_class_acc_std", "mAP", "mAP_voc07", "images_without_features", "fit_seconds",
    "store_fingerprint", "created",
]
# What determines a row's numbers; a row with the same key is the same experiment.
RESULT_KEY = ["dataset", "features", "store_fingerprint", "layer", "classifier", "protocol", "normalization", "search", "select_by", "Cs", "seed", "repeats"]
SORT_ORDER = ["features", "layer_depth", "layer", "classifier", "normalization", "protocol"]
# The settings besides layer, classifier and protocol that tell two rows of one store apart.
SETTING_COLUMNS = ["normalization", "search", "select_by", "Cs", "seed", "repeats"]
PROBE_KINDS = ("cnn", "baseline")  # rows of linear probes on a store; other kinds are trained models


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``<path>.lock`` for a read-merge-write of ``path`` (released on exit or death)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(frame: pd.DataFrame, path: Path, **to_csv) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", newline="") as handle:
            frame.to_csv(handle, index=False, **to_csv)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def update_csv(path: str | Path, merge: Callable[[pd.DataFrame | None], pd.DataFrame], **to_csv) -> pd.DataFrame:
    """Under the file's lock: read it (None when absent), ``merge`` it, write the result atomically."""
    path = Path(path)
    with locked(path):
        # Under the lock no other writer has a temporary file open: any left is from a killed one.
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        merged = merge(pd.read_csv(path) if path.is_file() else None)
        write_atomically(merged, path, **to_csv)
    return merged


def row_keys(frame: pd.DataFrame, key=RESULT_KEY) -> list[tuple]:
    """Each row's values of the ``key`` columns, as strings (so 5 and 5.0 read back from a CSV agree)."""
    return list(map(tuple, frame.reindex(columns=key).astype(str).to_numpy()))


def merge_rows(old: pd.DataFrame | None, new: pd.DataFrame, *, key, sort_by, drop=None) -> pd.DataFrame:
    """``old`` rows without those whose key is in ``new`` (nor those ``drop`` marks), then ``new``, sorted."""
    if old is not None and len(old):
        old = old.reindex(columns=new.columns)
        keys = set(row_keys(new, key))
        keep = np.asarray([k not in keys for k in row_keys(old, key)], bool)
        if drop is not None:
            keep &= ~drop(old)
        new = pd.concat([old[keep], new], ignore_index=True) if keep.any() else new
    return new.sort_values(sort_by, kind="stable")


def output_stem(row) -> str:
    """The file name (without suffix) of a row's predictions and saved probe, one per result key:
    ``<layer>__<classifier>__<protocol>__<id of the other settings>``."""
    values = ["" if pd.isna(row.get(c)) else str(row.get(c)) for c in SETTING_COLUMNS]  # as results.csv reads back
    settings = hashlib.sha256("|".join(values).encode()).hexdigest()[:8]
    name = f"{row['layer']}__{row['classifier']}__{row['protocol']}"
    return f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', name)}__{settings}"


def read_results(csv_path: str | Path) -> pd.DataFrame | None:
    csv_path = Path(csv_path)
    return pd.read_csv(csv_path).reindex(columns=RESULT_COLUMNS) if csv_path.is_file() else None


def update_results(csv_path: str | Path, rows: list[dict]) -> pd.DataFrame:
    """Merge ``rows`` into ``results.csv``. A row replaces the one with the same key, and the
    rows of a store made with other settings (same features name, other fingerprint) go."""
    new = pd.DataFrame(rows, columns=RESULT_COLUMNS)

    probes = new[new["kind"].isin(PROBE_KINDS)]
    current = probes.groupby(["dataset", "features"])["store_fingerprint"].agg(lambda s: set(s.astype(str))).to_dict()

    def rebuilt(old: pd.DataFrame) -> np.ndarray:  # probe rows of a store whose fingerprint is not the current one
        return np.asarray([kind in PROBE_KINDS and (d, f) in current and str(fp) not in current[(d, f)]
                           for kind, d, f, fp in old[["kind", "dataset", "features", "store_fingerprint"]].itertuples(index=False)], bool)

    return update_csv(csv_path, lambda old: merge_rows(old, new, key=RESULT_KEY, sort_by=SORT_ORDER, drop=rebuilt))


def cached_rows(results: pd.DataFrame | None, expected: list[dict]) -> list[dict] | None:
    """The stored rows for every key in ``expected`` (partial rows holding the key columns), or None
    if any is missing."""
    if results is None or results.empty:
        return None
    index = {key: i for i, key in enumerate(row_keys(results))}
    found = [index.get(key) for key in row_keys(pd.DataFrame(expected, columns=RESULT_KEY))]
    if any(i is None for i in found):
        return None
    return [row.to_dict() for _, row in results.iloc[found].iterrows()]


def select_best(rows: pd.DataFrame) -> pd.Series | None:
    """The row with the highest ``cv_score`` (training data only); ties go to the first in
    features, layer and classifier order. Rows without a selection score are never chosen."""
    scored = rows[pd.to_numeric(rows["cv_score"], errors="coerce").notna()]
    if scored.empty:
        return None
    ordered = scored.sort_values(["cv_score", "features", "layer_depth", "classifier"], ascending=[False, True, True, True], kind="stable")
    return ordered.iloc[0]


def best_per(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``select_best`` within each group of ``by``."""
    chosen = [select_best(group) for _, group in rows.groupby(by, sort=False)]
    return pd.DataFrame([row for row in chosen if row is not None])


def live_rows(results: pd.DataFrame, stores: dict[str, dict] | None) -> pd.DataFrame:
    """Rows of probes whose store still exists with the same fingerprint and layer (every tap of a fused
    layer); trained models' rows (no store) are kept. ``stores``: extractor -> {"fingerprint_id", "taps"}; None keeps all."""
    if stores is None:
        return results
    probe = results["kind"].isin(PROBE_KINDS)
    alive = [
        not is_probe or (features in stores and str(fingerprint) == stores[features]["fingerprint_id"]
                         and set(fusion.parts(str(layer))) <= set(stores[features]["taps"]))
        for is_probe, features, fingerprint, layer in zip(probe, results["features"], results["store_fingerprint"], results["layer"])
    ]
    return results[np.asarray(alive, bool)]
