"""Evaluation protocols over feature stores, one ``results.csv`` row per (layer, classifier, protocol).

Protocols (the ``protocol`` column):

* ``given``: train on the ``train`` split, test on ``test`` (else ``val``);
* ``fewshot:1,2,5,10,20``: k training images per class, drawn with seeds ``seed .. seed+repeats-1``,
  reported as mean and std over the repeats (one row per k, protocol ``5-shot``);
* ``transfer:SOURCE->TARGET``: train on one split or domain, test on another;
* ``cross:DATASET``: train on this store, test on the store of the same extractor for
  another dataset (its test split, else all of it); classes are matched by name.

Multi-label stores (``/index/multilabel``, VOC 2007) get one binary probe per class, each
with its own C, and are scored by mean average precision (``mAP``: area under the
precision-recall envelope; ``mAP_voc07``: the 11-point VOC 2007 measure); difficult
labels take no part in training or scoring.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from classify.metrics import mean_average_precision, mean_per_class_accuracy, top1
from classify.persist import save_probe
from classify.probe import CLASSIFIERS, DEFAULT_CS, LinearProbe, StreamingSGDProbe
from extract.store import FeatureStore, StoreMismatchError, canonical_json, fingerprint_differences

log = logging.getLogger(__name__)

ALL_CLASSIFIERS = (*CLASSIFIERS, "sgd")
RESULT_COLUMNS = [
    "dataset", "features", "kind", "layer", "layer_depth", "classifier", "protocol", "train_split", "test_split",
    "normalization", "search", "C", "converged", "cv_splits", "seed", "repeats", "n_train", "n_test", "n_features",
    "top1", "top1_std", "mean_per_class_acc", "mean_per_class_acc_std", "mAP", "mAP_voc07", "images_without_features", "fit_seconds",
    "store_fingerprint", "created",
]
RESULT_KEY = ["dataset", "features", "layer", "classifier", "protocol", "normalization"]
DEFAULT_SHOTS = (1, 2, 5, 10, 20)


@dataclass(frozen=True)
class ProbeSettings:
    classifiers: tuple[str, ...] = ("logreg",)
    Cs: tuple[float, ...] = DEFAULT_CS
    search: str = "cv"
    cv: int = 3
    normalization: str = "standard"
    seed: int = 0
    repeats: int = 5
    n_jobs: int | None = None

    def __post_init__(self):
        unknown = [c for c in self.classifiers if c not in ALL_CLASSIFIERS]
        if unknown:
            raise ValueError(f"classifiers {unknown} are not among {ALL_CLASSIFIERS}")


@dataclass(frozen=True)
class Protocol:
    name: str
    train_split: str = "train"
    test_split: str | None = None
    shots: tuple[int, ...] = ()
    other_dataset: str | None = None


def parse_protocol(text: str) -> Protocol:
    if text == "given":
        return Protocol("given")
    if text.startswith("fewshot"):
        shots = tuple(int(k) for k in text.partition(":")[2].split(",") if k) or DEFAULT_SHOTS
        if min(shots) < 1:
            raise ValueError(f"shots per class must be positive. Received: {text!r}")
        return Protocol("fewshot", shots=shots)
    match = re.fullmatch(r"transfer:([^>]+)->(.+)", text)
    if match:
        return Protocol(text, train_split=match.group(1), test_split=match.group(2))
    if text.startswith("cross:") and len(text) > len("cross:"):
        return Protocol(text, other_dataset=text.removeprefix("cross:"))
    raise ValueError(f"protocol {text!r} is not one of: given, fewshot[:K,K,...], transfer:SOURCE->TARGET, cross:DATASET")


def choose_splits(splits, train_split: str = "train", test_split: str | None = None) -> tuple[str, str]:
    """The training split, and the test split: ``test`` if present, else ``val``."""
    present = sorted(set(splits))
    if train_split not in present:
        raise ValueError(f"no {train_split!r} split; the splits are {present}")
    if test_split is None:
        test_split = next((s for s in ("test", "val", "validation") if s in present), None)
        if test_split is None:
            raise ValueError(f"no test split (looked for test, val); the splits are {present}")
    elif test_split not in present:
        raise ValueError(f"no {test_split!r} split; the splits are {present}")
    return train_split, test_split


def store_fingerprint_id(fingerprint: dict) -> str:
    return hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:12]


def few_shot_rows(labels: np.ndarray, candidates: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows per class from ``candidates`` (all of a class when it has fewer), seeded."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(candidates[labels[candidates] == c])[:shots] for c in np.unique(labels[candidates])]
    return np.sort(np.concatenate(chosen))


def _fit(settings: ProbeSettings, classifier: str, store, tap, rows, labels, seed):
    if classifier == "sgd":
        return StreamingSGDProbe(Cs=settings.Cs, seed=seed).fit_store(store, tap, rows, labels)
    probe = LinearProbe(classifier, Cs=settings.Cs, search=settings.search, cv=settings.cv,
                        normalization=settings.normalization, seed=seed, n_jobs=settings.n_jobs)
    return probe.fit(store.features(tap, rows), labels[rows])


def _predict(probe, store, tap, rows) -> np.ndarray:
    return np.concatenate([probe.predict(X) for _, X in store.iter_chunks(tap, rows)]) if len(rows) else np.zeros(0, int)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


class Evaluation:
    """Runs one protocol on one store; rows go to ``rows``, predictions and probes under ``out_dir``."""

    def __init__(self, path, protocol: Protocol, settings: ProbeSettings, *, out_dir: Path | None = None,
                 features_dir: Path | None = None, save_probes: bool = False, fitted: dict | None = None):
        self.path, self.protocol, self.settings = Path(path), protocol, settings
        self.out_dir, self.features_dir = out_dir, features_dir
        self.save_probes, self.fitted = save_probes, fitted

    def run(self, layers=None, progress: bool = True) -> list[dict]:
        with FeatureStore(self.path) as store:
            taps = store.taps if layers is None else [t for t in store.taps if t in set(layers)]
            jobs = [(tap, clf) for tap in taps for clf in self.settings.classifiers]
            self._store_columns = self._columns_of(store)
            rows = []
            for tap, classifier in tqdm(jobs, desc=f"{self.protocol.name} {store.extractor}", disable=not progress):
                if store.multilabel is not None:
                    rows.append(self._multilabel(store, tap, classifier))
                elif self.protocol.name == "fewshot":
                    rows += self._few_shot(store, tap, classifier)
                else:
                    rows.append(self._single(store, tap, classifier))
        return rows

    @staticmethod
    def _columns_of(store) -> dict:
        """The result columns that depend on the store only, read once per run."""
        fingerprint = store.fingerprint
        return {
            "dataset": store.dataset, "features": store.extractor,
            "kind": store.kind,
            "store_fingerprint": store_fingerprint_id(fingerprint),
            # images whose local descriptors came out empty (all-zero features), e.g. blank ones
            "images_without_features": int(np.sum(store.stat("n_descriptors") == 0)) if "n_descriptors" in store.stats else 0,
        }

    def _base_row(self, store, tap, classifier) -> dict:
        return {
            **self._store_columns, "layer": tap, "layer_depth": store.taps.index(tap),
            "classifier": classifier, "normalization": self.settings.normalization if classifier != "sgd" else "standard",
            "search": self.settings.search if classifier != "sgd" else "val", "seed": self.settings.seed,
            "n_features": store.dim(tap), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _single(self, store, tap, classifier) -> dict:
        """Fit on the training split; test on this store's test split, or on another dataset's store.
        Metrics compare class names, which is what matches across stores."""
        labels, splits = store.labels, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, None if self.protocol.other_dataset else self.protocol.test_split)
        train_rows = np.flatnonzero(splits == train)
        probe = _fit(self.settings, classifier, store, tap, train_rows, labels, self.settings.seed)
        if self.protocol.other_dataset:
            test_store, test_rows, test_split = self._cross_target(store)
        else:  # this store stays open for the caller
            test_store, test_rows = contextlib.nullcontext(store), np.flatnonzero(splits == test_split)
        with test_store as target:
            predicted = _predict(probe, target, tap, test_rows)
            paths = target.paths[test_rows]
            true_names = np.asarray([target.classes[i] for i in target.labels[test_rows]])
        predicted_names = np.asarray([store.classes[i] for i in predicted])
        if not probe.converged_:
            log.warning("%s/%s %s: the solver did not converge at C=%g", store.extractor, tap, classifier, probe.best_C_)
        if self.fitted is not None:
            self.fitted[(tap, classifier)] = probe
        if self.out_dir is not None:
            name = f"{tap}__{classifier}__{_slug(self.protocol.name)}"
            predictions = self.out_dir / "predictions" / store.extractor / f"{name}.csv"
            predictions.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"path": paths, "label": true_names, "predicted": predicted_names}).to_csv(predictions, index=False)
            if self.save_probes:
                save_probe(self.out_dir / "probes" / store.extractor / f"{tap}__{classifier}.npz", probe,
                           class_names=store.classes, layer=tap, features=store.extractor, fingerprint=store.fingerprint)
        return {
            **self._base_row(store, tap, classifier), "protocol": self.protocol.name, "train_split": train,
            "test_split": test_split, "C": probe.best_C_, "converged": bool(probe.converged_), "cv_splits": probe.n_splits_,
            "repeats": 1, "n_train": len(train_rows), "n_test": len(test_rows),
            "top1": top1(true_names, predicted_names), "top1_std": 0.0,
            "mean_per_class_acc": mean_per_class_accuracy(true_names, predicted_names), "mean_per_class_acc_std": 0.0,
            "fit_seconds": round(probe.fit_seconds_, 3),
        }

    def _multilabel(self, store, tap, classifier) -> dict:
        if self.protocol.name == "fewshot" or self.protocol.other_dataset:
            raise ValueError(f"{store.path} is multi-label: use protocol given or transfer:A->B, not {self.protocol.name}")
        targets, splits = store.multilabel, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, self.protocol.test_split)
        train_rows, test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test_split)
        X_test = store.features(tap, test_rows)
        scores = np.zeros((len(test_rows), targets.shape[1]))
        chosen_C, converged, seconds = [], [], 0.0
        for c in range(targets.shape[1]):
            rows = train_rows[targets[train_rows, c] >= 0]
            if len(np.unique(targets[rows, c])) < 2:
                raise ValueError(f"{store.path}: class {store.classes[c]!r} has no positive or no negative training image in {train!r}")
            probe = _fit(self.settings, classifier, store, tap, rows, targets[:, c], self.settings.seed)
            scores[:, c] = probe.decision_function(X_test).ravel()
            chosen_C.append(probe.best_C_)
            converged.append(probe.converged_)
            seconds += probe.fit_seconds_
        truth = targets[test_rows]
        if self.out_dir is not None:
            name = f"{tap}__{classifier}__{_slug(self.protocol.name)}"
            scores_csv = self.out_dir / "predictions" / store.extractor / f"{name}.scores.csv"
            scores_csv.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(scores, columns=store.classes).assign(path=store.paths[test_rows]).to_csv(scores_csv, index=False)
        return {
            **self._base_row(store, tap, classifier), "protocol": self.protocol.name, "train_split": train,
            "test_split": test_split, "C": float(np.median(chosen_C)), "converged": all(converged),
            "cv_splits": probe.n_splits_, "repeats": 1, "n_train": len(train_rows), "n_test": len(test_rows),
            "top1": np.nan, "top1_std": 0.0, "mean_per_class_acc": np.nan, "mean_per_class_acc_std": 0.0,
            "mAP": mean_average_precision(truth, scores), "mAP_voc07": mean_average_precision(truth, scores, eleven_point=True),
            "fit_seconds": round(seconds, 3),
        }

    def _cross_target(self, store):
        """The other dataset's store of the same extractor (open), its test rows, and the split's label."""
        other = Path(self.features_dir or store.path.parent.parent) / self.protocol.other_dataset / store.path.name
        target = FeatureStore(other)
        try:
            differences = fingerprint_differences(store.fingerprint, target.fingerprint)
            if differences:
                raise StoreMismatchError(f"{other} was made with other settings than {store.path}:\n  " + "\n  ".join(differences))
            unknown = sorted(set(target.classes) - set(store.classes))
            if unknown:
                raise ValueError(f"{other} has classes the probe never saw: {unknown[:10]}")
            splits = target.splits
            test_split = "test" if "test" in set(splits) else "all"
            rows = np.flatnonzero(splits == "test") if test_split == "test" else np.arange(len(target))
        except Exception:
            target.close()
            raise
        return target, rows, f"{self.protocol.other_dataset}:{test_split}"

    def _few_shot(self, store, tap, classifier) -> list[dict]:
        labels, splits = store.labels, store.splits
        train, test_split = choose_splits(splits)
        candidates, test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test_split)
        rows = []
        for shots in self.protocol.shots:
            scores, balanced, seconds, chosen_C, converged = [], [], [], [], []
            for repeat in range(self.settings.repeats):
                seed = self.settings.seed + repeat
                train_rows = few_shot_rows(labels, candidates, shots, seed)
                probe = _fit(self.settings, classifier, store, tap, train_rows, labels, seed)
                predicted = _predict(probe, store, tap, test_rows)
                scores.append(top1(labels[test_rows], predicted))
                balanced.append(mean_per_class_accuracy(labels[test_rows], predicted))
                seconds.append(probe.fit_seconds_)
                chosen_C.append(probe.best_C_)
                converged.append(probe.converged_)
            rows.append({
                **self._base_row(store, tap, classifier), "protocol": f"{shots}-shot", "train_split": train,
                "test_split": test_split, "C": float(np.median(chosen_C)), "converged": all(converged),
                "cv_splits": probe.n_splits_, "repeats": self.settings.repeats, "n_train": len(train_rows),
                "n_test": len(test_rows), "top1": float(np.mean(scores)), "top1_std": float(np.std(scores)),
                "mean_per_class_acc": float(np.mean(balanced)), "mean_per_class_acc_std": float(np.std(balanced)),
                "fit_seconds": round(float(np.mean(seconds)), 3),
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
        old = old.reindex(columns=RESULT_COLUMNS)
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
