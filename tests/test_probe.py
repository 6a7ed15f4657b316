"""Linear probes: they learn, they record their choices, and test rows never influence the fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classify.evaluate import RESULT_COLUMNS, probe_store, update_results
from classify.metrics import mean_per_class_accuracy, per_class_accuracy
from classify.probe import NORMALIZATIONS, LinearProbe, parse_cs
from extract.datasets.base import ImageDataset
from extract.store import StoreWriter

RNG = np.random.default_rng(0)


def _blobs(n_per_class=30, dim=20, classes=3, spread=2.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_probe_learns_and_records_its_choices(classifier, normalization):
    X, y = _blobs()
    X_test, y_test = _blobs(seed=0, n_per_class=10)
    probe = LinearProbe(classifier, Cs=(0.01, 0.1, 1.0), cv=3, normalization=normalization).fit(X, y)
    assert probe.best_C_ in (0.01, 0.1, 1.0)
    assert probe.cv_scores_.shape == (3, 3) and probe.cv_folds_ == 3
    assert probe.converged_ in (True, False)
    assert probe.score(X_test, y_test) > 0.9


def test_probe_refuses_a_single_class():
    with pytest.raises(ValueError, match="at least two classes"):
        LinearProbe().fit(np.ones((4, 2)), np.zeros(4))


def test_parse_cs():
    assert parse_cs("1e-2:1e2:5") == pytest.approx((0.01, 0.1, 1.0, 10.0, 100.0))
    assert parse_cs("0.5,2") == (0.5, 2.0)


def test_mean_per_class_accuracy_weights_classes_equally():
    y_true = np.array([0, 0, 0, 0, 1])
    y_pred = np.array([0, 0, 0, 0, 0])
    assert mean_per_class_accuracy(y_true, y_pred) == pytest.approx(0.5)
    np.testing.assert_array_equal(per_class_accuracy(y_true, y_pred, [0, 1, 2]), [1.0, 0.0, np.nan])


def _store(path, X, y, splits):
    dataset = ImageDataset("blobs", ("a", "b", "c"), tuple(f"x{i}" for i in range(len(y))), y, tuple(splits), read=None)
    with StoreWriter(path, dataset=dataset, extractor="toy", fingerprint={"toy": 1}, taps=["layer"]) as writer:
        writer.write_shard(np.arange(len(y)), {"layer": X})
        writer.finalize()
    return path


def test_poisoned_test_rows_change_nothing_in_the_fit(tmp_path):
    X, y = _blobs(n_per_class=40)
    splits = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    poisoned = X.copy()
    poisoned[splits == "test"] = 1e6 * RNG.normal(size=poisoned[splits == "test"].shape)  # would wreck any scaler
    clean_fit, poisoned_fit = {}, {}
    clean_rows = probe_store(_store(tmp_path / "clean.h5", X, y, splits), Cs=(0.001, 0.1, 10.0), fitted=clean_fit, progress=False)
    probe_store(_store(tmp_path / "poisoned.h5", poisoned, y, splits), Cs=(0.001, 0.1, 10.0), fitted=poisoned_fit, progress=False)
    clean, dirty = clean_fit[("layer", "logreg")], poisoned_fit[("layer", "logreg")]
    assert clean.best_C_ == dirty.best_C_
    np.testing.assert_array_equal(clean.cv_scores_, dirty.cv_scores_)
    np.testing.assert_array_equal(clean.pipeline_["normalize"].mean_, dirty.pipeline_["normalize"].mean_)
    np.testing.assert_array_equal(clean.pipeline_["classify"].coef_, dirty.pipeline_["classify"].coef_)
    assert clean_rows[0]["n_train"] == 90 and clean_rows[0]["n_test"] == 30


def test_results_csv_replaces_rows_of_a_rerun(tmp_path):
    X, y = _blobs()
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits)
    csv = tmp_path / "results.csv"
    update_results(csv, probe_store(path, classifiers=("logreg", "svm"), Cs=(0.1, 1.0), progress=False))
    update_results(csv, probe_store(path, classifiers=("logreg",), Cs=(0.1, 1.0), seed=3, progress=False))
    table = pd.read_csv(csv)
    assert list(table.columns) == RESULT_COLUMNS
    assert len(table) == 2 and set(table["classifier"]) == {"logreg", "svm"}
    assert table.set_index("classifier").loc["logreg", "seed"] == 3
