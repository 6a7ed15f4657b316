"""Beyond the plain probe (RECIPE=best): fused layers, normalisation and classifier as candidates,
repeated CV, the ablation; and the evaluation's own safety: a pinned store, rows merged per job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from classify import fusion
from classify.evaluate import Evaluation, ProbeSettings, StoreChangedError, parse_protocol
from classify.probe import WIDE_CS, BlockNormalizer, LinearProbe
from classify.recipe import RECIPES, ablation, chosen_among
from classify.results import read_results, update_results
from conftest import ROOT
from test_probe import _blobs, _store

GIVEN = parse_protocol("given")

# as CNNFeaturizer records it (extract.extractor)
FLIP = {"name": "flip", "count": 2, "from_side": 224}


def _layers(X, noises, seed=3):
    rng = np.random.default_rng(seed)
    return {name: (X + rng.normal(0, noise, X.shape)).astype(np.float32) for name, noise in noises.items()}


def test_block_normalizer_gives_every_tap_the_same_weight():
    """A 200-value block and a 5-value block: each comes out with unit mean squared norm on the rows it
    was fitted on (plain standardising would give the wide block 40 times the narrow one's)."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(3, 100, (60, 200)), rng.normal(-1, 0.01, (60, 5))], axis=1).astype(np.float32)
    for normalization in ("standard", "l2", "sqrt", "none"):
        joined = BlockNormalizer(normalization, (200, 5)).fit(X).transform(X)
        norms = [np.mean(np.sum(joined[:, a:b].astype(np.float64) ** 2, axis=1)) for a, b in ((0, 200), (200, 205))]
        np.testing.assert_allclose(norms, [1.0, 1.0], rtol=1e-4)
    with pytest.raises(ValueError, match="has 205 columns. Received 204"):
        BlockNormalizer("standard", (200, 5)).fit(X[:, :204])


def test_a_fused_layer_is_probed_like_a_layer_and_its_saved_probe_predicts_the_same(tmp_path):
    from classify.persist import SavedProbe
    from extract.store import FeatureStore

    X, y = _blobs(n_per_class=30)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits, layers=_layers(X, {"low": 3.0, "mid": 1.5, "high": 0.5}))
    fitted = {}
    rows = Evaluation(path, GIVEN, ProbeSettings(Cs=(0.1, 1.0)), out_dir=tmp_path / "out", save_probes=True,
                      fitted=fitted).run(layers=["high", "high+low"], progress=False)
    assert [r["layer"] for r in rows] == ["high", "low+high"]  # named low to high, whatever the order asked
    fused = rows[1]
    assert fused["n_features"] == 40 and fused["layer_depth"] == 2 and fused["top1"] > 0.9
    probe = fitted[("low+high", "logreg", "standard")]
    assert isinstance(probe.pipeline_["normalize"], BlockNormalizer)
    saved_path, = (tmp_path / "out" / "probes" / "s").glob("low+high__*.npz")
    saved = SavedProbe.load(saved_path)
    with FeatureStore(path) as store:
        saved.check_store(store)
        expected = [["a", "b", "c"][i] for i in probe.predict(fusion.features(store, "low+high"))]
        assert saved.predict(saved.read_features(store)) == expected
    with pytest.raises(ValueError, match="no layer 'nope'"):
        with FeatureStore(path) as store:
            fusion.check_layer(store, "nope+high")


def test_fuse_joins_the_top_taps_by_cv_score(tmp_path):
    X, y = _blobs(n_per_class=30, spread=0.6)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    noise = {"noise": 50.0, "low": 2.0, "mid": 1.0, "high": 0.3}
    path = _store(tmp_path / "s.h5", X, y, splits, layers=_layers(X, noise))
    rows = Evaluation(path, GIVEN, ProbeSettings(Cs=(0.01, 0.1, 1.0), fuse=(2, 3))).run(progress=False)
    singles = [r for r in rows if not fusion.is_fused(r["layer"])]
    ranked = sorted(singles, key=lambda r: -r["cv_score"])
    expected = [fusion.fused_name([r["layer"] for r in ranked[:k]], list(noise)) for k in (2, 3)]
    assert [r["layer"] for r in rows[len(singles):]] == expected
    assert "noise" not in "".join(expected)  # the pure-noise tap is never among the best
    # candidates are chosen from CV scores alone: the test numbers play no part
    assert fusion.candidates([{**r, "top1": 0.0} for r in singles], (2, 3), list(noise)) == expected


