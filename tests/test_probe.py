"""Linear probes: they learn, they record their choices, and test rows never influence the fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classify.evaluate import RESULT_COLUMNS, Evaluation, ProbeSettings, parse_protocol, update_results
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
    assert probe.cv_scores_.shape == (3, 3) and probe.n_splits_ == 3
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
    settings = ProbeSettings(Cs=(0.001, 0.1, 10.0))
    clean_rows = Evaluation(_store(tmp_path / "clean.h5", X, y, splits), parse_protocol("given"), settings, fitted=clean_fit).run(progress=False)
    Evaluation(_store(tmp_path / "poisoned.h5", poisoned, y, splits), parse_protocol("given"), settings, fitted=poisoned_fit).run(progress=False)
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
    given = parse_protocol("given")
    update_results(csv, Evaluation(path, given, ProbeSettings(("logreg", "svm"), Cs=(0.1, 1.0))).run(progress=False))
    update_results(csv, Evaluation(path, given, ProbeSettings(("logreg",), Cs=(0.1, 1.0), seed=3)).run(progress=False))
    table = pd.read_csv(csv)
    assert list(table.columns) == RESULT_COLUMNS
    assert len(table) == 2 and set(table["classifier"]) == {"logreg", "svm"}
    assert table.set_index("classifier").loc["logreg", "seed"] == 3


def test_average_precision_matches_scikit_learn_and_voc07():
    from sklearn.metrics import average_precision_score

    from classify.metrics import average_precision, confusion, mean_average_precision

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    scores = y + rng.normal(0, 0.8, 200)
    area = average_precision(y, scores)
    assert area == pytest.approx(average_precision_score(y, scores), abs=0.02)  # same curve, monotone envelope
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], eleven_point=True) == pytest.approx((6 * 1.0 + 5 * (2 / 3)) / 11)
    assert average_precision([1, -1, 0], [0.1, 0.9, 0.5]) == pytest.approx(0.5)  # the difficult row is ignored
    Y = np.stack([y, 1 - y], axis=1)
    assert mean_average_precision(Y, np.stack([scores, -scores], axis=1)) == pytest.approx(
        (area + average_precision(1 - y, -scores)) / 2)
    np.testing.assert_array_equal(confusion(["a", "b", "b"], ["a", "a", "b"], ["a", "b"]), [[1, 0], [1, 1]])


# -- protocols, persistence, streaming ------------------------------------------------------------

def _domains_store(path, seed=0):
    """Three classes, two 'domains' whose features differ by a shift."""
    X, y = _blobs(n_per_class=40, seed=seed)
    domain = np.where(np.arange(len(y)) % 2 == 0, "amazon", "webcam")
    X[domain == "webcam"] += 0.5
    splits = np.where(np.arange(len(y)) % 5 == 0, "test", "train")
    splits = np.where(domain == "webcam", "webcam", splits)
    return _store(path, X, y, splits)


def test_few_shot_rows_report_mean_and_std(tmp_path):
    X, y = _blobs(n_per_class=30)
    path = _store(tmp_path / "s.h5", X, y, np.where(np.arange(len(y)) % 3 == 0, "test", "train"))
    rows = Evaluation(path, parse_protocol("fewshot:1,5"), ProbeSettings(Cs=(0.1, 1.0), repeats=3)).run(progress=False)
    assert [r["protocol"] for r in rows] == ["1-shot", "5-shot"]
    assert [r["n_train"] for r in rows] == [3, 15]
    assert all(r["repeats"] == 3 and r["top1_std"] >= 0 for r in rows)
    assert rows[1]["top1"] > 0.8


def test_transfer_protocol_trains_on_one_domain_and_tests_on_another(tmp_path):
    path = _domains_store(tmp_path / "office.h5")
    row, = Evaluation(path, parse_protocol("transfer:train->webcam"), ProbeSettings(Cs=(0.1, 1.0))).run(progress=False)
    assert (row["protocol"], row["train_split"], row["test_split"]) == ("transfer:train->webcam", "train", "webcam")
    assert row["n_test"] == 60 and row["top1"] > 0.8
    with pytest.raises(ValueError, match="no 'dslr' split"):
        Evaluation(path, parse_protocol("transfer:train->dslr"), ProbeSettings()).run(progress=False)


def test_cross_dataset_protocol_needs_the_same_extractor(tmp_path):
    X, y = _blobs(n_per_class=30)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    source = _store(tmp_path / "source" / "toy.h5", X, y, splits)
    X_other, y_other = _blobs(n_per_class=10, seed=0)
    _store(tmp_path / "other" / "toy.h5", X_other, y_other, np.full(len(y_other), "test"))
    row, = Evaluation(source, parse_protocol("cross:other"), ProbeSettings(Cs=(0.1,))).run(progress=False)
    assert row["test_split"] == "other:test" and row["n_test"] == 30 and row["top1"] > 0.8
    with pytest.raises(ValueError, match="is not one of"):
        parse_protocol("sideways")


def test_saved_probe_round_trip_and_refusals(tmp_path):
    from classify.persist import SavedProbe, save_probe
    from extract.store import FeatureStore, StoreMismatchError

    X, y = _blobs(n_per_class=30)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits)
    for normalization in NORMALIZATIONS:
        probe = LinearProbe(Cs=(0.1, 1.0), normalization=normalization).fit(X[splits == "train"], y[splits == "train"])
        saved_path = save_probe(tmp_path / "p.npz", probe, class_names=["a", "b", "c"], layer="layer", features="toy", fingerprint={"toy": 1})
        saved = SavedProbe.load(saved_path)
        with FeatureStore(path) as store:
            saved.check_store(store)
            expected = [["a", "b", "c"][i] for i in probe.predict(store.features("layer"))]
            assert saved.predict(store.features("layer")) == expected
    with np.load(saved_path) as raw:
        assert all(raw[k].dtype != object for k in raw.files)  # nothing pickled
    other = tmp_path / "other.h5"
    dataset = ImageDataset("blobs", ("a", "b", "c"), tuple(f"x{i}" for i in range(len(y))), y, tuple(splits), read=None)
    with StoreWriter(other, dataset=dataset, extractor="toy", fingerprint={"toy": 2}, taps=["layer"]) as writer:
        writer.write_shard(np.arange(len(y)), {"layer": X})
        writer.finalize()
    with FeatureStore(other) as store, pytest.raises(StoreMismatchError, match="toy: 2 in the store, 1 now"):
        saved.check_store(store)
    with pytest.raises(ValueError, match=r"expects \(n, 20\) features"):
        saved.predict(np.zeros((2, 7)))


def test_streaming_sgd_probe_reads_chunks(tmp_path):
    from classify.probe import StreamingSGDProbe
    from extract.store import FeatureStore

    X, y = _blobs(n_per_class=60, dim=10)
    splits = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits)
    with FeatureStore(path) as store:
        train = np.flatnonzero(store.splits == "train")
        probe = StreamingSGDProbe(Cs=(0.1, 10.0), chunk_rows=16, epochs=3).fit_store(store, "layer", train, store.labels)
        test = store.splits == "test"
        assert probe.best_C_ in (0.1, 10.0)
        assert np.mean(probe.predict(store.features("layer", test)) == store.labels[test]) > 0.9
