"""The metrics the field reports."""

from __future__ import annotations

import numpy as np


def top1(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def per_class_accuracy(y_true, y_pred, labels) -> np.ndarray:
    """Accuracy within each class of ``labels`` (NaN for a class absent from ``y_true``)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return np.array([np.mean(y_pred[y_true == c] == c) if np.any(y_true == c) else np.nan for c in labels])


def mean_per_class_accuracy(y_true, y_pred) -> float:
    """Mean over the classes present in ``y_true`` of their accuracy (DeCAF, Kornblith et al.)."""
    return float(np.nanmean(per_class_accuracy(y_true, y_pred, np.unique(y_true))))