def test_every_normalisation_and_classifier_is_a_candidate_row_cached_like_any(tmp_path):
    X, y = _blobs()
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits)
    settings = ProbeSettings(("logreg", "svm"), normalizations=("standard", "l2", "sqrt"), Cs=(0.1, 1.0, 10.0))
    rows = Evaluation(path, GIVEN, settings).run(progress=False)
    assert {(r["classifier"], r["normalization"]) for r in rows} == {(c, n) for c in ("logreg", "svm") for n in ("standard", "l2", "sqrt")}
    csv = tmp_path / "results.csv"
    update_results(csv, rows)
    assert len(pd.read_csv(csv)) == 6  # six keys, six rows
    again = Evaluation(path, GIVEN, settings, results=read_results(csv))
    again.run(progress=False)
    assert again.cached == 6
    with pytest.raises(ValueError, match=r"normalizations=\('zscore',\) must be one or more values, each one of 'standard'"):
        ProbeSettings(normalizations=("zscore",))


def test_repeated_cv_scores_each_c_on_every_partition():
    X, y = _blobs(n_per_class=30, spread=0.5)
    once = LinearProbe(Cs=(0.01, 0.1, 1.0), patience=None).fit(X, y)
    thrice = LinearProbe(Cs=(0.01, 0.1, 1.0), cv_repeats=3, patience=None).fit(X, y)
    assert thrice.n_splits_ == 9 and thrice.cv_scores_.shape == (3, 9)
    assert thrice.selection_ == "C by 3-fold CV x 3 (lowest held-out log-loss)"
    assert once.selection_ == "C by 3-fold CV (lowest held-out log-loss)" and once.n_splits_ == 3
    assert thrice.cv_score_ == pytest.approx(thrice.cv_scores_[[0.01, 0.1, 1.0].index(thrice.best_C_)].mean())
    assert not np.array_equal(thrice.cv_scores_[:, :3], thrice.cv_scores_[:, 3:6])  # other partitions


def _recipe_rows(path, *, stores=(), classifiers=RECIPES["best"].classifiers):
    """The rows `make classify RECIPE=best` writes for these stores: the plain pass and the best one."""
    best = ProbeSettings(**{**RECIPES["best"].probe_settings(), "classifiers": classifiers})
    plain = ProbeSettings(**RECIPES["plain"].probe_settings())
    return [row for store in (path, *stores) for settings in (plain, best) for row in Evaluation(store, GIVEN, settings).run(progress=False)]


def test_the_ablation_adds_each_step_to_the_choice_before_it(tmp_path):
    X, y = _blobs(n_per_class=30, spread=0.5)
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    layers = _layers(X, {"low": 2.0, "mid": 1.0, "high": 0.6})
    centre = _store(tmp_path / "cnn.h5", X, y, splits, layers=layers, fingerprint={"model": "toy"})
    flip = _store(tmp_path / "cnn-flip.h5", X, y, splits, layers=_layers(X, {"low": 1.8, "mid": 0.9, "high": 0.5}, seed=4),
                  fingerprint={"model": "toy", "views": FLIP})
    table = pd.DataFrame(_recipe_rows(centre, stores=(flip,), classifiers=("logreg", "svm")))
    steps = ablation(table)
    assert list(steps["backbone"].unique()) == ["cnn"]  # the centre and flip stores of one backbone
    assert len(steps) == 6 and steps["change"].iloc[0] == 0.0
    assert steps["candidates"].tolist() == [3, 3, 6, 10, 30, 60]  # two fused layers a store; x3 normalisations; x2 classifiers
    # each line is the best CV score among its candidates, never below the line before it (nested sets)
    assert (np.diff(steps["cv_score"].to_numpy()[1:]) >= 0).all()
    chosen = chosen_among(table)
    assert set(chosen["recipe"]) == {"best"} and steps["cv_score"].iloc[-1] == chosen["cv_score"].max()
    assert steps["step"].iloc[-2].endswith("= RECIPE=best") and steps["step"].iloc[-1].startswith("+ classifier")
    # steps that add nothing are left out: without a views store there is no "+ views" line
    assert not ablation(table[table["features"] == "cnn"])["step"].str.startswith("+ views").any()


