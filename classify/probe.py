"""Linear probes on frozen features, with C chosen on training data only.

``LinearProbe`` is a scikit-learn classifier: a normaliser, then logistic regression
(multinomial, L-BFGS) or a linear SVM (one-vs-rest). ``fit`` searches C over a log grid
by stratified k-fold cross-validation or on a validation split held out of the training
rows (the Kornblith et al. protocol); each split's normaliser is fitted on its own
training part. C is the one with the lowest mean held-out loss of the classifier's own
objective (cross-entropy, squared hinge), which moves continuously with the features; the
held-out accuracy at that C is the score that ranks layers (``select_by="score"`` picks C by
accuracy itself, as Kornblith et al. did). All splits walk the C path together from strong
to weak regularisation, logistic fits warm-started from the previous C, and the walk stops
once the criterion has stayed worse than its best for ``patience`` grid points (it falls
then rises against log C; the large-C fits past the best are the slow ones). The
splits run in parallel processes with single-threaded BLAS: BLAS thread pools fighting over
the cores for small matrices slow L-BFGS down many times over (README > Benchmarks,
``probe_search.py``). Features wider than the training
rows are many (hand-crafted encodings of 8,000-40,000 values) are projected onto the span of
the training rows first (``RowSpan``): the same optimum, found on at most n features.
Then the probe is refitted on all training rows with the chosen C. Test rows never reach ``fit``.

Above ``CV_MAX_ROWS`` training rows the k folds give way to one stratified held-out split of
``val_fraction`` of the rows (``search_plan``): each fold's fit there costs as much as the split's,
and thousands of held-out rows score a C well enough.

``StreamingSGDProbe`` is the variant for layers too large for memory (``classify.budget``): it
reads the HDF5 layer in chunks (``partial_fit``), the normaliser's statistics in a streaming pass,
choosing the regularisation on a held-out part of the training rows.

Each estimator declares the allowed values of its parameters in ``_parameter_ranges``
(scikit-learn's ``_parameter_constraints``, written with ``extract.arguments``' ranges, which
the command lines share) and checks them when ``fit`` starts: a bad one is a ``UserError`` (a
``ValueError``) naming the parameter, its value and what is allowed.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
import warnings

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import average_precision_score, log_loss
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold, StratifiedShuffleSplit
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController

from classify import fusion
from classify.budget import rows_per_read
from extract.parallel import host_cores
from extract.arguments import FRACTION, POSITIVE, SEEDS, Names, OrNone, Several, check_params, number, whole
from extract.errors import UserError
from extract.fileio import DISK_ERRNOS

CLASSIFIERS = ("logreg", "svm")
NORMALIZATIONS = ("standard", "l2", "sqrt", "none")
SEARCHES = ("cv", "val")
SCORINGS = ("accuracy", "average_precision")
# What picks C among the grid: the lowest mean held-out loss (``held_out_loss``), or the highest
# mean held-out score. Scores on a few hundred rows are steps of one image: on Flowers-17 the
# accuracies of C = 0.1 ... 1000 were within one image of each other, so rounding-level changes
# of the features moved the chosen C by four decades and top-1 by 1.5 points.
SELECT_BY = ("loss", "score")
DEFAULT_CS = tuple(float(c) for c in np.logspace(-5, 3, 9))
# The range Kornblith et al. (CVPR 2019) searched, one value per decade: l2-normalised rows (norm 1)
# want C in the thousands, standardised wide layers (squared norm ~ d) a thousandth.
WIDE_CS = tuple(float(c) for c in np.logspace(-6, 5, 12))
DEFAULT_VAL_FRACTION = 0.2
# Above this many training rows C is chosen on one stratified held-out split instead of k folds.
CV_MAX_ROWS = 10_000
# Below this many training rows a split's fit takes milliseconds, less than handing it to a
# worker process costs: such searches (few-shot draws, small datasets) run in this process, and
# so do the layers of a store of fewer images (``classify.evaluate`` spreads larger stores' layers).
# Narrow layers are no cheaper: 32 values of 1,088 Flowers-17 images take many L-BFGS steps
# at large C, and the nine Lite0 layers' searches ran faster in worker processes than in this one.
PARALLEL_MIN_ROWS = 500


def worker_processes(tasks: int, rows: int, n_jobs: int | None = None) -> int:
    """How many worker processes ``tasks`` independent fits on ``rows`` training rows get: one per
    task up to ``n_jobs`` (default: the cores), or none (1, this process) below ``PARALLEL_MIN_ROWS``."""
    return min(tasks, n_jobs or host_cores()) if rows >= PARALLEL_MIN_ROWS else 1


CV_FOLDS = whole(2)
C_GRID = Several(number(0, None, closed="neither"))  # one or more finite Cs above 0
VAL_FRACTIONS = number(0, 1, closed="neither")


def parse_cs(text: str) -> tuple[float, ...]:
    """``"1e-4:1e2:7"`` (log-spaced) or ``"0.01,0.1,1"``."""
    bad = UserError(f"C grid {text!r}: give LOW:HIGH:COUNT (COUNT log-spaced values, 0 < LOW <= HIGH) or values above 0, "
                    "e.g. 1e-4:1e2:7 or 0.01,0.1,1")
    try:
        if ":" in text:
            low, high, count = text.split(":")
            low, high, count = float(low), float(high), int(count)
            if not (count >= 1 and (low, high) in C_GRID and low <= high):
                raise bad
            Cs = tuple(float(c) for c in np.logspace(np.log10(low), np.log10(high), count))
        else:
            Cs = tuple(float(c) for c in text.split(","))
    except ValueError:  # not numbers, or not three of them
        raise bad from None
    if Cs not in C_GRID:
        raise bad
    return Cs


def signed_sqrt(x):
    return np.sign(x) * np.sqrt(np.abs(x))


def make_normalizer(normalization: str, blocks: tuple[int, ...] | None = None):
    """standard: zero mean, unit variance; l2: unit-length rows ("CNN features off-the-shelf");
    sqrt: signed square root then l2 (power normalisation); none. With ``blocks`` (the widths of
    the taps joined into a fused layer), each block is normalised on its own (``BlockNormalizer``)."""
    if blocks is not None and len(blocks) > 1:
        return BlockNormalizer(normalization, blocks)
    if normalization == "standard":
        return StandardScaler()
    if normalization == "l2":
        return Normalizer(norm="l2")
    if normalization == "sqrt":
        return Pipeline([("sqrt", FunctionTransformer(signed_sqrt)), ("l2", Normalizer(norm="l2"))])
    if normalization == "none":
        return FunctionTransformer()
    raise UserError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")


class BlockNormalizer(TransformerMixin, BaseEstimator):
    """The columns of a fused layer, one block per tap, each normalised on its own and then scaled to
    unit mean squared norm over the training rows, so that every tap weighs alike in the joined
    vector whatever its width (a standardised 1,280-value block would otherwise outweigh a 320-value
    one four to one; l2 and sqrt blocks have norm 1 already). The hypercolumn recipe: normalise
    each layer, then concatenate (Hariharan et al., CVPR 2015; Razavian et al., 2014)."""

    _parameter_ranges = {"normalization": Names(NORMALIZATIONS), "blocks": Several(POSITIVE)}

    def __init__(self, normalization: str = "standard", blocks: tuple[int, ...] = ()):
        self.normalization = normalization
        self.blocks = blocks

    def _edges(self):
        return np.cumsum([0, *self.blocks])

    def fit(self, X, y=None):
        return self.fit_chunks(lambda: (X,))

    def fit_chunks(self, chunks):
        """``fit`` over the rows in chunks: ``chunks()`` yields them afresh for each of two passes (each
        block's statistics, then its mean squared norm)."""
        check_params(type(self).__name__, self.get_params(deep=False), self._parameter_ranges)
        edges = self._edges()
        blocks = list(zip(edges[:-1], edges[1:]))
        self.normalizers_ = [fit_normalizer(self.normalization, lambda: (X[:, start:stop] for X in self._checked(chunks())))
                             for start, stop in blocks]
        squares, rows = np.zeros(len(blocks)), 0
        for X in chunks():
            for i, (normalizer, (start, stop)) in enumerate(zip(self.normalizers_, blocks)):
                squares[i] += np.sum(np.sum(np.square(normalizer.transform(X[:, start:stop]), dtype=np.float64), axis=1))
            rows += len(X)
        self.weights_ = [1.0 / np.sqrt(total / rows) if total > 0 else 1.0 for total in squares]
        self.n_features_in_ = int(edges[-1])
        return self

    def _checked(self, chunks):
        for X in chunks:
            if X.shape[1] != self._edges()[-1]:
                raise UserError(f"a fused layer of blocks {list(self.blocks)} has {self._edges()[-1]} columns. Received {X.shape[1]}")
            yield X

    def transform(self, X):
        check_is_fitted(self, "normalizers_")
        edges = self._edges()
        return np.concatenate([(normalizer.transform(X[:, start:stop]) * weight).astype(np.float32)
                               for normalizer, weight, start, stop in zip(self.normalizers_, self.weights_, edges[:-1], edges[1:])],
                              axis=1)


def fit_normalizer(normalization: str, chunks, blocks: tuple[int, ...] | None = None):
    """``make_normalizer(normalization, blocks)`` fitted on rows that ``chunks()`` yields an array at a
    time (afresh at each call: a fused layer's blocks take two passes): the standard scaler's
    statistics accumulate chunk by chunk; l2, sqrt and none learn nothing."""
    normalizer = make_normalizer(normalization, blocks)
    if isinstance(normalizer, BlockNormalizer):
        return normalizer.fit_chunks(chunks)
    if isinstance(normalizer, StandardScaler):
        for X in chunks():
            normalizer.partial_fit(X)
        return normalizer
    return normalizer.fit(next(iter(chunks())))


def make_classifier(classifier: str, *, C: float, max_iter: int, seed: int):
    if classifier == "logreg":
        return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, warm_start=True, random_state=seed)
    if classifier == "svm":
        # The dual solver: with as many samples as dimensions the primal one was many times slower.
        return LinearSVC(C=C, max_iter=max_iter, random_state=seed, dual=True)
    raise UserError(f"classifier={classifier!r} is not one of {CLASSIFIERS}")


