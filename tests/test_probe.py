"""Linear probes: they learn, they record their choices, and test rows never influence the fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classify.evaluate import Evaluation, ProbeSettings, parse_protocol
from classify.metrics import mean_per_class_accuracy
from classify.probe import NORMALIZATIONS, LinearProbe, parse_cs
from extract.errors import UserError
from classify.results import PROBES_VERSION, RESULT_COLUMNS, update_results
from extract.datasets.base import ImageDataset
from extract.store import StoreWriter

RNG = np.random.default_rng(0)


def _blobs(n_per_class=30, dim=20, classes=3, spread=2.0, seed=0):
    """Gaussian classes around centres that are the same for every seed; ``seed`` draws the points,
    so test blobs drawn with another seed share no row with the training blobs."""
    centres = np.random.default_rng(1234).normal(0, spread, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + np.random.default_rng(seed).normal(0, 1, (len(y), dim))).astype(np.float32), y


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_probe_learns_and_records_its_choices(classifier, normalization):
    X, y = _blobs()
    X_test, y_test = _blobs(seed=1, n_per_class=10)
    probe = LinearProbe(classifier, Cs=(0.01, 0.1, 1.0), cv=3, normalization=normalization).fit(X, y)
    assert probe.best_C_ in (0.01, 0.1, 1.0)
    assert probe.cv_scores_.shape == probe.cv_losses_.shape == (3, 3) and probe.n_splits_ == 3
    # C has the lowest mean held-out loss; the selection score is the mean held-out accuracy there
    chosen = [0.01, 0.1, 1.0].index(probe.best_C_)
    assert chosen == np.argmin(probe.cv_losses_.mean(axis=1))
    assert probe.cv_score_ == pytest.approx(probe.cv_scores_[chosen].mean())
    loss = "log-loss" if classifier == "logreg" else "squared hinge loss"
    assert probe.selection_ == f"C by 3-fold CV (lowest held-out {loss})"
    assert probe.converged_
    assert probe.score(X_test, y_test) > 0.9
    starved = LinearProbe(classifier, Cs=(1.0,), normalization=normalization, max_iter=1).fit(X, y)
    assert not starved.converged_ and starved.selection_ == "C fixed (one value given)" and np.isnan(starved.cv_score_)


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_held_out_loss_is_the_classifiers_own_objective(classifier):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    from classify.probe import held_out_loss

    X, y = _blobs(spread=0.3)
    X_val, y_val = _blobs(seed=1, n_per_class=10, spread=0.3)
    model = (LogisticRegression(C=0.1) if classifier == "logreg" else LinearSVC(C=0.1)).fit(X, y)
    if classifier == "logreg":  # mean cross-entropy of the true class
        expected = -np.mean(np.log(model.predict_proba(X_val)[np.arange(len(y_val)), y_val]))
    else:  # one-vs-rest squared hinge, summed over the classes
        signs = np.where(y_val[:, None] == np.arange(3)[None, :], 1.0, -1.0)
        expected = np.mean(np.sum(np.clip(1 - signs * model.decision_function(X_val), 0, None) ** 2, axis=1))
    assert held_out_loss(model, X_val, y_val) == pytest.approx(expected, rel=1e-6)
    # a binary probe (one class of a multi-label dataset): one score, positive for classes_[1]
    binary = (LogisticRegression(C=0.1) if classifier == "logreg" else LinearSVC(C=0.1)).fit(X, y == 1)
    target = y_val == 1
    if classifier == "logreg":
        expected = -np.mean(np.log(binary.predict_proba(X_val)[np.arange(len(target)), target.astype(int)]))
    else:
        expected = np.mean(np.clip(1 - np.where(target, 1.0, -1.0) * binary.decision_function(X_val), 0, None) ** 2)
    assert held_out_loss(binary, X_val, target) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("select_by", ["loss", "score"])
def test_select_by_picks_c_by_its_criterion_and_rounding_does_not_move_it(select_by):
    """``select_by="score"`` is the highest mean held-out accuracy, ``"loss"`` the lowest mean loss;
    features changed at float rounding (1e-6 relative) choose the same C and predict the same."""
    X, y = _blobs(n_per_class=40, dim=40, spread=0.25)
    X_test, _ = _blobs(n_per_class=20, dim=40, spread=0.25, seed=1)
    probe = LinearProbe(Cs=(1e-3, 1e-2, 0.1, 1.0, 10.0), select_by=select_by, patience=None).fit(X, y)
    criterion = -probe.cv_losses_.mean(axis=1) if select_by == "loss" else probe.cv_scores_.mean(axis=1)
    assert probe.best_C_ == (1e-3, 1e-2, 0.1, 1.0, 10.0)[int(np.flatnonzero(criterion == criterion.max())[0])]
    rounded = X * (1 + 1e-6 * np.random.default_rng(5).standard_normal(X.shape)).astype(np.float32)
    again = LinearProbe(Cs=(1e-3, 1e-2, 0.1, 1.0, 10.0), select_by=select_by, patience=None).fit(rounded, y)
    assert again.best_C_ == probe.best_C_
    np.testing.assert_array_equal(again.predict(X_test), probe.predict(X_test))
    with pytest.raises(UserError, match="select_by='accuracy' must be one of 'loss', 'score'"):
        LinearProbe(select_by="accuracy").fit(X, y)


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
    # a class absent from the test split but predicted (2) is no class of its own: it only costs
    # the images predicted as it, as the mean over the classes of y_true does
    y_pred = np.array([0, 0, 2, 2, 1])
    per_class = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    assert mean_per_class_accuracy(y_true, y_pred) == pytest.approx(np.mean(per_class)) == pytest.approx(0.75)


def _store(path, X, y, splits, *, fingerprint=None, layers=None):
    """A store of the features ``X`` (layer "layer"), or of several ``layers`` {name: X}."""
    layers = layers or {"layer": X}
    dataset = ImageDataset("blobs", ("a", "b", "c"), tuple(f"x{i}" for i in range(len(y))), y, tuple(splits), read=None)
    with StoreWriter(path, dataset=dataset, extractor=path.stem, fingerprint=fingerprint or {"toy": 1}, taps=list(layers)) as writer:
        writer.write_shard(np.arange(len(y)), layers)
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
    clean, dirty = clean_fit[("layer", "logreg", "standard")], poisoned_fit[("layer", "logreg", "standard")]
    assert clean.best_C_ == dirty.best_C_
    np.testing.assert_array_equal(clean.cv_scores_, dirty.cv_scores_)
    np.testing.assert_array_equal(clean.pipeline_["normalize"].mean_, dirty.pipeline_["normalize"].mean_)
    np.testing.assert_array_equal(clean.pipeline_["classify"].coef_, dirty.pipeline_["classify"].coef_)
    assert clean_rows[0]["n_train"] == 90 and clean_rows[0]["n_test"] == 30


def test_results_csv_keys_rows_by_experiment_and_caches_them(tmp_path):
    from classify.results import read_results

    X, y = _blobs()
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits)
    csv = tmp_path / "results.csv"
    given = parse_protocol("given")
    both = ProbeSettings(("logreg", "svm"), Cs=(0.1, 1.0))
    update_results(csv, Evaluation(path, given, both).run(progress=False))
    table = pd.read_csv(csv)
    assert list(table.columns) == RESULT_COLUMNS and len(table) == 2
    # the same settings again: nothing is fitted, the rows come back as they were
    again = Evaluation(path, given, both, results=read_results(csv))
    rows = again.run(progress=False)
    assert again.cached == 2 and [r["created"] for r in rows] == table["created"].tolist()
    update_results(csv, rows)
    assert len(pd.read_csv(csv)) == 2
    # another seed or C grid is another experiment: a row of its own
    other_seed = Evaluation(path, given, ProbeSettings(("logreg",), Cs=(0.1, 1.0), seed=3), results=read_results(csv))
    update_results(csv, other_seed.run(progress=False))
    assert other_seed.cached == 0 and sorted(pd.read_csv(csv)["seed"]) == [0, 0, 3]
    # the store rebuilt with other settings: its old rows go, whatever their seed
    path.unlink()
    rebuilt = _store(path, X, y, splits, fingerprint={"toy": 2})
    update_results(csv, Evaluation(rebuilt, given, ProbeSettings(("logreg",), Cs=(0.1, 1.0)), results=read_results(csv)).run(progress=False))
    table = pd.read_csv(csv)
    assert len(table) == 1 and table["store_fingerprint"].nunique() == 1


def test_average_precision_matches_scikit_learn_and_voc07():
    from sklearn.metrics import average_precision_score

    from classify.metrics import average_precision, mean_average_precision

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
    X, y = _blobs(n_per_class=30, spread=0.5)  # close classes: one image per class is not enough
    path = _store(tmp_path / "s.h5", X, y, np.where(np.arange(len(y)) % 3 == 0, "test", "train"))
    rows = Evaluation(path, parse_protocol("fewshot:1,5"), ProbeSettings(Cs=(0.1, 1.0), repeats=3)).run(progress=False)
    assert [r["protocol"] for r in rows] == ["1-shot", "5-shot"]
    assert [r["n_train"] for r in rows] == [3, 15]
    assert all(r["repeats"] == 3 for r in rows)
    assert rows[0]["top1_std"] > 0  # one image per class: the draws disagree
    # one image per class leaves nothing to hold out: C is fixed and there is no selection score
    assert np.isnan(rows[0]["cv_score"]) and "too few images" in rows[0]["selection"]
    assert rows[1]["cv_score"] > 0.6 and rows[1]["top1"] > max(0.6, rows[0]["top1"])  # chance: 1/3


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
    X_other, y_other = _blobs(n_per_class=10, seed=2)
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
        probe = StreamingSGDProbe(Cs=(0.1, 10.0), chunk_rows=16, epochs=20).fit_store(store, "layer", train, store.labels)
        test = store.splits == "test"
        chosen = [0.1, 10.0].index(probe.best_C_)
        assert chosen == np.nanargmin(probe.cv_losses_[:, 0]) and probe.cv_score_ == probe.cv_scores_[chosen, 0]
        assert np.mean(probe.predict(store.features("layer", test)) == store.labels[test]) > 0.9
        # the Cs train side by side on the same batches: each C's held-out loss is the one it gets alone
        together = StreamingSGDProbe(Cs=(0.01, 0.1, 10.0), chunk_rows=16, epochs=3, keep=1.0).fit_store(store, "layer", train, store.labels)
        for i, C in enumerate((0.01, 0.1, 10.0)):
            alone = StreamingSGDProbe(Cs=(C,), chunk_rows=16, epochs=3).fit_store(store, "layer", train, store.labels)
            assert together.cv_losses_[i, 0] == pytest.approx(alone.cv_losses_[0, 0], rel=1e-6)
        # successive halving: 3 Cs, then 2, then 1 train; the dropped have no held-out numbers
        halved = StreamingSGDProbe(Cs=(0.01, 0.1, 10.0), chunk_rows=16, epochs=3).fit_store(store, "layer", train, store.labels)
        assert np.isnan(halved.cv_losses_[:, 0]).sum() == 2 and "(6 of 9 C-epochs)" in halved.selection_
        kept = int(np.nanargmin(halved.cv_losses_[:, 0]))
        assert halved.best_C_ == (0.01, 0.1, 10.0)[kept] and np.isnan(halved.cv_scores_[:, 0]).sum() == 2
        settled = StreamingSGDProbe(Cs=(0.1,), chunk_rows=16, epochs=20).fit_store(store, "layer", train, store.labels)
        assert settled.converged_  # 20 epochs of a decaying step: the weights settle
        one_pass = StreamingSGDProbe(Cs=(10.0,), chunk_rows=16, epochs=1).fit_store(store, "layer", train, store.labels)
        assert not one_pass.converged_  # one epoch says nothing about convergence


def test_the_normalised_copy_serves_the_rows_the_store_does(tmp_path):
    """A streamed fit reads the store once into a temporary file of normalised rows; every later pass
    reads that copy, which holds what reading and normalising the store would give."""
    from classify.probe import NormalisedRows, fit_normalizer
    from extract.store import FeatureStore

    X, y = _blobs(n_per_class=60, dim=10)
    splits = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    with FeatureStore(_store(tmp_path / "s.h5", X, y, splits)) as store:
        train = np.flatnonzero(store.splits == "train")
        subset = train[::3]
        read = []
        for copied in (True, False):
            with NormalisedRows(store, "layer", train, chunk_rows=40, batch_rows=8) as data:
                if copied:
                    data.fill()
                data.normalise(fit_normalizer("standard", data.raw))
                read.append([(rows, X) for rows, X in data.chunks(subset)])
                assert data.passes == ({"store": 1, "copy": 3} if copied else {"store": 2, "copy": 0})
    (copy, direct) = read
    for chunks in read:  # whole batches of 8 (the last excepted), in order: the same batches either way
        assert all(len(rows) % 8 == 0 for rows, _ in chunks[:-1])
        np.testing.assert_array_equal(np.concatenate([rows for rows, _ in chunks]), subset)
    np.testing.assert_allclose(np.concatenate([X for _, X in copy]), np.concatenate([X for _, X in direct]), rtol=1e-6)
    scaled = np.concatenate([X for _, X in copy])
    np.testing.assert_allclose(scaled, (X[subset] - X[train].mean(0)) / X[train].std(0), rtol=1e-4, atol=1e-5)


# -- model selection never sees the test split ------------------------------------------------------

@pytest.mark.parametrize("memory_budget", [None, 2**20], ids=["in-memory", "streamed"])
def test_noise_in_the_test_rows_changes_no_choice(tmp_path, memory_budget):
    """Layer, classifier, C and the report's headline choice come from training rows only: replacing
    every test row's features by noise changes the test numbers and nothing that was chosen. So too
    for probes streamed by SGD over chunks of the store (a 1 MiB memory budget), whose normaliser is
    fitted in a streaming pass over the training rows."""
    from classify.report import write_report

    X, y = _blobs(n_per_class=40)
    rng = np.random.default_rng(5)
    layers = {"low": X + rng.normal(0, 4, X.shape).astype(np.float32), "mid": X + rng.normal(0, 2, X.shape).astype(np.float32), "high": X}
    splits = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    noisy = {name: np.where((splits == "test")[:, None], rng.normal(0, 50, X.shape), features).astype(np.float32)
             for name, features in layers.items()}
    chosen = {}
    for name, features in (("clean", layers), ("noisy", noisy)):
        root = tmp_path / name
        store = _store(root / "features" / "blobs" / "toy.h5", X, y, splits, layers=features)
        budget = {} if memory_budget is None else {"memory_budget": memory_budget}
        rows = Evaluation(store, parse_protocol("given"), ProbeSettings(("logreg", "svm"), Cs=(0.001, 0.1, 10.0), **budget)).run(progress=False)
        assert {r["search"] for r in rows} == {"cv3" if memory_budget is None else "stream"}
        update_results(root / "results" / "blobs" / "results.csv", rows)
        report = write_report(root / "results" / "blobs" / "results.csv", root / "reports" / "blobs",
                              features_dir=root / "features").read_text()
        headline = next(line for line in report.splitlines() if line.startswith("Best by cross-validation"))
        chosen[name] = ({(r["layer"], r["classifier"]): (r["C"], r["cv_score"]) for r in rows},
                        headline.split(" on the test split")[0].split("), ")[0],
                        {(r["layer"], r["classifier"]): r["top1"] for r in rows})
    assert chosen["clean"][0] == chosen["noisy"][0]  # every C and every CV score
    assert chosen["clean"][1] == chosen["noisy"][1]  # the headline's layer, classifier and CV score
    assert max(chosen["noisy"][2].values()) < 0.7 < min(chosen["clean"][2][("high", c)] for c in ("logreg", "svm"))


def test_the_report_labels_a_differing_test_best_as_an_oracle(tmp_path):
    from classify.report.sections import headline

    rows = pd.DataFrame([
        {"features": "a", "layer": "x", "layer_depth": 0, "classifier": "logreg", "cv_score": 0.9, "top1": 0.70, "mean_per_class_acc": 0.7,
         "train_split": "train", "test_split": "test", "n_train": 10, "n_test": 10},
        {"features": "a", "layer": "y", "layer_depth": 1, "classifier": "logreg", "cv_score": 0.8, "top1": 0.75, "mean_per_class_acc": 0.75,
         "train_split": "train", "test_split": "test", "n_train": 10, "n_test": 10},
        {"features": "b", "layer": "z", "layer_depth": 0, "classifier": "softmax", "cv_score": np.nan, "top1": 0.99, "mean_per_class_acc": 0.99,
         "train_split": "train", "test_split": "test", "n_train": 10, "n_test": 10},
    ])
    best, lines = headline(rows, "top1")
    assert (best["layer"], best["top1"]) == ("x", 0.70)  # not the test-best y, never the unscored z
    assert lines[0].startswith("Best by cross-validation on the training data: **a / x / logreg** (CV 90.00%, the highest of 2 candidates), top-1 70.00%")
    assert lines[1].startswith("Oracle, for reference only (picked on the test split, not a result): b / z / softmax")


def test_sampled_office_protocol_draws_per_class_from_the_source(tmp_path):
    X, y = _blobs(n_per_class=40, spread=0.5)  # close classes: the draws matter
    domain = np.where(np.arange(len(y)) % 2 == 0, "amazon", "webcam")
    X[domain == "webcam"] += 0.5
    path = _store(tmp_path / "office.h5", X, y, domain)
    rows = {}
    for source, target in (("amazon", "webcam"), ("webcam", "amazon")):
        protocol = parse_protocol(f"sampled:{source}->{target}")
        row, = Evaluation(path, protocol, ProbeSettings(Cs=(0.1, 1.0), repeats=3)).run(progress=False)
        rows[source] = row
    # Saenko et al.: 20 per class from amazon, 8 from the small domains; the whole target tests
    assert (rows["amazon"]["n_train"], rows["webcam"]["n_train"]) == (3 * 20, 3 * 8)
    assert rows["amazon"]["n_test"] == rows["webcam"]["n_test"] == 60
    assert rows["amazon"]["repeats"] == 3 and rows["amazon"]["protocol"] == "sampled:amazon->webcam"
    assert rows["webcam"]["top1_std"] > 0 and rows["amazon"]["top1"] > 0.6 and rows["amazon"]["cv_score"] > 0.6  # chance: 1/3


def test_unseen_test_classes_are_counted_and_named_in_the_log(tmp_path, caplog):
    X, y = _blobs(n_per_class=20)
    splits = np.where((np.arange(len(y)) % 4 == 0) | (y == 2), "test", "train")  # class c never trains
    row, = Evaluation(_store(tmp_path / "s.h5", X, y, splits), parse_protocol("given"), ProbeSettings(Cs=(0.1, 1.0))).run(progress=False)
    assert row["classes_unseen_in_train"] == 1
    assert "1 test classes have no training image" in caplog.text
    assert row["top1"] < 0.75  # the 20 images of c are all wrong


def _append_results(csv, worker: int, count: int) -> None:
    for i in range(count):
        update_results(csv, [{**{c: 0 for c in RESULT_COLUMNS}, "dataset": "d", "features": f"f{worker}", "kind": "cnn",
                              "store_fingerprint": f"fp{worker}", "layer": f"layer{i}", "classifier": "logreg", "protocol": "given",
                              "probe_version": PROBES_VERSION}])


def test_concurrent_updates_of_results_csv_lose_no_row(tmp_path):
    """Two real processes merging rows into the same results.csv at the same moment."""
    import multiprocessing

    csv = tmp_path / "results.csv"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_results, args=(csv, w, 60)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    table = pd.read_csv(csv)
    assert len(table) == 120 and not table.duplicated(["features", "layer"]).any()
    assert not list(tmp_path.glob(".results.csv.tmp-*"))


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from extract.commands import run_command
    from extract.errors import UserError

    def user_fault(args):
        raise UserError("protocol 'fewshot:abc': shots per class must be whole numbers")

    def bug(args):
        np.zeros(3).reshape(2, 2)  # a ValueError from inside NumPy

    assert run_command(user_fault, None) == 2
    assert capsys.readouterr().err.strip() == "error: protocol 'fewshot:abc': shots per class must be whole numbers"
    with pytest.raises(ValueError, match="cannot reshape"):
        run_command(bug, None)
    with pytest.raises(UserError, match="whole numbers"):
        parse_protocol("fewshot:abc")


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_wide_features_are_fitted_in_the_span_of_the_training_rows(classifier, monkeypatch):
    """Features wider than the training rows are many are projected onto those rows' span: the
    same optimum (representer theorem), so the same C, the same predictions, the same weights."""
    import classify.probe as probe_module
    from classify.probe import RowSpan

    X, y = _blobs(n_per_class=30, dim=400, spread=0.15)  # 90 rows, 400 features: hard enough to need a search
    X_test, y_test = _blobs(n_per_class=20, dim=400, spread=0.15, seed=1)
    span = RowSpan(X)
    assert RowSpan.worthwhile(X) and not RowSpan.worthwhile(X[:, :50])
    Z = span.train
    np.testing.assert_allclose(Z @ Z.T, X @ X.T, rtol=1e-4, atol=1e-2)  # an isometry of the training rows
    np.testing.assert_allclose(span.coordinates(X_test) @ Z.T, X_test @ X.T, rtol=1e-4, atol=1e-2)
    w = np.random.default_rng(3).normal(size=(1, 90)).astype(np.float32)  # weights on the coordinates ...
    np.testing.assert_allclose(X_test @ span.weights(w).T, span.coordinates(X_test) @ w.T, rtol=1e-3, atol=1e-2)  # ... act alike
    reduced = LinearProbe(classifier, Cs=(1e-4, 1e-3, 1e-2, 0.1, 1.0), patience=None).fit(X, y)
    monkeypatch.setattr(probe_module.RowSpan, "worthwhile", staticmethod(lambda X: False))
    full = LinearProbe(classifier, Cs=(1e-4, 1e-3, 1e-2, 0.1, 1.0), patience=None).fit(X, y)
    assert reduced.best_C_ == full.best_C_
    # the same optimum up to the solver's tolerance: at most one borderline validation image (of 30) flips
    np.testing.assert_allclose(reduced.cv_scores_, full.cv_scores_, atol=1 / 30 + 1e-9)
    np.testing.assert_allclose(reduced.cv_losses_, full.cv_losses_, rtol=1e-3)
    np.testing.assert_array_equal(reduced.predict(X_test), full.predict(X_test))
    # equal up to the solver's tolerance (L-BFGS stops at a gradient of 1e-4: about 1e-2 in scores of about 4 at C = 1)
    np.testing.assert_allclose(reduced.decision_function(X_test), full.decision_function(X_test), atol=2e-2)


def test_layers_of_a_large_store_are_probed_in_worker_processes_with_the_same_numbers(tmp_path, caplog):
    """Two or more jobs on a store of PARALLEL_MIN_ROWS images go to worker processes, one job each:
    the rows, the fitted probes and the warnings are those of the same jobs run here one by one."""
    import os

    from classify.probe import PARALLEL_MIN_ROWS

    X, y = _blobs(n_per_class=PARALLEL_MIN_ROWS // 3 + 10, spread=0.4)
    splits = np.where((np.arange(len(y)) % 4 == 0) | (y == 2), "test", "train")  # class c never trains: a warning
    rng = np.random.default_rng(3)
    layers = {name: X + rng.normal(0, noise, X.shape).astype(np.float32) for name, noise in (("low", 2.0), ("mid", 1.0), ("high", 0.0))}
    path = _store(tmp_path / "big.h5", X, y, splits, layers=layers)
    runs = {}
    for jobs in (1, None):  # one process, then one per core
        caplog.clear()
        fitted = {}
        rows = Evaluation(path, parse_protocol("given"), ProbeSettings(("logreg", "svm"), Cs=(0.01, 1.0, 100.0), n_jobs=jobs),
                          fitted=fitted).run(progress=False)
        warned = [r for r in caplog.records if "test classes have no training image" in r.getMessage()]
        runs[jobs] = rows, fitted, {r.process for r in warned}
        assert len(warned) == 6  # one per (layer, classifier), through the parent's handlers
    (serial, serial_fits, here), (parallel, parallel_fits, there) = runs[1], runs[None]
    assert here == {os.getpid()} and os.getpid() not in there  # the second run's jobs ran elsewhere
    columns = ("layer", "classifier", "C", "cv_score", "top1", "mean_per_class_acc", "selection", "converged")
    assert [[r[c] for c in columns] for r in parallel] == [[r[c] for c in columns] for r in serial]
    assert [r["layer"] for r in parallel] == ["low", "low", "mid", "mid", "high", "high"]
    assert serial_fits.keys() == parallel_fits.keys() and len(serial_fits) == 6
    for job, probe in serial_fits.items():
        np.testing.assert_array_equal(probe.pipeline_["classify"].coef_, parallel_fits[job].pipeline_["classify"].coef_)
