"""The metrics the field reports. Accuracy, mean per-class accuracy and confusion matrices
are scikit-learn's; what no library has is here: VOC-style average precision with
"difficult" rows ignored, and the VOC 2007 11-point variant."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score


def mean_per_class_accuracy(y_true, y_pred) -> float:
    """Mean over the classes present in ``y_true`` of their accuracy (DeCAF, Kornblith et al.):
    scikit-learn's ``balanced_accuracy_score``. A predicted class that no test image has
    counts against the images so predicted, and is not a class of its own."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y_true, y_pred))


def average_precision(y_true, scores, *, eleven_point: bool = False) -> float:
    """Average precision of one class: area under the precision-recall curve, with
    precision made monotone (VOC 2010+), or the VOC 2007 mean of the interpolated
    precision at recall 0, 0.1, ..., 1. ``y_true`` is 1 for positives, 0 for negatives;
    rows marked -1 ("difficult" in VOC) are ignored."""
    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=float)
    keep = y_true >= 0
    y_true, scores = y_true[keep], scores[keep]
    positives = int(np.sum(y_true == 1))
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = (y_true[order] == 1).astype(float)
    true_positives = np.cumsum(hits)
    recall = true_positives / positives
    precision = true_positives / np.arange(1, len(hits) + 1)
    if eleven_point:
        return float(np.mean([precision[recall >= r].max() if np.any(recall >= r) else 0.0 for r in np.linspace(0, 1, 11)]))
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    recall_steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(recall_steps * envelope))


def mean_average_precision(Y_true, scores, *, eleven_point: bool = False) -> float:
    """mAP over the columns (classes) of a multi-label target matrix (1 / 0 / -1 difficult)."""
    Y_true, scores = np.asarray(Y_true), np.asarray(scores)
    return float(np.nanmean([average_precision(Y_true[:, c], scores[:, c], eleven_point=eleven_point) for c in range(Y_true.shape[1])]))
