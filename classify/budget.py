"""How much memory a probe's fit needs, against the memory budget of ``make classify``.

``in_memory_peak`` estimates the peak bytes of ``classify.probe.LinearProbe.fit`` on ``rows`` training
rows of ``width`` values from what the fit holds at once: the training rows as read (and their float32
copy when the store holds another type), the copies each C-search split makes (its rows taken out,
then normalised; ``StandardScaler`` computes the variance through a float64 copy), the span of the
training rows for wide features (``RowSpan``: a float64 copy, the Gram matrix and its
eigendecomposition's workspace), and the solver's working set (L-BFGS: a few numbers per row and
class; liblinear: the rows again in float64 and as its own sparse nodes of 16 bytes a value). The
final refit on all rows repeats the normalised copy and the span. The peak is the held rows plus
the larger of the search and the refit. ``streaming_peak`` is the same for one chunk of the
streaming SGD probe (its Cs trained side by side). Calibrated against the peak RSS of real fits (``benchmarks/budget_calibration.py``).

A candidate whose estimate is over the budget is fitted by the streaming SGD probe instead
(``classify.evaluate``), its chunks sized by ``streaming_chunk_rows``.
"""

from __future__ import annotations

import re

from extract.errors import UserError

GIB = 2**30
DEFAULT_MEMORY_BUDGET = 8 * GIB
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# What a Python process with numpy, scikit-learn and h5py holds before it reads a feature.
INTERPRETER_BYTES = 280 * 2**20
FLOAT32, FLOAT64, MASK = 4, 8, 1
LIBLINEAR_NODE = 16  # struct feature_node {int index; double value;}, padded
# The solver's own vectors per (row, class): L-BFGS's raw predictions, probabilities and gradients.
LBFGS_PER_ROW_CLASS = 6 * FLOAT64
# The streaming probe feeds scikit-learn's SGD this many rows at a time, whatever the chunk read:
# its numbers do not depend on the budget.
STREAM_BATCH_ROWS = 256


