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


def confusion(y_true, y_pred, labels) -> np.ndarray:
    """Counts: row = true class, column = predicted class, in the order of ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        matrix[index[t], index[p]] += 1
    return matrix


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
