"""How often, and by how much, the layer chosen by cross-validation loses to a fixed ``pre_logits``.

For each store, on the whole training split and on seeded few-shot draws of it (k images per
class), the layer is chosen three ways on the training rows only, and each choice's test mean
per-class accuracy is set against ``pre_logits``' (the conventional fixed choice):

* ``cv3``: the plain recipe, 3-fold CV (one partition);
* ``cv3x3``: the same folds repeated on 3 seeded partitions (the best recipe's search);
* ``cv3x3+fuse``: and the fused top-2 / top-3 taps as candidates (``classify.fusion``);
* ``cv3x3 1-SE``: the one-standard-error rule, among the taps whose CV score is within one
  standard error (over the 9 held-out parts) of the best, the highest tap.

Every probe is standardised logistic regression over the plain C grid, so the rule is all that
differs. Prints per (store, k): draws where the choice is below / above ``pre_logits``, and the
mean difference in points; then the mean over every draw.

    .venv/bin/python benchmarks/selection_noise.py --store features/flowers17/efficientnet_lite0.h5 [--store ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from classify import fusion  # noqa: E402
from classify.evaluate import few_shot_rows  # noqa: E402
from classify.metrics import mean_per_class_accuracy  # noqa: E402
from classify.probe import DEFAULT_CS, LinearProbe  # noqa: E402
from extract.store import FeatureStore  # noqa: E402

RULES = ("cv3", "cv3x3", "cv3x3+fuse", "cv3x3 1-SE")
REFERENCE = "pre_logits"


def _probe(X_train, y_train, X_test, y_test, repeats: int, blocks, seed: int) -> tuple[float, float, float]:
    """(CV score, test mean per-class accuracy, standard error of the CV score over the held-out parts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = LinearProbe(Cs=DEFAULT_CS, cv_repeats=repeats, blocks=blocks, seed=seed, n_jobs=1).fit(X_train, y_train)
    at_best = probe.cv_scores_[list(np.sort(DEFAULT_CS)).index(probe.best_C_)] if probe.n_splits_ else np.zeros(1)
    standard_error = float(np.std(at_best, ddof=1) / np.sqrt(len(at_best))) if len(at_best) > 1 else 0.0
    return probe.cv_score_, mean_per_class_accuracy(y_test, probe.predict(X_test)), standard_error


def one_draw(path: Path, shots: int | None, seed: int) -> dict:
    """The test mean per-class accuracy of each rule's choice and of ``pre_logits``, for one draw."""
    with FeatureStore(path) as store:
        labels, splits, taps = store.labels, store.splits, store.taps
        train = np.flatnonzero(splits == "train")
        test = np.flatnonzero(splits != "train")
        rows = train if shots is None else few_shot_rows(labels, train, shots, seed)
        features = {tap: store.features(tap) for tap in taps}
    y_train, y_test = labels[rows], labels[test]
    scored = {}
    for repeats in (1, 3):
        scored[repeats] = {tap: _probe(features[tap][rows], y_train, features[tap][test], y_test, repeats, None, seed) for tap in taps}
    fused = {}
    candidates = [{"layer": tap, "cv_score": result[0]} for tap, result in scored[3].items()]
    for name in fusion.candidates(candidates, (2, 3), taps):
        parts = fusion.parts(name)
        X = np.concatenate([features[p] for p in parts], axis=1)
        fused[name] = _probe(X[rows], y_train, X[test], y_test, 3, tuple(features[p].shape[1] for p in parts), seed)

    def chosen(table):  # (name, (cv, test)) of the highest CV score; ties to the higher tap
        return max(table.items(), key=lambda item: (item[1][0], max(taps.index(p) for p in fusion.parts(item[0]))))

    best_name, (best_cv, _, best_se) = chosen(scored[3])
    near = {tap: result for tap, result in scored[3].items() if result[0] >= best_cv - best_se}
    one_se = max(near.items(), key=lambda item: taps.index(item[0]))
    picks = {"cv3": chosen(scored[1]), "cv3x3": chosen(scored[3]), "cv3x3+fuse": chosen({**scored[3], **fused}), "cv3x3 1-SE": one_se}
    return {"reference": scored[1][REFERENCE][1], **{rule: (name, result[1]) for rule, (name, result) in picks.items()}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", required=True, help="a CNN store with a pre_logits tap (repeatable)")
    parser.add_argument("--shots", default="5,10,20", help="few-shot sizes (images per class); the whole training split is always run")
    parser.add_argument("--draws", type=int, default=5, help="seeded draws per few-shot size")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    shots = [int(k) for k in args.shots.split(",") if k]
    tasks = [(Path(store), k, seed) for store in args.store for k in [*shots, None]
             for seed in (range(args.draws) if k is not None else [0])]
    started = time.perf_counter()
    results = Parallel(n_jobs=args.jobs)(delayed(one_draw)(*task) for task in tasks)
    print(f"{'store':<44} {'k':>5} {'draws':>5}  " + "  ".join(f"{rule + ': below/above, mean':>32}" for rule in RULES))
    every = {rule: [] for rule in RULES}
    for store in args.store:
        for k in [*shots, None]:
            found = [r for (s, kk, _), r in zip(tasks, results) if str(s) == store and kk == k]
            cells = []
            for rule in RULES:
                differences = np.array([100 * (r[rule][1] - r["reference"]) for r in found])
                every[rule] += differences.tolist()
                cells.append(f"{int(np.sum(differences < 0)):>3} / {int(np.sum(differences > 0)):<3} {differences.mean():+7.2f} points")
            label = "all" if k is None else str(k)
            print(f"{store:<44} {label:>5} {len(found):>5}  " + "  ".join(f"{c:>32}" for c in cells))
            if k is None:
                print(" " * 57 + "chosen: " + ", ".join(f"{rule} {found[0][rule][0]}" for rule in RULES))
    print(f"{'every draw':<44} {'':>5} {len(every['cv3']):>5}  " + "  ".join(
        f"{int(np.sum(np.array(every[r]) < 0)):>3} / {int(np.sum(np.array(every[r]) > 0)):<3} {np.mean(every[r]):+7.2f} points".rjust(32)
        for r in RULES))
    print(f"({time.perf_counter() - started:.0f} s; mean per-class accuracy of the choice minus that of {REFERENCE}, test split)")


if __name__ == "__main__":
    main()
