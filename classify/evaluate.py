"""Evaluation protocols over feature stores, one ``results.csv`` row per (layer, classifier, protocol).

Protocols (the ``protocol`` column):

* ``given``: train on the ``train`` split, test on ``test`` (else ``val``);
* ``fewshot:1,2,5,10,20``: k training images per class, drawn with seeds ``seed .. seed+repeats-1``,
  reported as mean and std over the repeats (one row per k, protocol ``5-shot``);
* ``transfer:SOURCE->TARGET``: train on one split or domain, test on another;
* ``sampled:SOURCE->TARGET``: the Office protocol of Saenko et al. (2010) that DeCAF reports:
  20 images per class of the source domain when it is amazon (or caltech), else 8, drawn with
  seeds ``seed .. seed+repeats-1``; tested on the whole target domain; mean and std;
* ``cross:DATASET``: train on this store, test on the store of the same extractor for
  another dataset (its test split, else all of it); classes are matched by name.

Multi-label stores (``/index/multilabel``, VOC 2007) get one binary probe per class, each
with its own C, and are scored by mean average precision (``mAP``: area under the
precision-recall envelope; ``mAP_voc07``: the 11-point VOC 2007 measure); difficult
labels take no part in training or scoring; C is chosen per class by cross-validated average precision.

Every row records ``cv_score``, the mean validation score at the chosen C (training rows
only), which is what the report ranks by; and ``selection``, what chose C. A row whose key
(``classify.results.RESULT_KEY``) is already in ``results.csv`` is not fitted again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import accuracy_score
from tqdm.auto import tqdm

from classify.metrics import mean_average_precision, mean_per_class_accuracy
from classify.persist import save_probe
from classify.probe import CLASSIFIERS, DEFAULT_CS, LinearProbe, StreamingSGDProbe, worker_processes
from classify.results import cached_rows
from extract.datasets.base import choose_splits
from extract.errors import UserError
from extract.store import FeatureStore, StoreMismatchError, canonical_json, fingerprint_differences

log = logging.getLogger(__name__)

ALL_CLASSIFIERS = (*CLASSIFIERS, "sgd")
DEFAULT_SHOTS = (1, 2, 5, 10, 20)
# Saenko et al. 2010: 20 source images per class from amazon (and, in Gong et al. 2012's
# Office-Caltech-10, from caltech), 8 from the small dslr and webcam domains.
SAMPLED_SOURCE_SHOTS = {"amazon": 20, "caltech": 20}
SAMPLED_SMALL_DOMAIN_SHOTS = 8


@dataclass(frozen=True)
class ProbeSettings:
    classifiers: tuple[str, ...] = ("logreg",)
    Cs: tuple[float, ...] = DEFAULT_CS
    search: str = "cv"
    cv: int = 3
    select_by: str = "loss"
    normalization: str = "standard"
    seed: int = 0
    repeats: int = 5
    n_jobs: int | None = None

    def __post_init__(self):
        unknown = [c for c in self.classifiers if c not in ALL_CLASSIFIERS]
        if unknown:
            raise UserError(f"classifiers {unknown} are not among {ALL_CLASSIFIERS}")


@dataclass(frozen=True)
class Protocol:
    name: str
    train_split: str = "train"
    test_split: str | None = None
    shots: tuple[int, ...] = ()
    other_dataset: str | None = None
    sampled: bool = False

    @property
    def repeated(self) -> bool:
        """Drawn several times (few-shot, sampled): rows report mean and std over the draws."""
        return bool(self.shots)


PROTOCOL_HELP = "given, fewshot[:K,K,...], transfer:SOURCE->TARGET, sampled:SOURCE->TARGET, cross:DATASET"


def parse_protocol(text: str) -> Protocol:
    if text == "given":
        return Protocol("given")
    if text.startswith("fewshot"):
        try:
            shots = tuple(int(k) for k in text.partition(":")[2].split(",") if k) or DEFAULT_SHOTS
        except ValueError:
            raise UserError(f"protocol {text!r}: shots per class must be whole numbers, e.g. fewshot:1,5,10") from None
        if min(shots) < 1:
            raise UserError(f"shots per class must be positive. Received: {text!r}")
        return Protocol("fewshot", shots=shots)
    match = re.fullmatch(r"(transfer|sampled):([^>]+)->(.+)", text)
    if match:
        kind, source, target = match.groups()
        if kind == "transfer":
            return Protocol(text, train_split=source, test_split=target)
        shots = SAMPLED_SOURCE_SHOTS.get(source.lower(), SAMPLED_SMALL_DOMAIN_SHOTS)
        return Protocol(text, train_split=source, test_split=target, shots=(shots,), sampled=True)
    if text.startswith("cross:") and len(text) > len("cross:"):
        return Protocol(text, other_dataset=text.removeprefix("cross:"))
    raise UserError(f"protocol {text!r} is not one of: {PROTOCOL_HELP}")


def store_fingerprint_id(fingerprint: dict, dataset_digest: str = "") -> str:
    """Short id of the settings and the image list that made a store's features."""
    return hashlib.sha256(canonical_json({"fingerprint": fingerprint, "images": dataset_digest}).encode()).hexdigest()[:12]


