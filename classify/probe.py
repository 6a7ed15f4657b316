"""Linear probes on frozen features, with C chosen on training data only.

``LinearProbe`` is a scikit-learn classifier: normalisation + logistic regression (L-BFGS)
or a linear SVM. ``fit`` cross-validates C over a log grid, each fold's normaliser
fitted on that fold's training part only, warm-starting along the C path, then refits
on all training rows with the chosen C. Test rows never reach ``fit``.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, Normalizer, StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.validation import check_is_fitted

CLASSIFIERS = ("logreg", "svm")
NORMALIZATIONS = ("standard", "l2", "sqrt", "none")
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))


def parse_cs(text: str) -> tuple[float, ...]:
    """``"1e-4:1e2:7"`` (log-spaced) or ``"0.01,0.1,1"``."""
    if ":" in text:
        low, high, count = text.split(":")
        return tuple(float(c) for c in np.logspace(np.log10(float(low)), np.log10(float(high)), int(count)))
    return tuple(float(c) for c in text.split(","))


def _signed_sqrt(x):
    return np.sign(x) * np.sqrt(np.abs(x))


def make_normalizer(normalization: str):
    if normalization == "standard":
        return StandardScaler()
    if normalization == "l2":
        return Normalizer(norm="l2")
    if normalization == "sqrt":
        return Pipeline([("sqrt", FunctionTransformer(_signed_sqrt)), ("l2", Normalizer(norm="l2"))])
    if normalization == "none":
        return FunctionTransformer()
    raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")


def make_classifier(classifier: str, *, C: float, max_iter: int, seed: int):
    if classifier == "logreg":
        return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, warm_start=True, random_state=seed)
    if classifier == "svm":
        return LinearSVC(C=C, max_iter=max_iter, random_state=seed, dual="auto")
    raise ValueError(f"classifier={classifier!r} is not one of {CLASSIFIERS}")


def _fit_quietly(model, X, y) -> bool:
    """Fit and return whether the solver converged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Normalise, then a linear classifier whose C is cross-validated on the training rows.

    After ``fit``: ``best_C_``, ``cv_scores_`` (n_Cs x folds accuracy), ``converged_``
    (of the final refit), ``fit_seconds_``, ``pipeline_`` (normaliser + classifier).
    """

    def __init__(self, classifier: str = "logreg", *, Cs=DEFAULT_CS, cv: int = 3, normalization: str = "standard", max_iter: int = 1000, seed: int = 0):
        self.classifier = classifier
        self.Cs = Cs
        self.cv = cv
        self.normalization = normalization
        self.max_iter = max_iter
        self.seed = seed

    def _path_scores(self, X_train, y_train, X_val, y_val, Cs) -> np.ndarray:
        normalizer = make_normalizer(self.normalization).fit(X_train)
        X_train, X_val = normalizer.transform(X_train), normalizer.transform(X_val)
        model = make_classifier(self.classifier, C=Cs[0], max_iter=self.max_iter, seed=self.seed)
        scores = []
        for C in Cs:  # small to large C: each fit starts from the previous solution
            model.set_params(C=C)
            _fit_quietly(model, X_train, y_train)
            scores.append(float(np.mean(model.predict(X_val) == y_val)))
        return np.asarray(scores)

    def fit(self, X, y):
        start = time.perf_counter()
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError(f"a probe needs at least two classes in the training rows; found {self.classes_.tolist()}")
        Cs = np.sort(np.asarray(self.Cs, dtype=float))
        smallest_class = int(np.bincount(np.searchsorted(self.classes_, y)).min())
        folds = min(self.cv, smallest_class)
        if len(Cs) > 1 and folds >= 2:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed)
            self.cv_scores_ = np.stack(
                [self._path_scores(X[tr], y[tr], X[va], y[va], Cs) for tr, va in splitter.split(X, y)], axis=1
            )
            mean = self.cv_scores_.mean(axis=1)
            self.best_C_ = float(Cs[int(np.flatnonzero(mean == mean.max())[0])])  # ties: stronger regularisation
        else:
            self.cv_scores_ = np.zeros((len(Cs), 0))
            self.best_C_ = float(Cs[len(Cs) // 2])
        self.cv_folds_ = folds if len(Cs) > 1 else 0
        self.pipeline_ = Pipeline([
            ("normalize", make_normalizer(self.normalization)),
            ("classify", make_classifier(self.classifier, C=self.best_C_, max_iter=self.max_iter, seed=self.seed)),
        ])
        self.converged_ = _fit_quietly(self.pipeline_, X, y)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def decision_function(self, X):
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.decision_function(np.asarray(X, dtype=np.float32))

    def predict(self, X):
        check_is_fitted(self, "pipeline_")
        return self.pipeline_.predict(np.asarray(X, dtype=np.float32))