@pytest.mark.slow
def test_noise_in_the_test_rows_changes_no_choice_of_the_full_recipe(tmp_path):
    """Views store, fused layers, normalisation, classifier, C: replacing every test row by noise changes
    the test numbers, never a choice."""
    X, y = _blobs(n_per_class=30, spread=0.5)
    splits = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    rng = np.random.default_rng(9)
    choices = {}
    for name in ("clean", "noisy"):
        stores = []
        for store, views, seed in (("cnn", "centre", 3), ("cnn-flip", "flip", 4)):
            layers = _layers(X, {"low": 2.0, "mid": 1.0, "high": 0.6}, seed=seed)
            if name == "noisy":
                layers = {k: np.where((splits == "test")[:, None], rng.normal(0, 30, v.shape), v).astype(np.float32) for k, v in layers.items()}
            fingerprint = {"model": "toy", **({"views": FLIP} if views == "flip" else {})}
            stores.append(_store(tmp_path / name / f"{store}.h5", X, y, splits, layers=layers, fingerprint=fingerprint))
        table = pd.DataFrame(_recipe_rows(stores[0], stores=stores[1:]))
        steps = ablation(table)
        choices[name] = (sorted(zip(table["features"], table["layer"], table["classifier"], table["normalization"], table["C"], table["cv_score"])),
                         steps[["features", "layer", "classifier", "normalization", "C", "cv_score"]].to_numpy().tolist(), table["top1"].mean())
    assert choices["clean"][0] == choices["noisy"][0]  # every candidate (fused ones too), its C and CV score
    assert choices["clean"][1] == choices["noisy"][1]  # every line of the ablation, the final choice included
    assert choices["noisy"][2] < choices["clean"][2] - 0.2


def test_a_store_replaced_while_it_is_probed_writes_no_row_of_the_old_one(tmp_path):
    """`make extract OVERWRITE=1` during `make classify`: the jobs after the swap stop with one line,
    and what was merged before it is the old store's, under the old store's fingerprint."""
    X, y = _blobs()
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    path = _store(tmp_path / "s.h5", X, y, splits, layers=_layers(X, {"low": 1.0, "high": 0.1}), fingerprint={"toy": 1})
    merged = []

    def merge_then_rebuild(rows):
        merged.extend(rows)
        if len(merged) == 1:  # the first job is done: the store is rebuilt with other settings and renamed over it
            replacement = _store(tmp_path / "new" / "s.h5", X[::-1].copy(), y[::-1].copy(), splits, fingerprint={"toy": 2},
                                 layers=_layers(X, {"low": 1.0, "high": 0.1}, seed=5))
            os.replace(replacement, path)

    with pytest.raises(StoreChangedError, match="was replaced while it was being probed"):
        Evaluation(path, GIVEN, ProbeSettings(Cs=(0.1, 1.0), n_jobs=1), on_rows=merge_then_rebuild).run(progress=False)
    assert [r["layer"] for r in merged] == ["low"]


def test_a_killed_classify_keeps_the_rows_it_finished(tmp_path):
    """SIGKILL of `python -m classify probe` once some rows are in results.csv: the rerun fits only the rest,
    leaves no temporary file, and ends with every row once."""
    X, y = _blobs(n_per_class=200, dim=60, spread=0.3)
    splits = np.where(np.arange(len(y)) % 4 == 0, "test", "train")
    layers = _layers(X, {f"tap{i}": 0.5 + i for i in range(6)})
    _store(tmp_path / "features" / "blobs" / "toy.h5", X, y, splits, layers=layers)
    command = [sys.executable, "-m", "classify", "probe", "--dataset", "blobs", "--features-dir", str(tmp_path / "features"),
               "--results-dir", str(tmp_path / "results"), "--classifier", "both", "--cs", "1e-3:1e3:13", "--jobs", "1", "--no-progress"]
    csv = tmp_path / "results" / "blobs" / "results.csv"
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None and not (csv.is_file() and len(pd.read_csv(csv)) >= 2):
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    kept = len(pd.read_csv(csv))
    assert 2 <= kept < 12, "the kill came too late to test anything"
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{kept} probe jobs cached" in done.stdout
    table = pd.read_csv(csv)
    assert len(table) == 12 and not table.duplicated(["layer", "classifier"]).any()
    assert not list(csv.parent.glob(".results.csv.tmp-*"))


