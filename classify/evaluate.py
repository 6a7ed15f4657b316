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
only), which is what the report ranks by; and ``selection``, what chose C. A candidate whose
in-memory fit is estimated over ``ProbeSettings.memory_budget`` (``classify.budget``) is fitted
by the streaming SGD probe instead: its ``search`` is ``stream`` and its ``selection`` says why. A row whose key
(``classify.results.RESULT_KEY``) is already in ``results.csv`` is not fitted again.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.metrics import accuracy_score
from tqdm.auto import tqdm

from classify import fusion
from classify.budget import (DEFAULT_MEMORY_BUDGET, STREAM_BATCH_ROWS, describe_bytes, in_memory_peak, rows_per_read, streaming_chunk_rows,
                            streaming_peak)
from classify.metrics import mean_average_precision, mean_per_class_accuracy
from classify.persist import save_probe
from classify.probe import (C_GRID, CLASSIFIERS, CV_FOLDS, DEFAULT_CS, DEFAULT_VAL_FRACTION, NORMALIZATIONS, SEARCHES, SELECT_BY,
                            LinearProbe, StreamingSGDProbe, worker_processes)
from classify import results as result_file
from classify.results import PREDICTIONS, PROBES, cached_rows, output_path, write_csv, write_predictions
from extract.arguments import POSITIVE, SEEDS, Names, OrNone, Several, check_params, whole
from extract.datasets.base import choose_splits
from extract.errors import UserError
from extract.store import FeatureStore, canonical_json

log = logging.getLogger(__name__)

ALL_CLASSIFIERS = (*CLASSIFIERS, "sgd")
DEFAULT_SHOTS = (1, 2, 5, 10, 20)
# Saenko et al. 2010: 20 source images per class from amazon (and, in Gong et al. 2012's
# Office-Caltech-10, from caltech), 8 from the small dslr and webcam domains.
SAMPLED_SOURCE_SHOTS = {"amazon": 20, "caltech": 20}
SAMPLED_SMALL_DOMAIN_SHOTS = 8
FUSE_SIZES = Several(whole(2), least=0)  # how many taps each fused layer joins: two at least
# The allowed values of each field of ``ProbeSettings``, which the command line's options reuse.
PROBE_RANGES = {
    "classifiers": Several(Names(ALL_CLASSIFIERS)), "Cs": C_GRID, "search": Names(SEARCHES), "cv": CV_FOLDS,
    "cv_repeats": POSITIVE, "select_by": Names(SELECT_BY), "normalizations": Several(Names(NORMALIZATIONS)), "fuse": FUSE_SIZES,
    "seed": SEEDS, "repeats": POSITIVE, "n_jobs": OrNone(POSITIVE), "memory_budget": POSITIVE,
}
# The ``search`` column of a candidate fitted by the streaming SGD probe because its in-memory fit
# would not fit the memory budget (a 20% validation split, read in chunks).
STREAMED_SEARCH = "stream"