def _fit_quietly(model, X, y) -> bool:
    """Fit and return whether the solver converged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


class RowSpan:
    """Coordinates in an orthonormal basis of the span of the training rows ``X`` (n x d), for d > n.

    Why: an L2-regularised linear model's weights lie in the span of its training rows (the
    representer theorem), so fitting it on these r <= n coordinates and mapping the weights
    back solves exactly the same problem: same loss, same penalty, same optimum. For
    8,000-40,000-value hand-crafted features on a few thousand images every solver iteration
    then costs O(n r) instead of O(n d), for a one-off O(n^2 d) Gram matrix. The basis is
    never formed: with ``X X^T = U diag(s) U^T``, the coordinates of rows ``Y`` are
    ``Y X^T U / sqrt(s)`` and those of ``X`` itself ``U sqrt(s)``.
    """

    def __init__(self, X: np.ndarray):
        self.X = X
        X64 = X.astype(np.float64)
        eigenvalues, U = np.linalg.eigh(X64 @ X64.T)
        keep = eigenvalues > eigenvalues[-1] * len(X) * np.finfo(np.float32).eps  # the numerical rank
        self.root, self.U = np.sqrt(eigenvalues[keep]), U[:, keep]

    @staticmethod
    def worthwhile(X: np.ndarray) -> bool:
        return X.shape[1] > X.shape[0]

    @property
    def train(self) -> np.ndarray:
        return (self.U * self.root).astype(np.float32)

    def coordinates(self, Y: np.ndarray) -> np.ndarray:
        return ((Y.astype(np.float64) @ self.X.T.astype(np.float64)) @ (self.U / self.root)).astype(np.float32)

    def weights(self, coef: np.ndarray) -> np.ndarray:
        """Weights of the coordinates -> the same weights on the original features (w = V a)."""
        return ((coef @ (self.U / self.root).T) @ self.X.astype(np.float64)).astype(coef.dtype)


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def one_blas_thread():
    """``threadpool_limits(1)`` as a context, without finding the loaded BLAS/OpenMP libraries again
    at every call: a layer's C search would repeat that search for each of its dozens of fits."""
    return _threadpools().limit(limits=1)