def few_shot_rows(labels: np.ndarray, candidates: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows per class from ``candidates`` (all of a class when it has fewer), seeded."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(candidates[labels[candidates] == c])[:shots] for c in np.unique(labels[candidates])]
    return np.sort(np.concatenate(chosen))


def _fit(settings: ProbeSettings, classifier: str, store, tap, rows, labels, seed, scoring: str = "accuracy"):
    if classifier == "sgd":
        return StreamingSGDProbe(Cs=settings.Cs, seed=seed).fit_store(store, tap, rows, labels)
    probe = LinearProbe(classifier, Cs=settings.Cs, search=settings.search, cv=settings.cv, scoring=scoring,
                        select_by=settings.select_by, normalization=settings.normalization, seed=seed, n_jobs=settings.n_jobs)
    return probe.fit(store.features(tap, rows), labels[rows])


def _predict(probe, store, tap, rows) -> np.ndarray:
    return np.concatenate([probe.predict(X) for _, X in store.iter_chunks(tap, rows)]) if len(rows) else np.zeros(0, int)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _unseen_classes(train_labels, test_labels) -> int:
    """Test classes without a single training image: always wrong, whatever the probe."""
    return len(set(np.asarray(test_labels).tolist()) - set(np.asarray(train_labels).tolist()))


class Evaluation:
    """Runs one protocol on one store; rows go to ``rows``, predictions and probes under ``out_dir``.
    Jobs whose rows are already in ``results`` (same key) are taken from there, not refitted; the
    others run one (layer, classifier) job per worker process on stores large enough to gain (``_fit_jobs``)."""

    def __init__(self, path, protocol: Protocol, settings: ProbeSettings, *, out_dir: Path | None = None,
                 features_dir: Path | None = None, save_probes: bool = False, fitted: dict | None = None,
                 results: pd.DataFrame | None = None):
        self.path, self.protocol, self.settings = Path(path), protocol, settings
        self.out_dir, self.features_dir = out_dir, features_dir
        self.save_probes, self.fitted, self.results = save_probes, fitted, results
        self.cached = 0

    def run(self, layers=None, progress: bool = True) -> list[dict]:
        with FeatureStore(self.path) as store:
            taps = store.taps if layers is None else [t for t in store.taps if t in set(layers)]
            jobs = [(tap, clf) for tap in taps for clf in self.settings.classifiers]
            self._store_columns = self._columns_of(store)
            found = {job: self._cached(store, *job) for job in jobs}
            images = len(store)
        todo = [job for job in jobs if found[job] is None]
        self.cached = len(jobs) - len(todo)
        bar = tqdm(total=len(todo), desc=f"{self.protocol.name} {self._store_columns['features']}", disable=not progress)
        with bar:
            fitted = self._fit_jobs(todo, images, bar)
            rows = [row for job in jobs for row in (found[job] if found[job] is not None else next(fitted))]
        if self.cached:
            log.info("%s %s: %d of %d probes cached in results.csv (same store, settings and seed)",
                     self.protocol.name, self.path.stem, self.cached, len(jobs))
        return rows

    def _fit_jobs(self, jobs, images: int, bar):
        """The rows of each (layer, classifier) job, in order. Two or more jobs on a store of
        ``PARALLEL_MIN_ROWS`` images or more run in worker processes, one job each, every probe's C
        search in its worker: on 2 cores the nine Lite0 layers of Flowers-17 took 5.5 s instead of
        9.5 s with the search's three folds spread over two processes layer after layer (the idle
        core waited through every final fit). Each fit is single-threaded either way: the same numbers."""
        processes = worker_processes(len(jobs), images, self.settings.n_jobs)
        if processes < 2:
            for job in jobs:
                yield self._job(*job)
                bar.update()
            return
        worker = copy.copy(self)
        worker.settings = replace(self.settings, n_jobs=1)  # one process per job, not per fold too
        worker.results, worker.fitted = None, None if self.fitted is None else {}
        for rows, fitted, records in Parallel(n_jobs=processes, return_as="generator")(
                delayed(_job_in_worker)(worker, *job) for job in jobs):
            for record in records:  # the worker's warnings, as if logged here
                logger = logging.getLogger(record["name"])
                if logger.isEnabledFor(record["levelno"]):
                    logger.handle(logging.makeLogRecord(record))
            if fitted:
                self.fitted.update(fitted)
            bar.update()
            yield rows

    def _job(self, tap, classifier) -> list[dict]:
        with FeatureStore(self.path) as store:
            if store.multilabel is not None:
                return [self._multilabel(store, tap, classifier)]
            if self.protocol.repeated:
                return self._repeated(store, tap, classifier)
            return [self._single(store, tap, classifier)]

    def _cached(self, store, tap, classifier) -> list[dict] | None:
        if self.results is None or self.save_probes or self.fitted is not None or self.protocol.other_dataset:
            return None  # probes to save or hand back must be fitted; a cross row depends on the other store too
        names = [f"{k}-shot" for k in self.protocol.shots] if self.protocol.name == "fewshot" else [self.protocol.name]
        base = self._base_row(store, tap, classifier)
        return cached_rows(self.results, [{**base, "protocol": name} for name in names])

    @staticmethod
    def _columns_of(store) -> dict:
        """The result columns that depend on the store only, read once per run."""
        return {
            "dataset": store.dataset, "features": store.extractor,
            "kind": store.kind,
            "store_fingerprint": store_fingerprint_id(store.fingerprint, store.dataset_digest),
            # images whose local descriptors came out empty (all-zero features), e.g. blank ones
            "images_without_features": int(np.sum(store.stat("n_descriptors") == 0)) if "n_descriptors" in store.stats else 0,
        }

    def _base_row(self, store, tap, classifier) -> dict:
        """The columns known before fitting: the store's, and the settings that make up the key."""
        settings = self.settings
        sgd = classifier == "sgd"
        return {
            **self._store_columns, "layer": tap, "layer_depth": store.taps.index(tap),
            "classifier": classifier, "normalization": "standard" if sgd else settings.normalization,
            "search": "val" if sgd or settings.search == "val" else f"cv{settings.cv}",
            "select_by": "loss" if sgd else settings.select_by,
            "Cs": ",".join(f"{c:g}" for c in settings.Cs), "seed": settings.seed,
            "repeats": settings.repeats if self.protocol.repeated else 1,
            "n_features": store.dim(tap), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    @staticmethod
    def _probe_columns(probes, how: str = "") -> dict:
        """What chose C and how the fits went, over one probe or several (per class, per draw): the median
        C, the mean CV score (NaN if any fit had nothing to hold out), all converged."""
        cv_scores = [p.cv_score_ for p in probes]
        return {"C": float(np.median([p.best_C_ for p in probes])),
                "cv_score": float(np.mean(cv_scores)) if np.all(np.isfinite(cv_scores)) else np.nan,
                "selection": probes[0].selection_ + how, "converged": all(bool(p.converged_) for p in probes),
                "cv_splits": probes[0].n_splits_, "fit_seconds": round(float(np.mean([p.fit_seconds_ for p in probes])), 3)}

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
            # ``classes`` reads the store each time it is asked: once per store, not once per image.
            true_names = np.asarray(target.classes)[target.labels[test_rows]]
        class_names = np.asarray(store.classes)
        predicted_names = class_names[np.asarray(predicted, dtype=np.int64)]
        unseen = self._check_fit(store, tap, classifier, probe, class_names[labels[train_rows]].tolist(), true_names)
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
            **self._base_row(store, tap, classifier), **self._probe_columns([probe]), "protocol": self.protocol.name,
            "train_split": train, "test_split": test_split, "n_train": len(train_rows), "n_test": len(test_rows),
            "classes_unseen_in_train": unseen,
            "top1": float(accuracy_score(true_names, predicted_names)), "top1_std": 0.0,
            "mean_per_class_acc": mean_per_class_accuracy(true_names, predicted_names), "mean_per_class_acc_std": 0.0,
        }

    def _check_fit(self, store, tap, classifier, probe, train_names, test_names) -> int:
        """Warn about what makes a number weaker than it looks; returns the count of unseen test classes."""
        where = f"{store.extractor}/{tap} {classifier} {self.protocol.name}"
        if not probe.converged_:
            log.warning("%s: the solver did not converge at C=%g", where, probe.best_C_)
        if probe.n_splits_ == 0:
            log.warning("%s: %s; the probe's C was not searched", where, probe.selection_)
        unseen = _unseen_classes(train_names, test_names)
        if unseen:
            log.warning("%s: %d test classes have no training image, and every test image of them counts as wrong", where, unseen)
        return unseen

    def _multilabel(self, store, tap, classifier) -> dict:
        if self.protocol.repeated or self.protocol.other_dataset:
            raise UserError(f"{store.path} is multi-label: use protocol given or transfer:A->B, not {self.protocol.name}")
        targets, splits = store.multilabel, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, self.protocol.test_split)
        train_rows, test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test_split)
        X_test = store.features(tap, test_rows)
        scores = np.zeros((len(test_rows), targets.shape[1]))
        probes = []
        for c in range(targets.shape[1]):
            rows = train_rows[targets[train_rows, c] >= 0]
            if len(np.unique(targets[rows, c])) < 2:
                raise UserError(f"{store.path}: class {store.classes[c]!r} has no positive or no negative training image in {train!r}")
            probe = _fit(self.settings, classifier, store, tap, rows, targets[:, c], self.settings.seed, scoring="average_precision")
            scores[:, c] = probe.decision_function(X_test).ravel()
            probes.append(probe)
        truth = targets[test_rows]
        if self.out_dir is not None:
            name = f"{tap}__{classifier}__{_slug(self.protocol.name)}"
            scores_csv = self.out_dir / "predictions" / store.extractor / f"{name}.scores.csv"
            scores_csv.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(scores, columns=store.classes).assign(path=store.paths[test_rows]).to_csv(scores_csv, index=False)
        return {
            **self._base_row(store, tap, classifier), "protocol": self.protocol.name, "train_split": train,
            "test_split": test_split,
            # cv_score: the cross-validated mAP, each class's probe's mean validation AP at its chosen C
            **self._probe_columns(probes, ", per class"),
            "n_train": len(train_rows), "n_test": len(test_rows), "classes_unseen_in_train": 0,
            "top1": np.nan, "top1_std": 0.0, "mean_per_class_acc": np.nan, "mean_per_class_acc_std": 0.0,
            "mAP": mean_average_precision(truth, scores), "mAP_voc07": mean_average_precision(truth, scores, eleven_point=True),
            "fit_seconds": round(sum(p.fit_seconds_ for p in probes), 3),  # all classes' fits together
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
                raise UserError(f"{other} has classes the probe never saw: {unknown[:10]}")
            splits = target.splits
            test_split = "test" if "test" in set(splits) else "all"
            rows = np.flatnonzero(splits == "test") if test_split == "test" else np.arange(len(target))
        except Exception:
            target.close()
            raise
        return target, rows, f"{self.protocol.other_dataset}:{test_split}"

    def _repeated(self, store, tap, classifier) -> list[dict]:
        """Few-shot (k per class from the training split, for each k) and sampled (k per class from
        the source domain): ``repeats`` seeded draws each, tested on the same test rows."""
        labels, splits = store.labels, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, self.protocol.test_split)
        candidates, test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test_split)
        rows = []
        for shots in self.protocol.shots:
            draws = []
            for repeat in range(self.settings.repeats):
                seed = self.settings.seed + repeat
                train_rows = few_shot_rows(labels, candidates, shots, seed)
                probe = _fit(self.settings, classifier, store, tap, train_rows, labels, seed)
                predicted = _predict(probe, store, tap, test_rows)
                draws.append({"top1": accuracy_score(labels[test_rows], predicted),
                              "balanced": mean_per_class_accuracy(labels[test_rows], predicted), "probe": probe})
            unseen = self._check_fit(store, tap, classifier, probe, labels[train_rows], labels[test_rows])
            rows.append({
                **self._base_row(store, tap, classifier), "protocol": self.protocol.name if self.protocol.sampled else f"{shots}-shot",
                "train_split": train, "test_split": test_split,
                **self._probe_columns([d["probe"] for d in draws], f", per draw ({shots} per class)"),
                "n_train": len(train_rows), "n_test": len(test_rows), "classes_unseen_in_train": unseen,
                "top1": float(np.mean([d["top1"] for d in draws])), "top1_std": float(np.std([d["top1"] for d in draws])),
                "mean_per_class_acc": float(np.mean([d["balanced"] for d in draws])),
                "mean_per_class_acc_std": float(np.std([d["balanced"] for d in draws])),
            })
        return rows


class _Collected(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({**record.__dict__, "msg": record.getMessage(), "args": None, "exc_info": None})


def _job_in_worker(evaluation: Evaluation, tap: str, classifier: str):
    """``Evaluation._job`` in a worker process: its rows, the probes it fitted (when asked for)
    and its log records (for the parent's handlers)."""
    root, collected = logging.getLogger(), _Collected()
    level = root.level
    root.addHandler(collected)
    root.setLevel(logging.INFO)
    try:
        rows = evaluation._job(tap, classifier)
    finally:
        root.removeHandler(collected)
        root.setLevel(level)
    return rows, evaluation.fitted, collected.records


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