@dataclass(frozen=True)
class ProbeSettings:
    """What a run fits: every (layer, classifier, normalisation) is a candidate and a row of its own;
    ``fuse`` adds the fused layers of the top k single layers by CV score for each k (``classify.fusion``);
    ``cv_repeats`` repeats the k-fold CV on other seeded partitions. ``memory_budget`` (bytes) bounds
    what the fits running at once may hold (``classify.budget``): a candidate whose in-memory fit is
    estimated above it is fitted by the streaming SGD probe instead. ``recipe`` names the settings
    (``classify.recipe``) in the rows. Each field's allowed values are declared in ``PROBE_RANGES``."""

    classifiers: tuple[str, ...] = ("logreg",)
    Cs: tuple[float, ...] = DEFAULT_CS
    search: str = "cv"
    cv: int = 3
    cv_repeats: int = 1
    select_by: str = "loss"
    normalizations: tuple[str, ...] = ("standard",)
    fuse: tuple[int, ...] = ()
    seed: int = 0
    repeats: int = 5
    n_jobs: int | None = None
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    recipe: str = "plain"

    def __post_init__(self):
        # recipe is a label of the rows, not a setting
        check_params("probe settings", {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recipe"}, PROBE_RANGES)

    @property
    def search_name(self) -> str:
        """The ``search`` column: cv3, cv3x3 (3-fold CV repeated on 3 partitions), val."""
        if self.search == "val":
            return "val"
        return f"cv{self.cv}" + (f"x{self.cv_repeats}" if self.cv_repeats > 1 else "")

    def jobs(self, layers) -> list[tuple[str, str, str]]:
        """(layer, classifier, normalisation) of every candidate; the streaming SGD probe standardises only."""
        return [(layer, classifier, normalization) for layer in layers for classifier in self.classifiers
                for normalization in (("standard",) if classifier == "sgd" else self.normalizations)]


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
        if source == target:
            raise UserError(f"protocol {text!r} would test on the images it trains on: give two different splits or domains")
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


def _predict(probe, store, layer, rows, span_rows: int) -> np.ndarray:
    """Predictions of sorted dataset ``rows``, read in chunks that span about ``span_rows`` rows of the store."""
    if not len(rows):
        return np.zeros(0, int)
    return np.concatenate([probe.predict(X) for _, X in fusion.iter_chunks(store, layer, rows, rows_per_read(rows, span_rows))])


class StoreChangedError(UserError):
    """The store at a path was replaced (rebuilt, overwritten) while it was being probed."""


def _unseen_classes(train_labels, test_labels) -> int:
    """Test classes without a single training image: always wrong, whatever the probe."""
    return len(set(np.asarray(test_labels).tolist()) - set(np.asarray(train_labels).tolist()))


class Evaluation:
    """Runs one protocol on one store; rows go to ``rows``, predictions and probes under ``out_dir``.
    Jobs whose rows are already in ``results`` (same key) are taken from there, not refitted; the
    others run one (layer, classifier, normalisation) job per worker process on stores large enough
    to gain (``_fit_jobs``), or one per Ray task with ``cluster`` (``classify.distributed.RayJobs``).
    ``on_rows`` receives each fitted job's rows as soon as it is done (the command merges them into
    results.csv then, so a killed run keeps them). The store is pinned: a
    job that finds another file at the path (rebuilt while this ran) stops with ``StoreChangedError``."""

    def __init__(self, path, protocol: Protocol, settings: ProbeSettings, *, out_dir: Path | None = None,
                 features_dir: Path | None = None, save_probes: bool = False, fitted: dict | None = None,
                 results: pd.DataFrame | None = None, on_rows=None, cluster=None):
        self.path, self.protocol, self.settings = Path(path), protocol, settings
        self.out_dir, self.features_dir = out_dir, features_dir
        self.save_probes, self.fitted, self.results = save_probes, fitted, results
        self.on_rows, self.cluster = on_rows, cluster
        self.cached = 0
        self.memory_share = settings.memory_budget  # what this process's fits may hold (workers: their share)

    def run(self, layers=None, progress: bool = True) -> list[dict]:
        """Rows of every candidate: the store's taps (or those of ``layers`` it has; names joined by
        ``+`` are fused layers), then, with ``settings.fuse``, the fused layers of its best taps."""
        with FeatureStore(self.path) as store:
            self._identity = self._identity_of(store)
            self._store_columns = self._columns_of(store)
            self._taps, images = store.taps, len(store)
            self._check_shots(store)
            self._fit_rows = self._training_rows_at_most(store)
            self._classes = 2 if store.multilabel is not None else len(store.classes)  # multi-label: binary probes
            wanted = self._taps if layers is None else [t for t in self._taps if t in set(layers)]
            for name in [] if layers is None else [n for n in layers if fusion.is_fused(n)]:
                if all(tap in self._taps for tap in fusion.parts(name)):
                    fusion.check_layer(store, name)
                    wanted.append(fusion.fused_name(fusion.parts(name), self._taps))
        jobs = self.settings.jobs(dict.fromkeys(wanted))
        rows = self._rows(jobs, images, progress)
        if self.settings.fuse:
            fused = [name for name in fusion.candidates(rows, self.settings.fuse, self._taps) if name not in wanted]
            rows += self._rows(self.settings.jobs(fused), images, progress)
        return rows

    def _check_shots(self, store) -> None:
        """A few-shot k above the smallest training class would draw that class's every image and be
        labelled k-shot: refused, before anything is fitted."""
        if self.protocol.name != "fewshot" or store.multilabel is not None:
            return
        train, _ = choose_splits(store.splits, self.protocol.train_split, self.protocol.test_split)
        counts = np.bincount(store.labels[store.splits == train], minlength=len(store.classes))
        present = np.flatnonzero(counts)
        smallest = int(present[np.argmin(counts[present])])
        if max(self.protocol.shots) > counts[smallest]:
            raise UserError(
                f"{self.path}: fewshot:{','.join(map(str, self.protocol.shots))} asks for {max(self.protocol.shots)} training "
                f"images per class, but class {store.classes[smallest]!r} has {counts[smallest]} in {train!r}: "
                f"give shots of {counts[smallest]} or fewer")

    def _training_rows_at_most(self, store) -> int:
        """The most training rows one fit of this protocol takes (what its memory estimate counts): the
        training split's, or k per class of it for a draw of k."""
        train = store.splits == self.protocol.train_split
        if not self.protocol.repeated or store.multilabel is not None:
            return int(np.sum(train))
        return int(np.minimum(np.bincount(store.labels[train]), max(self.protocol.shots)).sum())

    def _linear_probe(self, store, job, *, seed: int, scoring: str = "accuracy", n_jobs: int | None = None) -> LinearProbe:
        layer, classifier, normalization = job
        settings = self.settings
        return LinearProbe(classifier, Cs=settings.Cs, search=settings.search, cv=settings.cv, cv_repeats=settings.cv_repeats,
                           scoring=scoring, select_by=settings.select_by, normalization=normalization,
                           blocks=fusion.blocks(store, layer), seed=seed, n_jobs=n_jobs)

    def _in_memory_peak(self, store, job, split_workers: int = 1) -> int:
        """The estimated peak bytes of ``job``'s in-memory fit (``classify.budget.in_memory_peak``)."""
        kind, splits = self._linear_probe(store, job, seed=0).search_plan(self._fit_rows)
        return in_memory_peak(self._fit_rows, fusion.dim(store, job[0]), classes=self._classes, classifier=job[1], splits=splits,
                              held_out_fraction=DEFAULT_VAL_FRACTION if kind == "val" else None, split_workers=split_workers)

    def _streamed_because(self, store, job) -> str | None:
        """Why ``job`` is fitted by the streaming SGD probe instead of in memory (its estimated peak is
        over the memory budget), or None. Decided on the whole budget and the training rows' count,
        the same whichever jobs run at once: what a row's key says."""
        if job[1] == "sgd":
            return None
        peak, budget = self._in_memory_peak(store, job), self.settings.memory_budget
        if peak <= budget:
            return None
        return f"in-memory fit estimated at {describe_bytes(peak)}, over the {describe_bytes(budget)} memory budget: "

    def _needs(self, store, job) -> int:
        """The bytes ``job`` needs at least: its in-memory fit's, or a streamed fit's smallest chunk."""
        if job[1] == "sgd" or self._streamed_because(store, job):
            return streaming_peak(STREAM_BATCH_ROWS, fusion.dim(store, job[0]), classes=self._classes, candidates=len(self.settings.Cs))
        return self._in_memory_peak(store, job)

    def _chunk_rows(self, store, layer: str) -> int:
        """Rows of the store a chunk read may span, for streamed fits and predictions, within this process's share of the budget."""
        return streaming_chunk_rows(self.memory_share, fusion.dim(store, layer), classes=self._classes, candidates=len(self.settings.Cs))

    def _fit(self, store, job, rows, labels, seed, scoring: str = "accuracy"):
        """A probe of ``job`` fitted on dataset ``rows``: in memory (C searched by ``LinearProbe``, its
        splits in worker processes where the budget holds them), or by the streaming SGD probe."""
        layer, classifier, normalization = job
        if classifier == "sgd" or self._streamed_because(store, job):
            probe = StreamingSGDProbe("logreg" if classifier == "sgd" else classifier, normalization=normalization,
                                      blocks=fusion.blocks(store, layer), Cs=self.settings.Cs, scoring=scoring, seed=seed,
                                      chunk_rows=self._chunk_rows(store, layer))
            return probe.fit_store(store, layer, rows, labels)
        probe = self._linear_probe(store, job, seed=seed, scoring=scoring, n_jobs=self.settings.n_jobs)
        workers = worker_processes(probe.search_plan(len(rows))[1], len(rows), self.settings.n_jobs)
        if workers > 1 and self._in_memory_peak(store, job, split_workers=workers) > self.memory_share:
            probe.set_params(n_jobs=1)  # the splits one after another in this process: the same numbers
        return probe.fit(fusion.features(store, layer, rows), labels[rows])

    def _rows(self, jobs, images: int, progress: bool) -> list[dict]:
        with FeatureStore(self.path) as store:
            self._check_identity(store)
            found = {job: self._cached(store, job) for job in jobs}
            needs = max((self._needs(store, job) for job in jobs if found[job] is None), default=1)
        todo = [job for job in jobs if found[job] is None]
        self.cached += len(jobs) - len(todo)
        bar = tqdm(total=len(todo), desc=f"{self.protocol.name} {self._store_columns['features']}", disable=not progress or not todo)
        with bar:
            fitted = self._fit_jobs(todo, images, needs, bar)
            rows = [row for job in jobs for row in (found[job] if found[job] is not None else next(fitted))]
        if len(jobs) > len(todo):
            log.info("%s %s: %d of %d probes cached in results.csv (same store, settings and seed)",
                     self.protocol.name, self.path.stem, len(jobs) - len(todo), len(jobs))
        return rows

    def _fit_jobs(self, jobs, images: int, needs: int, bar):
        """The rows of each job, in order, each handed to ``on_rows`` when done. Two or more jobs on a
        store of ``PARALLEL_MIN_ROWS`` images or more run in worker processes, one job each, every
        probe's C search in its worker (spreading each layer's folds over the cores instead left one
        core idle through every final fit), as many at once as the memory budget holds jobs that need
        ``needs`` bytes each (each then gets its share). On a Ray ``cluster`` every job is a task, as many
        at once as it has workers and the budget holds; one at a time, a task spreads its C search's
        splits over worker processes of its own, as this process does. Each fit is single-threaded
        either way: the same numbers."""
        if self.cluster is None:
            processes = worker_processes(len(jobs), images, self.settings.n_jobs)
        else:
            processes = min(len(jobs), self.cluster.workers)
        processes = min(processes, max(1, self.settings.memory_budget // needs))
        if processes < 2 and self.cluster is None:
            done = ((self._job(job), None, []) for job in jobs)
        else:
            worker = copy.copy(self)
            # one process per job, not per fold too; a lone task on a cluster: its folds on the CPUs of one node
            splits = self.cluster.widest if self.cluster is not None and processes == 1 else 1
            worker.settings = replace(self.settings, n_jobs=splits)
            worker.results, worker.on_rows, worker.cluster = None, None, None
            worker.fitted = None if self.fitted is None else {}
            worker.memory_share = self.settings.memory_budget // processes
            if self.cluster is not None:
                done = self.cluster.map(_job_in_worker, worker, jobs, at_once=processes, cpus=splits)
            else:
                done = Parallel(n_jobs=processes, return_as="generator")(delayed(_job_in_worker)(worker, job) for job in jobs)
        for rows, fitted, records in done:
            for record in records:  # a worker's warnings, as if logged here
                logger = logging.getLogger(record["name"])
                if logger.isEnabledFor(record["levelno"]):
                    logger.handle(logging.makeLogRecord(record))
            if fitted:
                self.fitted.update(fitted)
            if self.on_rows is not None:
                self.on_rows(rows)
            bar.update()
            yield rows

    def _job(self, job) -> list[dict]:
        with FeatureStore(self.path) as store:
            self._check_identity(store)
            if store.multilabel is not None:
                return [self._multilabel(store, job)]
            if self.protocol.repeated:
                return self._repeated(store, job)
            return [self._single(store, job)]

    @staticmethod
    def _identity_of(store) -> tuple:
        """The open file (device, inode) and what it holds (the fingerprint id)."""
        return (*store.file_identity, store_fingerprint_id(store.fingerprint, store.dataset_digest))

    def _check_identity(self, store) -> None:
        if self._identity_of(store) != self._identity:
            raise StoreChangedError(
                f"{self.path} was replaced while it was being probed (another `make extract` or `make baselines` "
                "rebuilt it); the rows of the old store are not written: rerun the same `make classify`")

    def _cached(self, store, job) -> list[dict] | None:
        if self.results is None or self.save_probes or self.fitted is not None or self.protocol.other_dataset:
            return None  # probes to save or hand back must be fitted; a cross row depends on the other store too
        names = [f"{k}-shot" for k in self.protocol.shots] if self.protocol.name == "fewshot" else [self.protocol.name]
        base = self._base_row(store, job)
        return cached_rows(self.results, [{**base, "protocol": name} for name in names])

    @staticmethod
    def _columns_of(store) -> dict:
        """The result columns that depend on the store only, read once per run."""
        return {
            "dataset": store.dataset, "features": store.extractor,
            "kind": store.kind, "views": store.fingerprint.get("views", {}).get("name", "centre") if store.kind == "cnn" else "",
            "store_fingerprint": store_fingerprint_id(store.fingerprint, store.dataset_digest),
            # images whose local descriptors came out empty (all-zero features), e.g. blank ones
            "images_without_features": int(np.sum(store.stat("n_descriptors") == 0)) if "n_descriptors" in store.stats else 0,
        }

    def _base_row(self, store, job) -> dict:
        """The columns known before fitting: the store's, and the settings that make up the key."""
        layer, classifier, normalization = job
        settings = self.settings
        sgd = classifier == "sgd"
        streamed = self._streamed_because(store, job) is not None
        return {
            **self._store_columns, "layer": layer, "layer_depth": fusion.depth(store, layer),
            "classifier": classifier, "normalization": normalization,
            "search": STREAMED_SEARCH if streamed else "val" if sgd else settings.search_name,
            "select_by": "loss" if sgd or streamed else settings.select_by,
            "Cs": ",".join(f"{c:g}" for c in settings.Cs), "seed": settings.seed,
            "repeats": settings.repeats if self.protocol.repeated else 1, "probe_version": result_file.PROBES_VERSION, "recipe": settings.recipe,
            "n_features": fusion.dim(store, layer), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    @staticmethod
    def _probe_columns(probes, how: str = "", streamed_because: str | None = None) -> dict:
        """What chose C and how the fits went, over one probe or several (per class, per draw): the median
        C, the mean CV score (NaN if any fit had nothing to hold out), all converged; ``selection`` says
        why a streamed probe was streamed (``_streamed_because``)."""
        cv_scores = [p.cv_score_ for p in probes]
        return {"C": float(np.median([p.best_C_ for p in probes])),
                "cv_score": float(np.mean(cv_scores)) if np.all(np.isfinite(cv_scores)) else np.nan,
                "selection": (streamed_because or "") + probes[0].selection_ + how, "converged": all(bool(p.converged_) for p in probes),
                "cv_splits": probes[0].n_splits_, "fit_seconds": round(float(np.mean([p.fit_seconds_ for p in probes])), 3)}

    def _single(self, store, job) -> dict:
        """Fit on the training split; test on this store's test split, or on another dataset's store.
        Metrics compare class names, which is what matches across stores."""
        layer, classifier, _ = job
        labels, splits = store.labels, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, None if self.protocol.other_dataset else self.protocol.test_split)
        train_rows = np.flatnonzero(splits == train)
        probe = self._fit(store, job, train_rows, labels, self.settings.seed)
        if self.protocol.other_dataset:
            test_store, test_rows, test_split = self._cross_target(store)
        else:  # this store stays open for the caller
            test_store, test_rows = contextlib.nullcontext(store), np.flatnonzero(splits == test_split)
        with test_store as target:
            predicted = _predict(probe, target, layer, test_rows, self._chunk_rows(store, layer))
            paths = target.paths[test_rows]
            # ``classes`` reads the store each time it is asked: once per store, not once per image.
            true_names = np.asarray(target.classes)[target.labels[test_rows]]
        class_names = np.asarray(store.classes)
        predicted_names = class_names[np.asarray(predicted, dtype=np.int64)]
        unseen = self._check_fit(store, job, probe, class_names[labels[train_rows]].tolist(), true_names)
        if self.fitted is not None:
            self.fitted[job] = probe
        row = {
            **self._base_row(store, job), **self._probe_columns([probe], streamed_because=self._streamed_because(store, job)),
            "protocol": self.protocol.name,
            "train_split": train, "test_split": test_split, "n_train": len(train_rows), "n_test": len(test_rows),
            "classes_unseen_in_train": unseen,
            "top1": float(accuracy_score(true_names, predicted_names)), "top1_std": 0.0,
            "mean_per_class_acc": mean_per_class_accuracy(true_names, predicted_names), "mean_per_class_acc_std": 0.0,
        }
        if self.out_dir is not None:
            write_predictions(self.out_dir, row, paths, true_names, predicted_names)
            if self.save_probes:
                save_probe(output_path(self.out_dir, PROBES, row, ".npz"), probe,
                           class_names=store.classes, layer=layer, features=store.extractor, fingerprint=store.fingerprint)
        return row

    def _check_fit(self, store, job, probe, train_names, test_names) -> int:
        """Warn about what makes a number weaker than it looks; returns the count of unseen test classes."""
        layer, classifier, normalization = job
        where = f"{store.extractor}/{layer} {classifier} {normalization} {self.protocol.name}"
        if not probe.converged_:
            log.warning("%s: the solver did not converge at C=%g", where, probe.best_C_)
        if probe.n_splits_ == 0:
            log.warning("%s: %s; the probe's C was not searched", where, probe.selection_)
        unseen = _unseen_classes(train_names, test_names)
        if unseen:
            log.warning("%s: %d test classes have no training image, and every test image of them counts as wrong", where, unseen)
        return unseen

    def _multilabel(self, store, job) -> dict:
        layer, classifier, _ = job
        if self.protocol.repeated or self.protocol.other_dataset:
            raise UserError(f"{store.path} is multi-label: use protocol given or transfer:A->B, not {self.protocol.name}")
        targets, splits = store.multilabel, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, self.protocol.test_split)
        train_rows, test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test_split)
        probes = []
        for c in range(targets.shape[1]):
            rows = train_rows[targets[train_rows, c] >= 0]
            if len(np.unique(targets[rows, c])) < 2:
                raise UserError(f"{store.path}: class {store.classes[c]!r} has no positive or no negative training image in {train!r}")
            probes.append(self._fit(store, job, rows, targets[:, c], self.settings.seed, scoring="average_precision"))
        # every class's scores of the test rows, read once, a chunk at a time
        scores, done = np.zeros((len(test_rows), targets.shape[1])), 0
        for positions, X in fusion.iter_chunks(store, layer, test_rows, rows_per_read(test_rows, self._chunk_rows(store, layer))):
            scores[done : done + len(positions)] = np.stack([probe.decision_function(X).ravel() for probe in probes], axis=1)
            done += len(positions)
        truth = targets[test_rows]
        row = {
            **self._base_row(store, job), "protocol": self.protocol.name, "train_split": train,
            "test_split": test_split,
            # cv_score: the cross-validated mAP, each class's probe's mean validation AP at its chosen C
            **self._probe_columns(probes, ", per class", self._streamed_because(store, job)),
            "n_train": len(train_rows), "n_test": len(test_rows), "classes_unseen_in_train": 0,
            "top1": np.nan, "top1_std": 0.0, "mean_per_class_acc": np.nan, "mean_per_class_acc_std": 0.0,
            "mAP": mean_average_precision(truth, scores), "mAP_voc07": mean_average_precision(truth, scores, eleven_point=True),
            "fit_seconds": round(sum(p.fit_seconds_ for p in probes), 3),  # all classes' fits together
        }
        if self.out_dir is not None:
            scores_csv = output_path(self.out_dir, PREDICTIONS, row, ".scores.csv")
            scores_csv.parent.mkdir(parents=True, exist_ok=True)
            write_csv(pd.DataFrame(scores, columns=store.classes).assign(path=store.paths[test_rows]), scores_csv)
        return row

    def _cross_target(self, store):
        """The other dataset's store of the same extractor (open), its test rows, and the split's label."""
        other = Path(self.features_dir or store.path.parent.parent) / self.protocol.other_dataset / store.path.name
        target = FeatureStore(other, expect=store.fingerprint, expected_by=str(store.path),
                              fix="Extract both domains with the same settings (the same MODEL, LAYERS, WEIGHTS, DTYPE and VIEWS).")
        try:
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

    def _repeated(self, store, job) -> list[dict]:
        """Few-shot (k per class from the training split, for each k) and sampled (k per class from
        the source domain): ``repeats`` seeded draws each, tested on the same test rows."""
        layer = job[0]
        labels, splits = store.labels, store.splits
        train, test_split = choose_splits(splits, self.protocol.train_split, self.protocol.test_split)
        candidates, test_rows = np.flatnonzero(splits == train), np.flatnonzero(splits == test_split)
        rows = []
        for shots in self.protocol.shots:
            draws = []
            for repeat in range(self.settings.repeats):
                seed = self.settings.seed + repeat
                train_rows = few_shot_rows(labels, candidates, shots, seed)
                probe = self._fit(store, job, train_rows, labels, seed)
                predicted = _predict(probe, store, layer, test_rows, self._chunk_rows(store, layer))
                draws.append({"top1": accuracy_score(labels[test_rows], predicted),
                              "balanced": mean_per_class_accuracy(labels[test_rows], predicted), "probe": probe})
            unseen = self._check_fit(store, job, probe, labels[train_rows], labels[test_rows])
            rows.append({
                **self._base_row(store, job), "protocol": self.protocol.name if self.protocol.sampled else f"{shots}-shot",
                "train_split": train, "test_split": test_split,
                **self._probe_columns([d["probe"] for d in draws], f", per draw ({shots} per class)", self._streamed_because(store, job)),
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


def _job_in_worker(evaluation: Evaluation, job):
    """``Evaluation._job`` in a worker process: its rows, the probes it fitted (when asked for)
    and its log records (for the parent's handlers)."""
    root, collected = logging.getLogger(), _Collected()
    level = root.level
    root.addHandler(collected)
    root.setLevel(logging.INFO)
    try:
        rows = evaluation._job(job)
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