def _prepare_split(normalization, blocks, X_train, X_val):
    """Normalise a split by its training part and, for wide features, express both parts in the
    training rows' span (``RowSpan``): the fits of every C then run on at most n_train features."""
    with one_blas_thread():
        normalizer = make_normalizer(normalization, blocks).fit(X_train)
        X_train, X_val = normalizer.transform(X_train), normalizer.transform(X_val)
        if not RowSpan.worthwhile(X_train):
            return X_train, X_val
        span = RowSpan(X_train)
        return span.train, span.coordinates(X_val)


def held_out_loss(model, X, y) -> float:
    """The mean data term of the classifier's own objective on held-out rows: cross-entropy for
    logistic regression, squared hinge (one-vs-rest, summed over classes) for the linear SVM.
    Unlike accuracy it moves continuously with the features, so C is chosen the same way when
    they change by float rounding."""
    if hasattr(model, "predict_proba"):  # logistic regression, by L-BFGS or by SGD
        return float(log_loss(y, model.predict_proba(X), labels=model.classes_))
    scores = model.decision_function(X)
    if scores.ndim == 1:  # binary: one score, positive for classes_[1]
        signs = np.where(y == model.classes_[1], 1.0, -1.0)
        return float(np.mean(np.maximum(0.0, 1.0 - signs * scores) ** 2))
    signs = np.where(y[:, None] == model.classes_[None, :], 1.0, -1.0)
    return float(np.mean(np.sum(np.maximum(0.0, 1.0 - signs * scores) ** 2, axis=1)))


