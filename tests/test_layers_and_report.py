"""Layer-wise cluster numbers, the t-SNE sample, and report sections for other protocols."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from classify.embed import balanced_sample, embed_layer, knn_accuracy
from classify.results import PROBES_VERSION, RESULT_COLUMNS
from classify.report import write_report, write_summary


def test_knn_accuracy_separates_structure_from_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 50)
    clustered = rng.normal(0, 0.3, (200, 10)) + 5 * np.eye(10)[y]
    assert knn_accuracy(clustered, y) == 1.0
    noise = rng.normal(0, 1, (200, 10))
    assert knn_accuracy(noise, y) < 0.45  # chance is 0.25
    far = embed_layer(clustered, y, seed=0)
    mixed = embed_layer(noise, y, seed=0)
    assert far["embedding"].shape == (200, 2) and far["tsne"] == "openTSNE"
    assert far["silhouette"] > 0.2 and mixed["silhouette"] < 0.05
    assert far["knn_acc_tsne"] > 0.95 and mixed["knn_acc_tsne"] < 0.5
    again = embed_layer(clustered, y, seed=0)
    np.testing.assert_allclose(again["embedding"], far["embedding"])  # seeded


def test_balanced_sample_is_seeded_and_balanced():
    labels = np.array([0] * 100 + [1] * 10 + [2] * 40)
    rows = balanced_sample(labels, 60, seed=3)
    assert len(rows) == 60 and np.all(np.diff(rows) > 0)
    assert sorted(np.bincount(labels[rows])) == [10, 25, 25]
    np.testing.assert_array_equal(rows, balanced_sample(labels, 60, seed=3))
    assert len(balanced_sample(labels, 1000, seed=0)) == 150


def _rows(dataset, records):
    base = {**{column: 0 for column in RESULT_COLUMNS}, "probe_version": PROBES_VERSION}
    return pd.DataFrame([{**base, "dataset": dataset, "converged": True, "normalization": "standard", "mAP": np.nan,
                          "mAP_voc07": np.nan, **r} for r in records], columns=RESULT_COLUMNS)


def test_domain_report_ranks_by_the_mean_over_transfers(tmp_path):
    records = []
    for protocol, scores in (("transfer:amazon->webcam", (0.6, 0.2)), ("transfer:dslr->webcam", (0.9, 0.4))):
        records += [
            {"features": "efficientnet_lite0", "kind": "cnn", "layer": "pre_logits", "layer_depth": 8, "classifier": "logreg",
             "protocol": protocol, "top1": scores[0], "mean_per_class_acc": scores[0], "n_train": 100, "n_test": 50,
             "cv_score": 0.95, "selection": "C by 3-fold CV (lowest held-out log-loss)"},
            {"features": "surf_bow", "kind": "baseline", "layer": "bow", "layer_depth": 0, "classifier": "logreg",
             "protocol": protocol, "top1": scores[1], "mean_per_class_acc": scores[1], "n_train": 100, "n_test": 50,
             "cv_score": 0.5, "selection": "C by 3-fold CV (lowest held-out log-loss)"},
        ]
    results = tmp_path / "results" / "office31"
    results.mkdir(parents=True)
    _rows("office31", records).to_csv(results / "results.csv", index=False)
    report = write_report(results / "results.csv", tmp_path / "reports" / "office31").read_text()
    assert "top-1 75.00%" in report  # (0.6 + 0.9) / 2
    assert "(+45.00 points for the best)" in report
    assert "DeCAF6 LogReg / SVM" in report and "other networks and protocols" in report
    # DeCAF's Office table: per transfer, each feature set beside the other
    assert "## Domain transfer: whole source domain" in report
    assert "| source -> target | efficientnet_lite0 | surf_bow |" in report
    assert "| amazon->webcam | 60.0 (pre_logits) | 20.0 (bow) |" in report
    summary = write_summary(tmp_path / "results", tmp_path / "reports", ["office31"]).read_text()
    assert "| office31 | best CNN layer | efficientnet_lite0 | pre_logits | logreg | standard | top-1 accuracy | 95.0 | 75.0 | 75.0 |" in summary


def test_multilabel_report_uses_map(tmp_path):
    records = [{"features": "efficientnet_lite0", "kind": "cnn", "layer": name, "layer_depth": depth, "classifier": "logreg",
                "protocol": "given", "top1": np.nan, "mean_per_class_acc": np.nan, "mAP": score, "mAP_voc07": score - 0.01,
                "cv_score": score - 0.05, "n_train": 5011, "n_test": 4952} for depth, (name, score) in enumerate((("stem", 0.3), ("pre_logits", 0.8)))]
    results = tmp_path / "results" / "voc2007"
    results.mkdir(parents=True)
    _rows("voc2007", records).to_csv(results / "results.csv", index=False)
    report = write_report(results / "results.csv", tmp_path / "reports" / "voc2007").read_text()
    assert "mAP 80.00% (VOC07 11-point 79.00%)" in report and "| mAP % |" in report
    assert "OverFeat CNN-SVM / CNNaug-SVM" in report
    with pytest.raises(FileNotFoundError, match="absent"):
        write_summary(tmp_path / "results", tmp_path / "reports", ["absent"])


def test_tsne_falls_back_to_scikit_learn_without_opentsne(monkeypatch):
    import sys

    from classify.embed import tsne_2d

    monkeypatch.setitem(sys.modules, "openTSNE", None)  # as if it were not installed
    points = np.random.default_rng(0).normal(size=(40, 5))
    embedding, library = tsne_2d(points, seed=0)
    assert library == "scikit-learn" and embedding.shape == (40, 2)


def test_rule_of_thumb_section_draws_curves_names_winners_and_crossovers(tmp_path):
    from classify.report.sections import rule_of_thumb_section

    means = {"probe": (0.60, 0.70, 0.75, 0.78), "top1": (0.50, 0.68, 0.80, 0.85), "all": (0.40, 0.55, 0.70, 0.90)}
    rows = [{"regime": regime, "per_class": k, "seed": seed, "top1": m + (0.01 if seed else -0.01)}
            for regime, values in means.items() for k, m in zip((5, 10, 20, 50), values) for seed in (0, 1)]
    results = tmp_path / "results" / "flowers"
    results.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(results / "rule_of_thumb.csv", index=False)
    (tmp_path / "reports" / "flowers").mkdir(parents=True)
    text = "\n".join(rule_of_thumb_section(results, tmp_path / "reports" / "flowers"))
    assert "| 5 | probe | 60.0 ± 1.0 | 50.0 ± 1.0 | 40.0 ± 1.0 |" in text  # columns from fewest to most layers trained
    assert "| 20 | top1 |" in text and "| 50 | all |" in text
    assert "- `top1` beats `probe` from 20 images per class on" in text
    assert "- `all` beats `probe` from 50 images per class on" in text
    assert (tmp_path / "reports" / "flowers" / "rule_of_thumb.png").read_bytes()[:4] == b"\x89PNG"
    summary_results = tmp_path / "results"
    pd.DataFrame([{**{c: 0 for c in RESULT_COLUMNS}, "probe_version": PROBES_VERSION, "dataset": "flowers", "features": "efficientnet_lite0", "kind": "cnn",
                   "layer": "pre_logits", "classifier": "logreg", "protocol": "given", "top1": 0.9, "cv_score": 0.9,
                   "mAP": np.nan, "n_train": 1, "n_test": 1}]).to_csv(summary_results / "flowers" / "results.csv", index=False)
    summary = write_summary(summary_results, tmp_path / "reports", ["flowers"]).read_text()
    assert "| per class | flowers |" in summary and "| 50 | all |" in summary
