"""``results.csv`` and ``layers.csv``: one row per experiment, merged under a lock, never torn.

Every row of ``results.csv`` is keyed by what determined it (``RESULT_KEY``: the store's
fingerprint, layer, classifier, protocol, normalisation, C search and criterion, C grid,
seed, repeats),
so a rerun with the same settings finds its rows (``cached``) and a store rebuilt with other
settings replaces its rows. Several commands may update the same file at once (two
``make classify`` of different stores, ``make tsne`` beside them): each read-merge-write
holds an exclusive ``flock`` on ``<file>.lock`` and publishes through a uniquely named
temporary file, fsync'ed and renamed, so no row is lost and no reader sees half a file.

Model selection reads ``cv_score`` only: the cross-validation (or validation-split) score
of a row's chosen C, computed on training rows. ``select_best`` is the one place that
picks "the best" of a set of rows; the test metric never takes part in it.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from classify import fusion
from extract.errors import UserError
from extract.fileio import atomic_write_text, remove_temporaries

log = logging.getLogger(__name__)

RESULT_COLUMNS = [
    "dataset", "features", "kind", "views", "recipe", "layer", "layer_depth", "classifier", "protocol", "train_split", "test_split",
    "normalization", "search", "select_by", "Cs", "selection", "C", "cv_score", "converged", "cv_splits", "seed", "repeats", "probe_version",
    "n_train", "n_test", "n_features", "classes_unseen_in_train",
    "top1", "top1_std", "mean_per_class_acc", "mean_per_class_acc_std", "mAP", "mAP_voc07", "images_without_features", "fit_seconds",
    "store_fingerprint", "settings", "created",
]
# The version of the code that turns a store into a probe row (classify/: probe.py, evaluate.py, metrics.py,
# fusion.py, recipe.py): bump it when a change there alters a row's numbers (CONTRIBUTING.md). Rows of another
# version are then refitted, never served from the cache, and left out of reports; rows of trained models and
# the stores are untouched.
PROBES_VERSION = 4
# What determines a row's numbers; a row with the same key is the same experiment.
# ``settings``: a trained run's settings (transfer.training.settings_text); empty for probes, whose settings are columns.
RESULT_KEY = ["dataset", "features", "store_fingerprint", "layer", "classifier", "protocol", "normalization", "search", "select_by", "Cs", "seed",
              "repeats", "probe_version", "settings"]
SORT_ORDER = ["features", "layer_depth", "layer", "classifier", "normalization", "protocol"]
# The settings besides layer, classifier and protocol that tell two rows of one store apart.
SETTING_COLUMNS = ["normalization", "search", "select_by", "Cs", "seed", "repeats", "probe_version", "settings"]
PROBE_KINDS = ("cnn", "baseline")  # rows of linear probes on a store; other kinds are trained models
# What a results.csv must hold to be read at all, and the range of each number a row may hold
# (low, high): a hand-edited cell outside it leaves its row out.
REQUIRED_COLUMNS = ("dataset", "features", "kind", "layer", "classifier", "protocol", "top1")
_FRACTION, _COUNT = (0.0, 1.0), (0.0, float("inf"))
RESULT_RANGES = {
    **dict.fromkeys(("top1", "top1_std", "mean_per_class_acc", "mean_per_class_acc_std", "mAP", "mAP_voc07", "cv_score"), _FRACTION),
    **dict.fromkeys(("layer_depth", "cv_splits", "seed", "n_train", "n_test", "n_features", "classes_unseen_in_train",
                     "images_without_features", "fit_seconds", "repeats", "C", "probe_version"), _COUNT),
}


@contextmanager
def locked(path: Path):
    """An exclusive lock on ``<path>.lock`` for a read-merge-write of ``path`` (released on exit or death)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# A text cell that a spreadsheet would run as a formula (OWASP, "CSV Injection"): one that begins
# with one of these. Such a cell is written with an apostrophe before it, and every text cell is
# quoted, so Excel and LibreOffice show it as the text it is; ``read_csv`` takes the apostrophe off.
# A cell that itself begins with an apostrophe gets one more, so that reading gives back every name.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def _text_columns(frame: pd.DataFrame) -> list:
    return [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c]) or pd.api.types.is_object_dtype(frame[c])]


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with each text cell that begins like a formula prefixed by an apostrophe."""
    columns = _text_columns(frame)
    if not columns:
        return frame
    safe = frame.copy()
    for column in columns:
        safe[column] = [f"'{v}" if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v for v in frame[column]]
    return safe


def restore_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """What ``neutralise_formulas`` wrote, as it was."""
    for column in _text_columns(frame):
        values = frame[column]
        if any(isinstance(v, str) and v.startswith("'") for v in values):
            frame[column] = [v[1:] if isinstance(v, str) and v.startswith("'") and v[1:].startswith(FORMULA_STARTS) else v for v in values]
    return frame


def to_csv_text(frame: pd.DataFrame, **to_csv) -> str:
    """The CSV offshelf writes for ``frame``: spreadsheet formulas neutralised, text cells quoted."""
    return neutralise_formulas(frame).to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n", **to_csv)


def write_csv(frame: pd.DataFrame, path: str | Path, **to_csv) -> Path:
    """``frame`` as a CSV at ``path`` (``to_csv_text``), written atomically: a temporary file, fsync'ed and renamed."""
    return atomic_write_text(path, to_csv_text(frame, **to_csv))


