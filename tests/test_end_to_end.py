"""A small end-to-end run through the command lines: images -> stores -> probes -> report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_image_tree, shared_data

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _run_all(dataset: str, out: Path, *extract_args, baseline_args=()) -> pd.DataFrame:
    dirs = ["--features-dir", str(out / "features")]
    _cli("extract", "features", "--dataset", dataset, *dirs, "--no-progress", *extract_args)
    _cli("baselines", "--dataset", dataset, *dirs, "--no-progress", *baseline_args)
    outs = [*dirs, "--results-dir", str(out / "results"), "--reports-dir", str(out / "reports")]
    _cli("classify", "probe", "--dataset", dataset, *outs, "--no-progress", "--cs", "0.01,1")
    _cli("classify", "tsne", "--dataset", dataset, *outs, "--no-progress", "--n", "60")
    printed = _cli("classify", "report", "--dataset", dataset, *outs)
    assert "report:" in printed and "index.html" in printed
    return pd.read_csv(out / "results" / Path(dataset.split(":")[-1]).name / "results.csv")


@pytest.mark.slow
def test_end_to_end_on_generated_images(tmp_path):
    tree = make_image_tree(tmp_path / "shapes", per_class={"train": 12, "test": 6})
    results = _run_all(f"folder:{tree}", tmp_path, "--layers", "stem,stage4,pre_logits")
    assert set(results["features"]) == {"efficientnet_lite0", "hog", "surf_bow", "sift_bow", "sift_vlad", "sift_fisher", "color", "raw"}
    assert list(results.loc[results["features"] == "efficientnet_lite0", "layer"]) == ["stem", "stage4", "pre_logits"]
    assert (results["n_train"] == 24).all() and (results["n_test"] == 12).all()
    assert results.set_index("layer").loc["pre_logits", "top1"] >= 0.9  # circles vs squares are easy for ImageNet features
    report = (tmp_path / "reports" / "shapes" / "report.md").read_text()
    # the headline names the results.csv row of highest CV score (ties: first by features, depth,
    # classifier) with its own numbers, and the table bolds that row's test scores
    top = results[results["cv_score"] == results["cv_score"].max()].sort_values(["features", "layer_depth", "classifier"]).iloc[0]
    assert (f"Best by cross-validation on the training data: **{top.features} / {top.layer} / {top.classifier}** "
            f"(CV {100 * top.cv_score:.2f}%, the highest of {len(results)} candidates), top-1 {100 * top.top1:.2f}%, "
            f"mean per-class {100 * top.mean_per_class_acc:.2f}% on the test split") in report
    bold_rows = [line for line in report.splitlines() if line.startswith("| ") and f"| **{100 * top.top1:.2f}** |" in line]
    assert len(bold_rows) == 1 and bold_rows[0].startswith(f"| {top.features} | {top.layer} | {top.classifier} |"), bold_rows
    assert "![accuracy by layer](accuracy_by_layer.png)" in report
    assert (tmp_path / "reports" / "shapes" / "accuracy_by_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    layers = pd.read_csv(tmp_path / "results" / "shapes" / "layers.csv")
    assert len(layers) == len(results)  # one row per stored layer: CNN taps and baseline variants
    assert layers[["knn_acc_features", "knn_acc_tsne"]].stack().between(0, 1).all()
    assert layers.set_index("layer").loc["pre_logits", "knn_acc_features"] >= 0.9
    assert (tmp_path / "reports" / "shapes" / "tsne" / "efficientnet_lite0__stem.png").is_file()
    for section in ("![t-SNE of each layer](tsne_grid.png)", "## Published numbers", "## Run time and throughput",
                    "## Environment", "| efficientnet_lite0 | 36 |"):
        assert section in report, section
    _cli("classify", "summary", "--datasets", f"folder:{tree}", "--results-dir", str(tmp_path / "results"),
         "--reports-dir", str(tmp_path / "reports"))
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "| shapes | best CNN layer | efficientnet_lite0 |" in summary and "| shapes | best baseline |" in summary

    # `make classify` again on unchanged stores: every probe comes from results.csv, nothing is refitted
    outs = ["--features-dir", str(tmp_path / "features"), "--results-dir", str(tmp_path / "results"), "--reports-dir", str(tmp_path / "reports")]
    again = _cli("classify", "probe", "--dataset", f"folder:{tree}", *outs, "--no-progress", "--cs", "0.01,1")
    assert f"({len(results)} rows, {len(results)} probe jobs cached;" in again
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / "shapes" / "results.csv"), results)


def test_errors_are_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "extract", "features", "--dataset", f"folder:{tmp_path / 'none'}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: dataset folder not found")


@pytest.mark.shared_data
@pytest.mark.slow
def test_hymenoptera_lite0_beats_hog(tmp_path):
    results = _run_all(f"folder:{shared_data('hymenoptera')}", tmp_path, "--layers", "stage2,pre_logits", baseline_args=("--baselines", "hog,color"))
    from classify.results import best_per

    best = best_per(results, ["features"]).set_index("features")["top1"]  # each store's layer chosen by CV
    assert best["efficientnet_lite0"] > best["hog"] + 0.1
    assert best["efficientnet_lite0"] > 0.85
    # the picture's claim in numbers: the top layer clusters the classes better than a low one
    layers = pd.read_csv(tmp_path / "results" / "hymenoptera" / "layers.csv").set_index("layer")
    assert layers.loc["pre_logits", "knn_acc_features"] > layers.loc["stage2", "knn_acc_features"] + 0.1
    assert layers.loc["pre_logits", "silhouette"] > layers.loc["stage2", "silhouette"]

    # C is chosen by held-out loss, which moves continuously with the features: real features
    # changed at float rounding (as BatchNorm folding or another BLAS does) choose the same C
    from classify.probe import LinearProbe
    from extract.store import FeatureStore

    with FeatureStore(tmp_path / "features" / "hymenoptera" / "efficientnet_lite0.h5") as store:
        train = store.splits == "train"
        test = ~train  # hymenoptera's val folder
        X, labels = store.features("pre_logits"), store.labels
    rounded = X * (1 + 1e-6 * np.random.default_rng(0).standard_normal(X.shape)).astype(np.float32)
    probes = [LinearProbe(seed=0).fit(features[train], labels[train]) for features in (X, rounded)]
    assert probes[0].best_C_ == probes[1].best_C_
    assert np.mean(probes[0].predict(X[test]) != probes[1].predict(rounded[test])) <= 1 / test.sum()


@pytest.mark.slow
def test_make_benchmark_on_office_runs_every_baseline_and_both_protocols(tmp_path):
    """`make benchmark DATASET=office31` with the default BASELINES (all seven, paper preset): Lite0 and
    every baseline get a row for every layer and every domain pair, whole-source and sampled, and the
    report puts them side by side per transfer."""
    import numpy as np
    from PIL import Image

    from extract.datasets import DATASETS
    from extract.store import FeatureStore

    office = tmp_path / "office31"
    rng = np.random.default_rng(0)
    for d, domain in enumerate(("amazon", "dslr", "webcam")):
        for c, name in enumerate(("mug", "bike")):
            for n in range(3):
                tile = rng.integers(0, 120, (8, 8, 3)) + np.array([120 * (c == 0), 40, 120 * (c == 1)])  # red mugs, blue bikes
                path = office / domain / "images" / name / f"frame_{n:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.kron(tile, np.ones((8, 8, 1))).astype(np.uint8)).save(path, quality=90)
    dirs = {"FEATURES_DIR": tmp_path / "features", "RESULTS_DIR": tmp_path / "results", "REPORTS_DIR": tmp_path / "reports"}
    done = subprocess.run(["make", "--no-print-directory", "benchmark", "DATASET=office31", f"DATA_DIR={office}", "N=18", "REPEATS=2",
                           *(f"{k}={v}" for k, v in dirs.items())], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = pd.read_csv(tmp_path / "results" / "office31" / "results.csv")
    protocols = set(DATASETS["office31"].protocols)
    assert {p.split(":")[0] for p in protocols} == {"transfer", "sampled"} and len(protocols) == 12
    stores = sorted((tmp_path / "features" / "office31").glob("*.h5"))
    assert [p.stem for p in stores] == sorted(["efficientnet_lite0", "hog", "surf_bow", "sift_bow", "sift_vlad", "sift_fisher", "color", "raw"])
    for path in stores:
        with FeatureStore(path) as store:
            expected = {(layer, protocol) for layer in store.taps for protocol in protocols}
        found = set(zip(*results.loc[results["features"] == path.stem, ["layer", "protocol"]].to_numpy().T))
        assert found == expected, path.stem
    sampled = results[results["protocol"] == "sampled:amazon->webcam"]
    assert (sampled["n_train"] == 6).all() and (sampled["repeats"] == 2).all()  # all 3 per class (fewer than 20)
    report = (tmp_path / "reports" / "office31" / "report.md").read_text()
    assert "## Domain transfer: whole source domain" in report and "## Domain transfer: sampled protocol" in report
    table = report.split("## Domain transfer: sampled protocol")[1]
    assert "| source -> target | color | efficientnet_lite0 | hog | raw | sift_bow | sift_fisher | sift_vlad | surf_bow |" in table
    assert "| amazon->webcam |" in table
