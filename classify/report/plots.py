"""The report's figures (matplotlib PNGs): accuracy by layer, each feature set at its chosen layer,
the chosen probe's confusions, few-shot curves, the rule of thumb, and the cross-dataset summary."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
import numpy as np
import pandas as pd

from classify import fusion
from classify.report.rows import chosen_per
from classify.results import best_per
from transfer.analysis import regime_depth

# Names are drawn as the text they are: no mathtext, whose parser dies on a class named `a$\bogus$b`.
TEXT_ONLY = {"text.parse_math": False}
METRIC_LABELS = {"top1": "top-1 accuracy", "mean_per_class_acc": "mean per-class accuracy", "mAP": "mean average precision"}


@plt.rc_context(TEXT_ONLY)
def plot_accuracy_by_layer(table: pd.DataFrame, path: Path, *, chosen: pd.Series | None, metric: str = "top1", title: str = "") -> Path:
    """CNN layers as curves (``kind`` cnn); baseline variants, fine-tuned and trained models as
    horizontal lines. Backbones with other taps share the axis by relative depth, each point
    labelled with its tap. ``chosen``: the row the headline names, starred."""
    fig, ax = plt.subplots(figsize=(12, 5.5), constrained_layout=True)
    styles = {"logreg": "-", "svm": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    single = ~table["layer"].astype(str).map(fusion.is_fused)
    # One point per tap and classifier: its normalisation chosen by CV where several were tried.
    curves = table[(table["kind"] == "cnn") & single]
    curves = best_per(curves, ["features", "layer", "classifier"]) if len(curves) else curves
    cnn = list(curves["features"].unique())
    tap_lists = {tuple(rows.sort_values("layer_depth")["layer"].unique()) for _, rows in curves.groupby("features")}
    shared_taps = len(tap_lists) == 1
    for i, features in enumerate(cnn):
        for classifier, rows in curves[curves["features"] == features].groupby("classifier"):
            rows = rows.sort_values("layer_depth")
            depth = rows["layer_depth"].rank(method="dense").to_numpy() - 1
            x = depth if shared_taps else depth / max(depth.max(), 1)
            ax.plot(x, 100 * rows[metric], styles.get(classifier, ":"), marker="o", color=colors[i % len(colors)],
                    label=f"{features} ({classifier})")
            if chosen is not None and (chosen["features"], chosen["classifier"]) == (features, classifier):
                at = (rows["layer"] == chosen["layer"]).to_numpy()
                ax.plot(x[at], 100 * rows[metric].to_numpy()[at], "*", markersize=16, color="gold", markeredgecolor="black",
                        label="chosen by CV on the training data", zorder=5)
            if not shared_taps:
                for xi, yi, name in zip(x, 100 * rows[metric], rows["layer"]):
                    ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                                color=colors[i % len(colors)])
    lines = table[(table["kind"] != "cnn") | ~single]
    if len(lines):  # one line per baseline variant or fused layer (its classifier chosen by CV score) or trained model
        best_lines = chosen_per(lines, ["features", "layer"]).sort_values(metric, ascending=False)
        for j, record in enumerate(best_lines.itertuples()):
            value = 100 * getattr(record, metric)
            ax.axhline(value, linestyle=":" if j % 2 else "--", color=colors[(len(cnn) + j) % len(colors)], linewidth=1.5,
                       label=f"{record.features} / {record.layer} ({record.classifier}): {value:.1f}%")
    if shared_taps and tap_lists:
        ticks = next(iter(tap_lists))
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right")
        ax.set_xlabel("tapped layer (low to high)")
    else:
        ax.set_xticks([0, 0.5, 1], ["lowest tap", "middle", "highest tap"])
        ax.set_xlabel("relative depth of the tap in its network")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
    ax.set_title(title or f"Linear-probe {METRIC_LABELS[metric]} by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              title="curves: CNN layers; lines: baselines\nand trained models (fine-tuned, recipe)", title_fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@plt.rc_context(TEXT_ONLY)
def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, *, title: str) -> Path:
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.45 * len(classes) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), constrained_layout=True)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    if len(classes) <= 20:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction of the true class", shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@plt.rc_context(TEXT_ONLY)
def plot_few_shot(table: pd.DataFrame, path: Path, *, metric: str, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    table = table.assign(shots=table["protocol"].str.removesuffix("-shot").astype(int))
    for (features, layer, classifier), rows in table.groupby(["features", "layer", "classifier"]):
        rows = rows.sort_values("shots")
        ax.errorbar(rows["shots"], 100 * rows[metric], yerr=100 * rows[f"{metric}_std"], marker="o", capsize=3,
                    label=f"{features} / {layer} ({classifier})")
    ax.set_xscale("log")
    shots = sorted(table["shots"].unique())
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (%), mean ± std over draws")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@plt.rc_context(TEXT_ONLY)
def plot_best_per_method(table: pd.DataFrame, path: Path, *, metric: str, title: str) -> Path:
    """Per feature set, the layer and classifier chosen by CV score (and each trained model)."""
    best = chosen_per(table, ["features"]).sort_values(metric)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(best) + 1.8), constrained_layout=True)
    bars = ax.barh([f"{r.features} / {r.layer} ({r.classifier})" for r in best.itertuples()], 100 * best[metric], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    ax.set_xlabel(f"{METRIC_LABELS[metric]} (%)")
    ax.set_xlim(0, 105)
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@plt.rc_context(TEXT_ONLY)
def plot_rule_of_thumb(curves: pd.DataFrame, path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for regime in sorted(curves["regime"].unique(), key=regime_depth):
        rows = curves[curves["regime"] == regime].sort_values("per_class")
        ax.errorbar(rows["per_class"], 100 * rows["mean"], yerr=100 * rows["std"], marker="o", capsize=3, label=regime)
    ax.set_xscale("log")
    sizes = sorted(curves["per_class"].unique())
    ax.set_xticks(sizes, [str(k) for k in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())  # the sizes are the only labels
    ax.set_xlabel("labelled training images per class (log scale)")
    ax.set_ylabel("top-1 accuracy (%), mean ± std over draws")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="trained", fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@plt.rc_context(TEXT_ONLY)
def plot_summary(table: pd.DataFrame, datasets: list[str], path: Path) -> Path:
    """Per dataset, the test score of the best CNN and of the best baseline (rows of summary.csv), side by side."""
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(datasets) + 2), 4.5), constrained_layout=True)
    width = 0.38
    for offset, (label, colour) in zip((-width / 2, width / 2), (("best CNN", "tab:blue"), ("best baseline", "tab:gray"))):
        values = [table[(table["dataset"] == d) & table["method"].str.startswith(label)]["score %"].max() for d in datasets]
        bars = ax.bar(np.arange(len(datasets)) + offset, np.nan_to_num(values), width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(datasets)), datasets, rotation=20, ha="right")
    ax.set_ylabel("score (%): top-1, or mAP for multi-label")
    ax.set_ylim(0, 105)
    ax.set_title("Off-the-shelf CNN features vs hand-crafted baselines, per dataset")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