def read_csv(path: str | Path, **read_csv) -> pd.DataFrame:
    """A CSV offshelf wrote, as it was before ``write_csv`` (formula-neutralised cells restored)."""
    return restore_formulas(pd.read_csv(path, **read_csv))


def update_csv(path: str | Path, merge: Callable[[pd.DataFrame | None], pd.DataFrame], *, read: Callable = read_csv,
               **to_csv) -> pd.DataFrame:
    """Under the file's lock: ``read`` it (None when absent), ``merge`` it, write the result atomically."""
    path = Path(path)
    with locked(path):
        remove_temporaries(path)  # under the lock no other writer has one open: any left is from a killed one
        merged = merge(read(path) if path.is_file() else None)
        write_csv(merged, path, **to_csv)
    return merged


def row_keys(frame: pd.DataFrame, key=RESULT_KEY) -> list[tuple]:
    """Each row's values of the ``key`` columns, as strings, as they read back from a CSV: 5 and 5.0
    agree (an integer column with empty cells reads back as floats), and so do "" and a missing value."""
    def text(value) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return ""
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)

    return list(map(tuple, frame.reindex(columns=key).astype(object).map(text).to_numpy()))


def merge_rows(old: pd.DataFrame | None, new: pd.DataFrame, *, key, sort_by, drop=None) -> pd.DataFrame:
    """``old`` rows without those whose key is in ``new`` (nor those ``drop`` marks), then ``new``, sorted."""
    if old is not None and len(old):
        old = old.reindex(columns=new.columns)
        keys = set(row_keys(new, key))
        keep = np.asarray([k not in keys for k in row_keys(old, key)], bool)
        if drop is not None:
            keep &= ~drop(old)
        new = pd.concat([old[keep], new], ignore_index=True) if keep.any() else new
    return new.sort_values(sort_by, kind="stable")


def output_stem(row) -> str:
    """The file name (without suffix) of a row's predictions and saved probe, one per result key:
    ``<layer>__<classifier>__<protocol>__<id of the other settings>``."""
    values = ["" if pd.isna(row.get(c)) else str(row.get(c)) for c in SETTING_COLUMNS]  # as results.csv reads back
    settings = hashlib.sha256("|".join(values).encode()).hexdigest()[:8]
    name = f"{row['layer']}__{row['classifier']}__{row['protocol']}"
    return f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', name)}__{settings}"


def output_path(results_dir: str | Path, folder: str, row, suffix: str) -> Path:
    """Where a row's per-row file lives: ``<results>/<folder>/<features>/<output_stem(row)><suffix>``
    (``folder``: ``PREDICTIONS`` or ``PROBES``)."""
    return Path(results_dir) / folder / str(row["features"]) / f"{output_stem(row)}{suffix}"


PREDICTIONS, PROBES = "predictions", "probes"
PREDICTION_COLUMNS = ("path", "label", "predicted")