def _fit_split(classifier, scoring, max_iter, seed, X_train, y_train, X_val, y_val, C, state):
    """Fit one prepared split at one C, warm-started from ``state`` (the previous C's weights). Returns
    its held-out score (accuracy, or average precision of a binary probe of a multi-label dataset),
    its held-out loss (``held_out_loss``) and the weights."""
    with one_blas_thread():
        model = make_classifier(classifier, C=C, max_iter=max_iter, seed=seed)
        if state is not None and classifier == "logreg":
            model.coef_, model.intercept_ = state
        _fit_quietly(model, X_train, y_train)
        if scoring == "average_precision":
            score = float(average_precision_score(y_val, model.decision_function(X_val)))
        else:
            score = float(np.mean(model.predict(X_val) == y_val))
        loss = held_out_loss(model, X_val, y_val)
    return score, loss, (model.coef_, model.intercept_)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Normalise, then a linear classifier whose C is searched on the training rows.

    After ``fit``: ``best_C_``, ``cv_scores_`` and ``cv_losses_`` (n_Cs x n_splits held-out scores
    and losses), ``cv_score_`` (the mean held-out score at ``best_C_``: what ranks layers and
    feature sets, NaN when no rows could be held out), ``n_splits_``, ``selection_`` (what chose C, in words), ``converged_`` (of the
    final refit), ``fit_seconds_``, ``pipeline_``. ``scoring`` is ``accuracy``, or
    ``average_precision`` for a binary probe of a multi-label dataset.
    """

    _parameter_ranges = {
        "classifier": Names(CLASSIFIERS), "Cs": C_GRID, "search": Names(SEARCHES), "cv": CV_FOLDS,
        "val_fraction": VAL_FRACTIONS, "normalization": Names(NORMALIZATIONS), "blocks": OrNone(Several(POSITIVE)),
        "cv_repeats": POSITIVE, "scoring": Names(SCORINGS), "max_iter": POSITIVE, "patience": OrNone(POSITIVE),
        "select_by": Names(SELECT_BY), "seed": SEEDS, "n_jobs": OrNone(POSITIVE), "cv_max_rows": OrNone(POSITIVE),
    }

    def __init__(
        self,
        classifier: str = "logreg",
        *,
        Cs=DEFAULT_CS,
        search: str = "cv",
        cv: int = 3,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        normalization: str = "standard",
        blocks: tuple[int, ...] | None = None,
        cv_repeats: int = 1,
        scoring: str = "accuracy",
        max_iter: int = 1000,
        patience: int | None = 2,
        select_by: str = "loss",
        seed: int = 0,
        n_jobs: int | None = None,
        cv_max_rows: int | None = CV_MAX_ROWS,
    ):
        self.classifier = classifier
        self.Cs = Cs
        self.search = search
        self.cv = cv
        self.val_fraction = val_fraction
        self.normalization = normalization
        self.blocks = blocks
        self.cv_repeats = cv_repeats
        self.scoring = scoring
        self.max_iter = max_iter
        self.patience = patience
        self.select_by = select_by
        self.seed = seed
        self.n_jobs = n_jobs
        self.cv_max_rows = cv_max_rows

    def search_plan(self, rows: int) -> tuple[str, int]:
        """How C is searched on ``rows`` training rows: ("cv", folds x repeats), or ("val", 1) for a
        held-out split, asked for or above ``cv_max_rows`` (before counting the rows of each class,
        which may leave fewer folds, or none)."""
        if self.search == "val" or (self.cv_max_rows is not None and rows > self.cv_max_rows):
            return "val", 1
        return "cv", self.cv * self.cv_repeats

    def _splits(self, X, y, smallest_class: int):
        if self.search_plan(len(y))[0] == "cv":
            folds = min(self.cv, smallest_class)
            if folds < 2:
                return []
            if self.cv_repeats > 1:  # other seeded partitions of the same rows: a less noisy estimate
                return list(RepeatedStratifiedKFold(n_splits=folds, n_repeats=self.cv_repeats, random_state=self.seed).split(X, y))
            return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed).split(X, y))
        # a validation split: asked for, or above cv_max_rows
        n_val = max(len(self.classes_), round(self.val_fraction * len(y)))
        if smallest_class < 2 or len(y) - n_val < len(self.classes_):
            return []
        return list(StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=self.seed).split(X, y))

    def _search_path(self, X, y, splits, Cs) -> tuple[np.ndarray, np.ndarray]:
        """Held-out scores and losses (each n_Cs x n_splits), walking C upwards; NaN where the walk
        stopped early, ``patience`` grid points past the best of the selection criterion."""
        scores, losses = np.full((len(Cs), len(splits)), np.nan), np.full((len(Cs), len(splits)), np.nan)
        states = [None] * len(splits)
        jobs = worker_processes(len(splits), len(X), self.n_jobs)
        with Parallel(n_jobs=jobs) as parallel:
            prepared = parallel(delayed(_prepare_split)(self.normalization, self.blocks, X[tr], X[va]) for tr, va in splits)
            for i, C in enumerate(Cs):
                results = parallel(
                    delayed(_fit_split)(self.classifier, self.scoring, self.max_iter, self.seed, X_tr, y[tr], X_va, y[va], C, state)
                    for (tr, va), (X_tr, X_va), state in zip(splits, prepared, states)
                )
                scores[i], losses[i] = [r[0] for r in results], [r[1] for r in results]
                states = [r[2] for r in results]
                if self.patience is not None and i - self._best(scores[: i + 1], losses[: i + 1]) >= self.patience:
                    break
        return scores, losses

    def _best(self, scores: np.ndarray, losses: np.ndarray) -> int:
        """Grid index of the best mean criterion over the splits (NaN rows are past the walk); ties go
        to the smaller C (stronger regularisation)."""
        criterion = -losses.mean(axis=1) if self.select_by == "loss" else scores.mean(axis=1)
        return int(np.flatnonzero(criterion == np.nanmax(criterion))[0])

    def fit(self, X, y):
        start = time.perf_counter()
        check_params(type(self).__name__, self.get_params(deep=False), self._parameter_ranges)
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise UserError(f"expected X of shape (n, d) and n labels; got X {X.shape} and {len(y)} labels")
        if not np.isfinite(X).all():
            rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
            raise UserError(f"{len(rows)} of {len(X)} training rows have features that are not finite (NaN or infinity), "
                            f"the first row {rows[0]}: extract them again, or leave those images out")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise UserError(f"a probe needs at least two classes in the training rows; found {self.classes_.tolist()}")
        Cs = np.sort(np.asarray(self.Cs, dtype=float))
        splits = self._splits(X, y, int(np.bincount(np.searchsorted(self.classes_, y)).min())) if len(Cs) > 1 else []
        if splits:
            self.cv_scores_, self.cv_losses_ = self._search_path(X, y, splits, Cs)
            best = self._best(self.cv_scores_, self.cv_losses_)
            self.best_C_, self.cv_score_ = float(Cs[best]), float(self.cv_scores_[best].mean())
            self.cv_loss_ = float(self.cv_losses_[best].mean())
            criterion = ("lowest held-out " + ("log-loss" if self.classifier == "logreg" else "squared hinge loss")
                         if self.select_by == "loss" else f"highest {self.scoring}")
            if self.search_plan(len(y))[0] == "cv":
                repeats = self.cv_repeats
                self.selection_ = f"C by {len(splits) // repeats}-fold CV" + (f" x {repeats}" if repeats > 1 else "")
            else:
                self.selection_ = f"C by a {self.val_fraction:.0%} validation split"
                if self.search == "cv":  # the rows are many: one held-out split, not k folds
                    self.selection_ += (f" of {len(y):,} training rows (one split above {self.cv_max_rows:,} rows, "
                                        f"not {self.cv}-fold CV" + (f" x {self.cv_repeats}" if self.cv_repeats > 1 else "") + ")")
            self.selection_ += f" ({criterion})"
        else:  # too few images per class to hold any out: the middle of the grid
            self.cv_scores_ = self.cv_losses_ = np.zeros((len(Cs), 0))
            self.best_C_, self.cv_score_ = float(Cs[len(Cs) // 2]), float("nan")
            self.cv_loss_ = float("nan")
            self.selection_ = ("C fixed at the grid's middle (too few images per class to hold any out)" if len(Cs) > 1
                               else "C fixed (one value given)")
        self.n_splits_ = len(splits)
        normalizer = make_normalizer(self.normalization, self.blocks)
        model = make_classifier(self.classifier, C=self.best_C_, max_iter=self.max_iter, seed=self.seed)
        with one_blas_thread():
            X = normalizer.fit_transform(X)
            span = RowSpan(X) if RowSpan.worthwhile(X) else None
            self.converged_ = _fit_quietly(model, X if span is None else span.train, y)
            if span is not None:  # the same weights on the features themselves
                model.coef_ = span.weights(model.coef_)
                model.n_features_in_ = X.shape[1]
        self.pipeline_ = Pipeline([("normalize", normalizer), ("classify", model)])
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def decision_function(self, X):
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.decision_function(np.asarray(X, dtype=np.float32))

    def predict(self, X):
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict(np.asarray(X, dtype=np.float32))


class NormalisedRows:
    """The training ``rows`` of a store's ``layer``, normalised, for the many passes of a streamed fit.

    ``fill`` reads the store once (gzip-compressed chunks: decompressing them was most of a pass)
    into a temporary file of float32 rows, which ``normalise`` then rewrites normalised: every later
    pass reads plain floats, and normalises nothing. The file is read with plain reads, not mapped,
    so its pages are the system's cache and not this process's memory. Where the temporary directory
    lacks the room, every pass reads and normalises the store instead. ``passes`` counts the passes
    over each source. Reads span at most ``chunk_rows`` rows of their source, in whole batches of
    ``batch_rows`` (at least one): the batches are the same whichever source serves them.
    """

    def __init__(self, store, layer: str, rows: np.ndarray, *, chunk_rows: int, batch_rows: int):
        self.store, self.layer, self.rows = store, layer, np.sort(np.asarray(rows))
        self.chunk_rows, self.batch_rows = chunk_rows, batch_rows
        self.width = fusion.dim(store, layer)
        self.file, self.normalizer = None, None
        self.passes = {"store": 0, "copy": 0}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # a TemporaryFile: removed on closing

    def _read_size(self, index: np.ndarray) -> int:
        size = rows_per_read(index, self.chunk_rows)
        return max(self.batch_rows, size - size % self.batch_rows)

    def fill(self):
        """Copy the rows into the temporary file, if it has the room (with a tenth to spare; a disk that
        fills up meanwhile, or a temporary folder not writable, leaves the passes to the store)."""
        needed = len(self.rows) * self.width * np.dtype(np.float32).itemsize
        if shutil.disk_usage(tempfile.gettempdir()).free < needed * 1.1:
            return self
        try:
            self.file = tempfile.TemporaryFile(prefix="offshelf-stream-")
            self.passes["store"] += 1
            for _, X in fusion.iter_chunks(self.store, self.layer, self.rows, self._read_size(self.rows)):
                self.file.write(np.ascontiguousarray(X, dtype=np.float32).data)
            self.file.flush()
        except OSError as error:
            if error.errno not in DISK_ERRNOS:
                raise
            if self.file is not None:
                self.file.close()
            self.file = None
        return self

    def _spans(self, positions: np.ndarray):
        """(first, stop, positions) of each read of the file at sorted ``positions``."""
        size = self._read_size(positions)
        for start in range(0, len(positions), size):
            block = positions[start : start + size]
            yield int(block[0]), int(block[-1]) + 1, block

    def _read(self, first: int, stop: int) -> np.ndarray:
        span = np.empty((stop - first, self.width), np.float32)
        self.file.seek(first * span.itemsize * self.width)
        self.file.readinto(memoryview(span).cast("B"))
        return span

    def raw(self):
        """The features as stored, a chunk at a time: a pass of the normaliser's fit."""
        return (X for _, X in self._chunks(self.rows, normalised=False))

    def normalise(self, normalizer):
        """Normalise the rows by ``normalizer`` (fitted on ``raw``): in the file, in one pass."""
        self.normalizer = normalizer
        if self.file is not None:
            self.passes["copy"] += 1
            for first, stop, _ in self._spans(np.arange(len(self.rows))):
                X = normalizer.transform(self._read(first, stop))
                self.file.seek(first * X.itemsize * self.width)
                self.file.write(np.ascontiguousarray(X, dtype=np.float32).data)
        return self

    def chunks(self, rows=None):
        """(rows, normalised features) of the sorted dataset ``rows`` (a subset of the training rows), a chunk at a time."""
        return self._chunks(self.rows if rows is None else rows, normalised=True)

    def _chunks(self, rows, normalised: bool):
        if self.file is None:
            self.passes["store"] += 1
            for block, X in fusion.iter_chunks(self.store, self.layer, rows, self._read_size(rows)):
                yield block, self.normalizer.transform(X) if normalised else X
            return
        self.passes["copy"] += 1
        positions = np.searchsorted(self.rows, rows)
        for first, stop, block in self._spans(positions):
            yield self.rows[block], self._read(first, stop)[block - first]


