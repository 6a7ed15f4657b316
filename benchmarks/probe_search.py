"""C search: our LinearProbe against plain GridSearchCV on the same grid, folds and data.

Prints, per layer, the seconds of ours, of plain GridSearchCV (choosing C by the same
criterion, the held-out log-loss), and of GridSearchCV under
single-threaded BLAS (to show how much of the gain is that alone), the ratio to plain
GridSearchCV, the chosen C and the test accuracy of each; accuracies should agree within
0.5 point.

``--wide`` shows what the best recipe's search costs: our probe over the plain grid (1e-5..1e3,
9 values), over the wide one (1e-6..1e5, 12 values; the walk stops once the held-out loss has
turned), the wide one with the 3-fold CV repeated on 3 partitions (RECIPE=best), and
GridSearchCV over the whole wide grid: seconds, chosen C, test accuracy.

``--row-span`` compares instead our probe with and without fitting wide features in the
span of the training rows (``classify.probe.RowSpan``), on high-dimensional stores such as
HOG (8,100 values) or the Fisher vectors: seconds of each, ratio, chosen C, test accuracy.

    .venv/bin/python benchmarks/probe_search.py [--store features/fashion-mnist/efficientnet_lite0.h5]
    .venv/bin/python benchmarks/probe_search.py --wide [--store ...]
    .venv/bin/python benchmarks/probe_search.py --row-span --store features/flowers17/hog.h5 --layers hog
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import classify.probe as probe_module  # noqa: E402
from classify.probe import DEFAULT_CS, WIDE_CS, LinearProbe  # noqa: E402
from extract.store import FeatureStore  # noqa: E402


def timed_fit(X, y, folds: int, *, row_span: bool) -> tuple[LinearProbe, float]:
    worthwhile = probe_module.RowSpan.worthwhile
    if not row_span:
        probe_module.RowSpan.worthwhile = staticmethod(lambda X: False)
    try:
        start = time.perf_counter()
        probe = LinearProbe(Cs=DEFAULT_CS, cv=folds).fit(X, y)
        return probe, time.perf_counter() - start
    finally:
        probe_module.RowSpan.worthwhile = worthwhile


def compare_row_span(store, layers, folds: int) -> None:
    train, test = store.splits == "train", store.splits != "train"
    y_train, y_test = store.labels[train], store.labels[test]
    print(f"{store.path}: {train.sum()} train / {test.sum()} test; our probe without and with the row-span fit")
    print(f"{'layer':<12} {'dim':>7} {'full s':>8} {'span s':>8} {'ratio':>7} {'full C':>8} {'span C':>8} {'full %':>7} {'span %':>7}")
    for layer in layers:
        X_train, X_test = store.features(layer, train), store.features(layer, test)
        full, full_s = timed_fit(X_train, y_train, folds, row_span=False)
        span, span_s = timed_fit(X_train, y_train, folds, row_span=True)
        print(f"{layer:<12} {X_train.shape[1]:>7} {full_s:>8.1f} {span_s:>8.1f} {full_s / span_s:>6.1f}x {full.best_C_:>8.0e} "
              f"{span.best_C_:>8.0e} {100 * full.score(X_test, y_test):>7.2f} {100 * span.score(X_test, y_test):>7.2f}")


def _grid_search(Cs, folds: int) -> GridSearchCV:
    return GridSearchCV(
        Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))]),
        {"clf__C": list(Cs)}, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
        scoring="neg_log_loss",  # our probe's default criterion (select_by="loss")
    )


def compare_grids(store, layers, folds: int) -> None:
    train, test = store.splits == "train", store.splits != "train"
    y_train, y_test = store.labels[train], store.labels[test]
    runs = {"plain grid": dict(Cs=DEFAULT_CS), "wide grid": dict(Cs=WIDE_CS), "wide, CV x3": dict(Cs=WIDE_CS, cv_repeats=3)}
    print(f"{store.path}: {train.sum()} train / {test.sum()} test, {folds} folds; seconds / chosen C / test top-1 %")
    print(f"{'layer':<12} " + " ".join(f"{name:>24}" for name in [*runs, "GridSearchCV wide"]))
    totals = dict.fromkeys([*runs, "GridSearchCV wide"], 0.0)
    for layer in layers:
        X_train, X_test = store.features(layer, train), store.features(layer, test)
        cells = []
        for name, options in runs.items():
            start = time.perf_counter()
            ours = LinearProbe(cv=folds, **options).fit(X_train, y_train)
            seconds = time.perf_counter() - start
            totals[name] += seconds
            cells.append(f"{seconds:6.1f} s {ours.best_C_:7.0e} {100 * ours.score(X_test, y_test):6.2f}")
        grid = _grid_search(WIDE_CS, folds)
        start = time.perf_counter()
        with threadpool_limits(1):
            grid.fit(X_train, y_train)
        seconds = time.perf_counter() - start
        totals["GridSearchCV wide"] += seconds
        cells.append(f"{seconds:6.1f} s {grid.best_params_['clf__C']:7.0e} {100 * grid.best_estimator_.score(X_test, y_test):6.2f}")
        print(f"{layer:<12} " + " ".join(f"{c:>24}" for c in cells))
    print(f"{'total':<12} " + " ".join(f"{f'{v:.1f} s':>24}" for v in totals.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="features/fashion-mnist/efficientnet_lite0.h5")
    parser.add_argument("--layers", default="stage4,stage6,pre_logits")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--row-span", action="store_true", help="compare our probe with and without the row-span fit")
    parser.add_argument("--wide", action="store_true", help="the plain grid against the best recipe's wide grid and repeated CV")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    if args.wide:
        with FeatureStore(args.store) as store:
            compare_grids(store, args.layers.split(","), args.folds)
        return
    if args.row_span:
        with FeatureStore(args.store) as store:
            compare_row_span(store, args.layers.split(","), args.folds)
        return
    with FeatureStore(args.store) as store:
        train, test = store.splits == "train", store.splits != "train"
        y_train, y_test = store.labels[train], store.labels[test]
        print(f"{args.store}: {train.sum()} train / {test.sum()} test, grid of {len(DEFAULT_CS)} C values, {args.folds} folds")
        print(f"{'layer':<12} {'ours s':>8} {'GridSearchCV s':>15} {'1-thread s':>11} {'ratio':>7} {'ours C':>8} {'grid C':>8} {'ours %':>7} {'grid %':>7}")
        total_ours = total_grid = total_single = 0.0
        for layer in args.layers.split(","):
            X_train, X_test = store.features(layer, train), store.features(layer, test)
            start = time.perf_counter()
            ours = LinearProbe(Cs=DEFAULT_CS, cv=args.folds).fit(X_train, y_train)
            ours_s = time.perf_counter() - start
            grid = _grid_search(DEFAULT_CS, args.folds)
            start = time.perf_counter()
            grid.fit(X_train, y_train)
            grid_s = time.perf_counter() - start
            start = time.perf_counter()
            with threadpool_limits(1):
                grid.fit(X_train, y_train)
            single_s = time.perf_counter() - start
            total_ours, total_grid, total_single = total_ours + ours_s, total_grid + grid_s, total_single + single_s
            print(f"{layer:<12} {ours_s:>8.1f} {grid_s:>15.1f} {single_s:>11.1f} {grid_s / ours_s:>6.1f}x {ours.best_C_:>8.0e} "
                  f"{grid.best_params_['clf__C']:>8.0e} {100 * ours.score(X_test, y_test):>7.2f} {100 * grid.best_estimator_.score(X_test, y_test):>7.2f}")
        print(f"{'total':<12} {total_ours:>8.1f} {total_grid:>15.1f} {total_single:>11.1f} {total_grid / total_ours:>6.1f}x")


if __name__ == "__main__":
    main()
