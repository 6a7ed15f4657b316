"""Run probes over the layers of feature stores and collect one result row per fit."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from classify.metrics import mean_per_class_accuracy, top1
from classify.probe import DEFAULT_CS, LinearProbe
from extract.store import FeatureStore, canonical_json

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "dataset", "features", "layer", "layer_depth", "classifier", "protocol", "train_split", "test_split",
    "normalization", "C", "converged", "cv_folds", "seed", "n_train", "n_test", "n_features",
    "top1", "mean_per_class_acc", "fit_seconds", "store_fingerprint", "created",
]
RESULT_KEY = ["dataset", "features", "layer", "classifier", "protocol", "normalization"]


def choose_splits(splits, train_split: str = "train", test_split: str | None = None) -> tuple[str, str]:
    """The training split, and the test split: ``test`` if present, else ``val``."""
    present = sorted(set(splits))
    if train_split not in present:
        raise ValueError(f"no {train_split!r} split in the store; its splits are {present}")
    if test_split is None:
        test_split = next((s for s in ("test", "val", "validation") if s in present), None)
        if test_split is None:
            raise ValueError(f"no test split in the store (looked for test, val); its splits are {present}; pass --test-split")
    elif test_split not in present:
        raise ValueError(f"no {test_split!r} split in the store; its splits are {present}")
    return train_split, test_split


def store_fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:12]


def probe_store(
    path: str | Path,
    *,
    classifiers=("logreg",),
    layers=None,
    Cs=DEFAULT_CS,
    cv: int = 3,
    normalization: str = "standard",
    seed: int = 0,
    train_split: str = "train",
    test_split: str | None = None,
    progress: bool = True,
    fitted: dict | None = None,
) -> list[dict]:
    """Fit one probe per (layer, classifier) of the store at ``path`` on its training split.

    Only training rows are read before the probe is fitted. ``fitted``, when given, receives
    each fitted probe under its (layer, classifier) key.
    """
    rows = []
    with FeatureStore(path) as store:
        splits = store.splits
        train, test = choose_splits(splits, train_split, test_split)
        labels = store.labels
        train_mask, test_mask = splits == train, splits == test
        taps = store.taps if layers is None else [t for t in store.taps if t in set(layers)]
        if layers is not None and not taps:
            raise ValueError(f"{path}: none of the layers {list(layers)} are in the store ({store.taps})")
        fingerprint_id = store_fingerprint_id(store.fingerprint)
        jobs = [(tap, clf) for tap in taps for clf in classifiers]
        for tap, classifier in tqdm(jobs, desc=f"probe {store.extractor}", disable=not progress):
            probe = LinearProbe(classifier, Cs=Cs, cv=cv, normalization=normalization, seed=seed)
            probe.fit(store.features(tap, train_mask), labels[train_mask])
            X_test = store.features(tap, test_mask)
            predicted = probe.predict(X_test)
            if fitted is not None:
                fitted[(tap, classifier)] = probe
            if not probe.converged_:
                log.warning("%s/%s %s: the solver did not converge at C=%g", store.extractor, tap, classifier, probe.best_C_)
            rows.append({
                "dataset": store.dataset,
                "features": store.extractor,
                "layer": tap,
                "layer_depth": store.taps.index(tap),
                "classifier": classifier,
                "protocol": "given",
                "train_split": train,
                "test_split": test,
                "normalization": normalization,
                "C": probe.best_C_,
                "converged": bool(probe.converged_),
                "cv_folds": probe.cv_folds_,
                "seed": seed,
                "n_train": int(train_mask.sum()),
                "n_test": int(test_mask.sum()),
                "n_features": X_test.shape[1],
                "top1": top1(labels[test_mask], predicted),
                "mean_per_class_acc": mean_per_class_accuracy(labels[test_mask], predicted),
                "fit_seconds": round(probe.fit_seconds_, 3),
                "store_fingerprint": fingerprint_id,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
    return rows


def update_results(csv_path: str | Path, rows: list[dict]) -> pd.DataFrame:
    """Merge ``rows`` into ``results.csv``: a rerun replaces the rows with the same key."""
    csv_path = Path(csv_path)
    new = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if csv_path.is_file():
        old = pd.read_csv(csv_path)
        keys = set(map(tuple, new[RESULT_KEY].astype(str).to_numpy()))
        old = old[[tuple(k) not in keys for k in old[RESULT_KEY].astype(str).to_numpy()]]
        new = pd.concat([old, new], ignore_index=True) if len(old) else new
    new = new.sort_values(["features", "layer_depth", "classifier", "protocol"], kind="stable")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_suffix(".csv.tmp")
    new.to_csv(tmp, index=False)
    tmp.replace(csv_path)
    return new


def store_paths(features_dir: str | Path, dataset: str, features=None) -> list[Path]:
    folder = Path(features_dir) / dataset
    paths = sorted(folder.glob("*.h5"))
    if features is not None:
        wanted = set(features)
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise FileNotFoundError(f"no store for {sorted(missing)} in {folder}")
    if not paths:
        raise FileNotFoundError(f"no feature stores in {folder}; run `make extract` and `make baselines` first")
    return paths