class StreamingSGDProbe(ClassifierMixin, BaseEstimator):
    """A linear probe by SGD over chunks of a store, for layers too large for memory.

    ``classifier`` names the objective: logistic regression (log-loss) or the linear SVM, trained on
    the hinge loss: SGD's "optimal" steps (1 / (alpha t) from the first) on the squared hinge, whose
    gradient grows with the margin violation, diverged on wide features (weights of 1e12 and more,
    test top-1 at chance on Fashion-MNIST's HOG and Lite0 rows, 81-82% with the hinge). C is still
    chosen by the held-out squared hinge, as in memory. The normaliser (``normalization``; ``blocks`` for a fused layer, read through
    ``classify.fusion``) is fitted in streaming passes over the training rows. ``alpha`` (the SGD
    form of 1 / (C n)) is chosen on a stratified validation part of the training rows by the lowest
    held-out loss, then the probe is refitted on all of them. Every C is trained side by side, each
    batch read once and fed to all of them (the same batches, in the same order, as each would see
    alone). After each epoch but the last the candidates are scored on the validation rows and only
    the best ``keep`` of them (by held-out loss, at least one) train on: successive halving at 0.5,
    where the search costs about two candidates' full training instead of one per C; 1 trains
    every C for every epoch. The rows are read from the store once and kept
    normalised in a temporary file (``NormalisedRows``). Every read spans at most ``chunk_rows`` rows
    (the memory a chunk takes); scikit-learn's SGD sees them ``batch_rows`` at a time, each batch
    shuffled, so the numbers do not depend on ``chunk_rows``. ``converged_`` is true when the
    weights changed by less than ``tol`` (relative to their norm) over the final refit's last epoch.
    ``passes_`` counts the passes over the training rows (of the store, of the normalised copy);
    ``selection_`` gives them (the time is ``fit_seconds_``, a row's own column).
    """

    _parameter_ranges = {"classifier": Names(CLASSIFIERS), "normalization": Names(NORMALIZATIONS), "blocks": OrNone(Several(POSITIVE)),
                         "Cs": C_GRID, "epochs": POSITIVE, "tol": number(0, None, closed="neither"), "chunk_rows": POSITIVE,
                         "batch_rows": POSITIVE, "val_fraction": VAL_FRACTIONS, "scoring": Names(SCORINGS), "keep": FRACTION, "seed": SEEDS}

    def __init__(self, classifier: str = "logreg", *, normalization: str = "standard", blocks: tuple[int, ...] | None = None,
                 Cs=DEFAULT_CS, epochs: int = 5, tol: float = 1e-2, chunk_rows: int = 4096, batch_rows: int = 256,
                 val_fraction: float = DEFAULT_VAL_FRACTION, scoring: str = "accuracy", keep: float = 0.5, seed: int = 0):
        self.classifier = classifier
        self.normalization = normalization
        self.blocks = blocks
        self.Cs = Cs
        self.epochs = epochs
        self.tol = tol
        self.chunk_rows = chunk_rows
        self.batch_rows = batch_rows
        self.val_fraction = val_fraction
        self.scoring = scoring
        self.keep = keep
        self.seed = seed

    def _epoch(self, data: NormalisedRows, rows, labels, models: list, rng):
        """One pass of ``partial_fit`` over ``rows``, every batch (shuffled by ``rng``) fed to each of ``models``."""
        for positions, X in data.chunks(rows):
            for start in range(0, len(positions), self.batch_rows):
                batch = start + rng.permutation(min(self.batch_rows, len(positions) - start))
                X_batch, y_batch = X[batch], labels[positions[batch]]
                for model in models:
                    model.partial_fit(X_batch, y_batch, classes=self.classes_)

    def _score(self, data: NormalisedRows, rows, labels, models: list) -> np.ndarray:
        """Held-out (score, loss) of each of ``models``: accuracy, or average precision of a binary probe; one pass."""
        decisions, losses = [[] for _ in models], np.zeros(len(models))
        for positions, X in data.chunks(rows):
            for i, model in enumerate(models):
                decisions[i].append(model.decision_function(X))
                losses[i] += held_out_loss(model, X, labels[positions]) * len(positions)
        y, held_out = labels[rows], []
        for found, loss in zip(decisions, losses):
            found = np.concatenate(found)
            if self.scoring == "average_precision":
                score = float(average_precision_score(y, found))
            else:
                score = float(np.mean(self.classes_[(found > 0).astype(int) if found.ndim == 1 else found.argmax(axis=1)] == y))
            held_out.append((score, loss / max(1, len(rows))))
        return np.array(held_out).reshape(len(models), 2)

    def _search(self, data: NormalisedRows, fit_rows, val_rows, labels, Cs) -> tuple[np.ndarray, int, int]:
        """Held-out (score, loss) of each C (NaN where it was dropped before the last epoch), the number
        of (C, epoch) fits made, and the grid index of the lowest final loss (ties: stronger regularisation)."""
        held_out = np.full((len(Cs), 2), np.nan)
        live = list(range(len(Cs)))
        models = {i: self._model(Cs[i], len(fit_rows)) for i in live}
        rng, fits = np.random.default_rng(self.seed), 0

        def by_loss(i):  # a diverged fit's loss (NaN or infinite) ranks last
            return (held_out[i, 1] if np.isfinite(held_out[i, 1]) else np.inf, i)

        for epoch in range(self.epochs):
            self._epoch(data, fit_rows, labels, [models[i] for i in live], rng)
            fits += len(live)
            kept = max(1, int(np.ceil(self.keep * len(live))))
            if epoch == self.epochs - 1 or kept < len(live):
                held_out[live] = self._score(data, val_rows, labels, [models[i] for i in live])
            if epoch < self.epochs - 1 and kept < len(live):
                ranked = sorted(live, key=by_loss)
                held_out[ranked[kept:]] = np.nan  # their training stops here
                live = sorted(ranked[:kept])
        return held_out, fits, min(live, key=by_loss)

    def _refit(self, data: NormalisedRows, labels, C: float) -> SGDClassifier:
        """``epochs`` passes over all training rows at ``C``; sets ``model.last_change_``, the relative
        change of the weights over the last pass (the convergence test: below ``tol``)."""
        model, rng, before = self._model(C, len(data.rows)), np.random.default_rng(self.seed), None
        for _ in range(self.epochs):
            if hasattr(model, "coef_"):
                before = model.coef_.copy()
            self._epoch(data, data.rows, labels, [model], rng)
        model.last_change_ = (float(np.linalg.norm(model.coef_ - before) / max(np.linalg.norm(model.coef_), 1e-12))
                              if before is not None else float("inf"))
        return model

    def fit_store(self, store, layer: str, rows, labels):
        """Fit on ``store``'s ``layer`` (a tap, or a fused layer) at dataset ``rows``; ``labels`` is indexed by row."""
        start = time.perf_counter()
        check_params(type(self).__name__, self.get_params(deep=False), self._parameter_ranges)
        rows = np.sort(np.asarray(rows))
        self.classes_ = np.unique(labels[rows])
        split = StratifiedShuffleSplit(n_splits=1, test_size=self.val_fraction, random_state=self.seed)
        train_idx, val_idx = next(split.split(rows, labels[rows]))
        fit_rows, val_rows = np.sort(rows[train_idx]), np.sort(rows[val_idx])
        Cs = np.sort(np.asarray(self.Cs, dtype=float))
        with NormalisedRows(store, layer, rows, chunk_rows=self.chunk_rows, batch_rows=self.batch_rows) as data:
            data.fill()
            data.normalise(fit_normalizer(self.normalization, data.raw, self.blocks))
            held_out, fits, best = self._search(data, fit_rows, val_rows, labels, Cs)
            self.cv_scores_, self.cv_losses_ = held_out[:, :1], held_out[:, 1:]
            self.best_C_, self.cv_score_ = float(Cs[best]), float(self.cv_scores_[best, 0])
            model = self._refit(data, labels, self.best_C_)
            self.pipeline_ = Pipeline([("normalize", data.normalizer), ("classify", model)])
            self.passes_ = dict(data.passes)
        self.n_splits_ = 1
        loss = "log-loss" if self.classifier == "logreg" else "squared hinge loss"
        trained = f"{len(Cs)} C{'s' if len(Cs) > 1 else ''} side by side" + (
            f", the best {self.keep:.0%} kept after each epoch ({fits} of {len(Cs) * self.epochs} C-epochs)" if fits < len(Cs) * self.epochs else "")
        read = f"{self.passes_['store']} of the store" + (f", {self.passes_['copy']} of a normalised copy" if self.passes_["copy"] else "")
        # The weights moved less than ``tol`` (relative) over the last epoch.
        self.converged_ = model.last_change_ < self.tol
        self.fit_seconds_ = time.perf_counter() - start
        self.selection_ = (f"C by a {self.val_fraction:.0%} validation split, by streaming SGD (lowest held-out {loss}; {trained}; "
                           f"{sum(self.passes_.values())} passes over the training rows with the refit ({read}))")
        return self

    def _model(self, C: float, n: int) -> SGDClassifier:
        return SGDClassifier(loss="log_loss" if self.classifier == "logreg" else "hinge", alpha=1.0 / (C * n),
                             learning_rate="optimal", shuffle=False, random_state=self.seed)

    def _fitted(self) -> Pipeline:
        if not hasattr(self, "pipeline_"):
            raise NotFittedError("StreamingSGDProbe is not fitted yet; call fit_store first")
        return self.pipeline_

    def predict(self, X):
        return self._fitted().predict(np.asarray(X, dtype=np.float32))

    def decision_function(self, X):
        return self._fitted().decision_function(np.asarray(X, dtype=np.float32))