def test_recipe_best_is_the_recipe_of_the_command_line(tmp_path):
    """`--recipe best` runs the plain and the best candidates; an option that changes the recipe makes it "custom"."""
    X, y = _blobs()
    splits = np.where(np.arange(len(y)) % 3 == 0, "test", "train")
    _store(tmp_path / "features" / "blobs" / "toy.h5", X, y, splits, layers=_layers(X, {"low": 1.0, "high": 0.3}))
    base = [sys.executable, "-m", "classify", "probe", "--dataset", "blobs", "--features-dir", str(tmp_path / "features"),
            "--results-dir", str(tmp_path / "results"), "--no-progress"]
    done = subprocess.run([*base, "--recipe", "best"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "results" / "blobs" / "results.csv")
    best = table[table["recipe"] == "best"]
    assert (table["recipe"] == "plain").sum() == 2 and len(best) == 3 * 3  # two taps and their fusion, 3 normalisations each
    assert set(best["search"]) == {"cv3x3"} and set(best["Cs"]) == {",".join(f"{c:g}" for c in WIDE_CS)}
    assert "low+high" in set(best["layer"])
    done = subprocess.run([*base, "--recipe", "best", "--cv-repeats", "1", "--layers", "high"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(pd.read_csv(tmp_path / "results" / "blobs" / "results.csv")["recipe"]) == {"plain", "best", "custom"}


@pytest.mark.slow
def test_recipe_best_from_extraction_to_report_on_an_office_layout(tiny, tmp_path):
    """`make extract VIEWS=centre,flip` + `make classify RECIPE=best` + `make report` on a fake Office-31 with a
    tiny real Keras model: a store per view setting, the plain and the best recipe's rows of both, and a
    report whose headline is chosen among the best recipe's rows and whose ablation has its views line."""
    from test_dataset_layouts import write_jpeg

    office = tmp_path / "office31"
    for d, domain in enumerate(("amazon", "dslr", "webcam")):
        for c, name in enumerate(("mug", "bike")):
            for n in range(6):
                write_jpeg(office / domain / "images" / name / f"frame_{n:04d}.jpg", size=(36, 30),
                           color=(200 - 150 * c, 60, 50 + 150 * c), seed=10 * d + 3 * c + n)
    dirs = ["--features-dir", str(tmp_path / "features"), "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    for command in (["extract", "features", "--dataset", "office31", "--data-dir", str(office), "--model", tiny, "--views", "centre,flip",
                     "--features-dir", str(tmp_path / "features"), "--no-progress"],
                    ["classify", "probe", "--dataset", "office31", "--recipe", "best", "--protocol", "transfer:amazon->webcam",
                     "--cv", "2", *dirs, "--no-progress"],
                    ["classify", "report", "--dataset", "office31", *dirs]):
        done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    table = read_results(tmp_path / "results" / "office31" / "results.csv")
    assert set(zip(table["features"], table["views"])) == {("keras-tiny", "centre"), ("keras-tiny-flip", "flip")}
    assert set(table["recipe"]) == {"plain", "best"} and set(table["protocol"]) == {"transfer:amazon->webcam"}
    best = table[table["recipe"] == "best"]
    assert set(best["normalization"]) == set(RECIPES["best"].normalizations) and best["layer"].str.contains("+", regex=False).any()
    steps = ablation(table)
    assert steps["backbone"].unique().tolist() == ["keras-tiny"]
    assert steps["step"].str.startswith("+ views stores").any()
    report = (tmp_path / "reports" / "office31" / "report.md").read_text()
    assert "## What each step bought (ablation)" in report and "+ views stores" in report
    chosen = chosen_among(table).sort_values("cv_score", ascending=False, kind="stable").iloc[0]
    assert f"(CV {100 * chosen['cv_score']:.2f}%, the highest of {len(chosen_among(table))} candidates)" in report


def test_recipe_best_on_a_voc_layout_chooses_by_cross_validated_average_precision(tmp_path):
    """Multi-label (VOC 2007 layout): the best recipe's candidates are scored by cross-validated AP,
    the ablation reads mAP, and its lines are nested choices among them."""
    from baselines.simple import ColorHistogram
    from extract.datasets import load_dataset
    from extract.datasets.base import file_dataset
    from extract.pipeline import extract_to_store
    from test_dataset_layouts import make_voc

    voc = make_voc(tmp_path)
    full = load_dataset("voc2007", data_dir=str(tmp_path))
    keep = [full.classes.index(c) for c in ("cat", "dog", "person")]
    entries = [(p, full.classes[keep[int(np.argmax(t[keep] == 1))]], s) for p, t, s in zip(full.paths, full.targets, full.splits)]
    dataset = file_dataset("voc3", voc, entries, classes=[full.classes[c] for c in keep], targets=full.targets[:, keep])
    path = extract_to_store(dataset, ColorHistogram(), tmp_path / "voc3" / "color.h5", progress=False)
    settings = ProbeSettings(**{**RECIPES["best"].probe_settings(), "fuse": ()}, cv=2)
    rows = Evaluation(path, GIVEN, settings, out_dir=tmp_path / "out").run(progress=False)
    assert {r["normalization"] for r in rows} == set(RECIPES["best"].normalizations)
    assert all(np.isnan(r["top1"]) and 0 <= r["mAP"] <= 1 and r["search"] == "cv2x3" for r in rows)
    table = pd.DataFrame(rows).assign(kind="cnn")  # the ablation is the CNN rows'; these stand in for them
    steps = ablation(table, "mAP")
    assert steps["step"].iloc[-1].endswith("= RECIPE=best") and steps["candidates"].iloc[-1] == 3
    assert steps["cv_score"].iloc[-1] == max(r["cv_score"] for r in rows)