def write_predictions(results_dir: str | Path, row, paths, labels, predicted) -> Path:
    """A row's test predictions (image path, true and predicted class name), atomically."""
    path = output_path(results_dir, PREDICTIONS, row, ".csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_csv(pd.DataFrame(dict(zip(PREDICTION_COLUMNS, (paths, labels, predicted)))), path)


def read_predictions(results_dir: str | Path, row) -> pd.DataFrame | None:
    """What ``write_predictions`` wrote for ``row``, as text; None when absent or not of that form."""
    path = output_path(results_dir, PREDICTIONS, row, ".csv")
    if not path.is_file():
        return None
    frame = read_csv(path, dtype=str, keep_default_na=False)
    return frame if set(PREDICTION_COLUMNS) <= set(frame.columns) else None


def read_results(csv_path: str | Path) -> pd.DataFrame | None:
    """``results.csv`` checked against its columns (``check_results``; None when absent)."""
    csv_path = Path(csv_path)
    return check_results(csv_path) if csv_path.is_file() else None


def _row_problem(row: dict) -> str | None:
    """What is wrong with one results.csv row (its cells as text), or None."""
    for column in REQUIRED_COLUMNS:
        if column != "top1" and not row.get(column):
            return f"{column} is empty"
    for column, (low, high) in RESULT_RANGES.items():
        cell = row.get(column) or ""
        if not cell:
            continue
        try:
            value = float(cell)
        except ValueError:
            return f"{column}={cell!r} is not a number"
        if not low <= value <= high:
            return f"{column}={cell} is outside [{low:g}, {high:g}]"
    return None


def check_results(csv_path: Path) -> pd.DataFrame:
    """Read a results.csv that may have been edited by hand: a missing required column (or a file
    that is not UTF-8 CSV) is one ``UserError``; a row with the wrong number of fields, an empty
    required cell, or a number that is not one or outside its range (``top1=7``) is named by its line
    in a warning and left out, so it takes no part in rankings. An empty file has no rows."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows, end = [], reader.line_num
            for row in reader:
                rows.append((end + 1, row))
                end = reader.line_num
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{csv_path} is not a UTF-8 CSV file ({error}); restore it, or delete it and rerun `make classify`") from None
    if header is None:
        log.warning("%s is empty: no results in it", csv_path)
        return pd.DataFrame(columns=RESULT_COLUMNS)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{csv_path} lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)} (it has {', '.join(header) or 'none'}); "
                        "restore it, or delete it and rerun `make classify`")
    good = []
    for line, cells in rows:
        if not any(cells):
            continue
        problem = (f"{len(cells)} fields where the header has {len(header)}" if len(cells) != len(header)
                   else _row_problem(dict(zip(header, cells))))
        if problem is None:
            good.append(cells)
        else:
            log.warning("%s:%d: %s; this row is left out (and dropped when the file is next written)", csv_path, line, problem)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *good])
    text.seek(0)
    return restore_formulas(pd.read_csv(text)).reindex(columns=RESULT_COLUMNS)


def update_results(csv_path: str | Path, rows: list[dict]) -> pd.DataFrame:
    """Merge ``rows`` into ``results.csv``. A row replaces the one with the same key, and the
    rows of a store made with other settings (same features name, other fingerprint) go, as do
    probe rows of another ``PROBES_VERSION`` (made by code whose numbers differ)."""
    new = pd.DataFrame(rows, columns=RESULT_COLUMNS)

    probes = new[new["kind"].isin(PROBE_KINDS)]
    current = probes.groupby(["dataset", "features"])["store_fingerprint"].agg(lambda s: set(s.astype(str))).to_dict()

    def rebuilt(old: pd.DataFrame) -> np.ndarray:  # probe rows of a store whose fingerprint is not the current one, or of other code
        stale = stale_probe_rows(old)
        return np.asarray([is_stale or (kind in PROBE_KINDS and (d, f) in current and str(fp) not in current[(d, f)])
                           for is_stale, (kind, d, f, fp) in zip(stale, old[["kind", "dataset", "features", "store_fingerprint"]].itertuples(index=False))], bool)

    return update_csv(csv_path, lambda old: merge_rows(old, new, key=RESULT_KEY, sort_by=SORT_ORDER, drop=rebuilt), read=check_results)


def cached_rows(results: pd.DataFrame | None, expected: list[dict]) -> list[dict] | None:
    """The stored rows for every key in ``expected`` (partial rows holding the key columns), or None
    if any is missing."""
    if results is None or results.empty:
        return None
    index = {key: i for i, key in enumerate(row_keys(results))}
    found = [index.get(key) for key in row_keys(pd.DataFrame(expected, columns=RESULT_KEY))]
    if any(i is None for i in found):
        return None
    return [row.to_dict() for _, row in results.iloc[found].iterrows()]


def select_best(rows: pd.DataFrame) -> pd.Series | None:
    """The row with the highest ``cv_score`` (training data only); ties go to the first in
    features, layer and classifier order. Rows without a selection score are never chosen."""
    scored = rows[pd.to_numeric(rows["cv_score"], errors="coerce").notna()]
    if scored.empty:
        return None
    ordered = scored.sort_values(["cv_score", "features", "layer_depth", "classifier"], ascending=[False, True, True, True], kind="stable")
    return ordered.iloc[0]


def best_per(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """``select_best`` within each group of ``by``."""
    chosen = [select_best(group) for _, group in rows.groupby(by, sort=False)]
    return pd.DataFrame([row for row in chosen if row is not None])


def stale_probe_rows(results: pd.DataFrame) -> np.ndarray:
    """Which rows are probes made by another ``PROBES_VERSION`` (or before rows recorded one)."""
    version = pd.to_numeric(results["probe_version"], errors="coerce") if "probe_version" in results else pd.Series(np.nan, index=results.index)
    return np.asarray(results["kind"].isin(PROBE_KINDS) & (version != PROBES_VERSION), bool)


def live_rows(results: pd.DataFrame, stores: dict[str, dict] | None) -> pd.DataFrame:
    """Rows of probes whose store still exists with the same fingerprint and layer (every tap of a fused
    layer), made by this ``PROBES_VERSION``; trained models' rows (no store) are kept. ``stores``:
    extractor -> {"fingerprint_id", "taps"}; None keeps every store's."""
    results = results[~stale_probe_rows(results)]
    if stores is None:
        return results
    probe = results["kind"].isin(PROBE_KINDS)
    alive = [
        not is_probe or (features in stores and str(fingerprint) == stores[features]["fingerprint_id"]
                         and set(fusion.parts(str(layer))) <= set(stores[features]["taps"]))
        for is_probe, features, fingerprint, layer in zip(probe, results["features"], results["store_fingerprint"], results["layer"])
    ]
    return results[np.asarray(alive, bool)]