def parse_bytes(text: str) -> int:
    """``8G``, ``512M``, ``1.5G``, ``64K``, ``8GiB``, or a number of bytes; binary units (1G = 2**30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    value = float(match.group(1)) * UNITS[match.group(2).upper()] if match else 0
    if value < 1:
        raise UserError(f"memory budget {text!r}: give bytes, or a number with K, M, G or T (binary units), e.g. 8G or 512M")
    return int(value)


def describe_bytes(count: float) -> str:
    """``count`` bytes to three digits in the largest binary unit it fills: 35.1 GiB, 512 MiB, 1020 MiB."""
    for unit in ("T", "G", "M", "K"):
        if count >= UNITS[unit]:
            value = count / UNITS[unit]
            return f"{value:.3g} {unit}iB" if value < 1000 else f"{value:.0f} {unit}iB"
    return f"{int(count)} B"


def _span_bytes(rows: int, width: int) -> int:
    """``RowSpan`` of ``rows`` training rows, at its peak: their float64 copy, the Gram matrix, LAPACK's
    copy of it, the eigenvectors and the divide-and-conquer workspace (about two more)."""
    return rows * width * FLOAT64 + 5 * rows * rows * FLOAT64 if width > rows else 0


def _solver_bytes(classifier: str, rows: int, width: int, classes: int) -> int:
    if classifier == "svm":
        return rows * width * (FLOAT64 + LIBLINEAR_NODE)
    return rows * max(classes, 2) * LBFGS_PER_ROW_CLASS


def _normalised_then(fit_rows: int, rows: int, width: int, after: int) -> int:
    """Normalising ``rows`` rows (the scaler fitted on ``fit_rows`` of them: its float64 deviations from
    the mean and NaN mask), then holding the float32 result while ``after`` more bytes are used."""
    return max(fit_rows * width * (FLOAT64 + MASK), rows * width * FLOAT32 + after)


def in_memory_peak(rows: int, width: int, *, classes: int, classifier: str = "logreg", splits: int = 3,
                   held_out_fraction: float | None = None, split_workers: int = 1, itemsize: int = FLOAT32) -> int:
    """Estimated peak bytes of a ``LinearProbe`` fit on ``rows`` x ``width`` features (``itemsize`` bytes
    a value as stored) with ``splits`` C-search splits, each holding out ``held_out_fraction`` of the
    rows (default ``1 / splits``, k-fold CV); ``split_workers`` of them prepared and fitted at once in
    worker processes (1: in this process)."""
    values = rows * width
    held = values * itemsize + (values * FLOAT32 if itemsize != FLOAT32 else 0)
    checking = values * MASK  # the finite check's mask
    fit_rows = rows - round(rows * (held_out_fraction if held_out_fraction is not None else 1 / max(splits, 1))) if splits else rows
    wide = width > fit_rows
    solver_width = fit_rows if wide else width
    prepared = rows * solver_width * FLOAT32  # one split's training and held-out rows, normalised (in the span)
    # Preparing a split: its rows taken out (float32), normalised, then their span and the held-out
    # rows' coordinates in it (float64 copies of both parts).
    preparing = values * FLOAT32 + _normalised_then(fit_rows, rows, width, max(_span_bytes(fit_rows, width),
                                                                                 values * FLOAT64 if wide else 0))
    solving = _solver_bytes(classifier, fit_rows, solver_width, classes)
    if split_workers > 1:  # the parent holds every split's rows, the workers' shared copies and their results
        search = splits * (values * FLOAT32 * 2 + prepared) + split_workers * max(preparing, prepared + solving)
    else:
        search = max((splits - 1) * prepared + preparing, splits * prepared + solving) if splits else 0
    refit = _normalised_then(rows, rows, width, max(_span_bytes(rows, width), _solver_bytes(classifier, rows, min(width, rows), classes)))
    return INTERPRETER_BYTES + held + max(checking, search, refit)


def streaming_peak(chunk_rows: int, width: int, *, classes: int, candidates: int = 1) -> int:
    """Estimated peak bytes of the streaming SGD probe reading ``chunk_rows`` rows at a time: the read,
    its selected rows and finite mask, the normalised chunk, one shuffled batch, and the models: the
    weights of the ``candidates`` (Cs) trained side by side and one class's working copy, or the
    refit's weights and the previous epoch's copy; and the scaler's statistics."""
    chunk = chunk_rows * width * (2 * FLOAT32 + MASK + FLOAT32)
    batch = min(chunk_rows, STREAM_BATCH_ROWS) * width * FLOAT32
    model = (max(candidates + 1, 3) * max(classes, 2) + 4) * width * FLOAT64
    return INTERPRETER_BYTES + chunk + batch + model


def rows_per_read(rows, span_rows: int) -> int:
    """How many of the sorted dataset ``rows`` one read may take for it to span about ``span_rows`` rows
    of the store (``FeatureStore.iter_chunks`` reads from a chunk's first row to its last): fewer
    where ``rows`` are spread out, as a validation or test split among the others is."""
    if not len(rows):
        return 1
    return max(1, span_rows * len(rows) // (int(rows[-1]) - int(rows[0]) + 1))


def streaming_chunk_rows(budget: int, width: int, *, classes: int, candidates: int = 1) -> int:
    """The most rows of the store a chunk of the streaming probe (or of a prediction) may span within
    ``budget`` (at least one batch of ``STREAM_BATCH_ROWS``), ``candidates`` Cs trained side by side."""
    fixed = streaming_peak(0, width, classes=classes, candidates=candidates) + STREAM_BATCH_ROWS * width * FLOAT32
    per_row = width * (3 * FLOAT32 + MASK)
    fits = max(0, budget - fixed) // per_row
    return int(max(fits, STREAM_BATCH_ROWS))
