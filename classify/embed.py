"""Seeing the layers: a t-SNE of every stored layer, and the numbers that back the picture.

For each store and layer, a seeded class-balanced sample of images is embedded in 2-D:
features standardised, reduced to 50 dimensions by PCA, then t-SNE (openTSNE; scikit-learn's
TSNE when openTSNE is missing). ``results/<dataset>/layers.csv`` gets, per layer:

* ``knn_acc_features``: leave-one-out k-NN accuracy on the standardised features;
* ``knn_acc_tsne``: the same in the 2-D embedding (what the picture shows);
* ``silhouette``: silhouette score of the classes on the standardised features
  (-1 .. 1; above 0, images sit nearer their own class than the next one);
* ``probe_top1``: the test accuracy of the layer's linear probe from results.csv (of the
  classifier with the better cross-validation score, when there are several).

Low layers of a CNN give generic features whose classes overlap; high layers cluster by
meaning. These columns show that trend in numbers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from classify.report import TEXT_ONLY
from classify.results import best_per, read_results, update_csv
from extract.store import FeatureStore

log = logging.getLogger(__name__)
logging.getLogger("openTSNE").setLevel(logging.WARNING)  # it logs every optimisation phase at INFO

DEFAULT_SAMPLES = 1000
PCA_DIMENSIONS = 50
KNN_K = 10
PERPLEXITY = 30.0
LAYER_COLUMNS = [
    "dataset", "features", "kind", "layer", "layer_depth", "n_samples", "n_classes", "seed", "knn_k",
    "knn_acc_features", "knn_acc_tsne", "silhouette", "probe_top1", "tsne", "seconds",
]


def balanced_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to ``n`` row indices, as equal per class as the classes allow, seeded; sorted."""
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(depth < len(members) for members in by_class):
        for c in rng.permutation(len(by_class)):
            if depth < len(by_class[c]) and len(chosen) < n:
                chosen.append(int(by_class[c][depth]))
        depth += 1
    return np.sort(np.asarray(chosen, dtype=np.int64))


def tsne_2d(X: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D t-SNE of standardised, PCA-reduced features; returns (embedding, which library)."""
    perplexity = min(PERPLEXITY, max(2.0, (len(X) - 1) / 3))
    try:
        from openTSNE import TSNE

        embedding = TSNE(perplexity=perplexity, random_state=seed, n_jobs=1, verbose=False).fit(X)
        return np.asarray(embedding), "openTSNE"
    except ImportError:
        from sklearn.manifold import TSNE

        return TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(X), "scikit-learn"


def knn_accuracy(X: np.ndarray, y: np.ndarray, k: int = KNN_K) -> float:
    """Leave-one-out k-NN accuracy: each point is classified by the majority of its k nearest
    others (ties go to the class of the nearest among the tied)."""
    k = min(k, len(X) - 1)
    if k < 1:
        return float("nan")
    _, neighbours = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    neighbours = neighbours[:, 1:]  # drop each point itself
    votes = y[neighbours]
    correct = 0
    for row, true in zip(votes, y):
        counts = np.bincount(row)
        tied = np.flatnonzero(counts == counts.max())
        predicted = next(label for label in row if label in tied)
        correct += predicted == true
    return correct / len(y)


def embed_layer(X: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Everything for one layer: 2-D embedding and the three cluster numbers."""
    start = time.perf_counter()
    with threadpool_limits(1):
        standardised = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
        reduced = standardised
        if standardised.shape[1] > PCA_DIMENSIONS and len(X) > PCA_DIMENSIONS:
            reduced = PCA(PCA_DIMENSIONS, random_state=seed).fit_transform(standardised)
        embedding, library = tsne_2d(reduced, seed)
        several = len(np.unique(labels)) > 1
        return {
            "embedding": embedding, "tsne": library,
            "knn_acc_features": knn_accuracy(standardised, labels), "knn_acc_tsne": knn_accuracy(embedding, labels),
            "silhouette": float(silhouette_score(standardised, labels)) if several else float("nan"),
            "seconds": time.perf_counter() - start,
        }


def _scatter(ax, embedding, labels, classes, title: str) -> None:
    colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for c in np.unique(labels):
        points = embedding[labels == c]
        ax.scatter(points[:, 0], points[:, 1], s=5, alpha=0.75, color=colours(c % colours.N), label=legend_label(classes[c]), linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1", fontsize=8)
    ax.set_ylabel("t-SNE 2", fontsize=8)


def legend_label(name: str) -> str:
    """A class name for a legend: matplotlib leaves out labels that begin with an underscore."""
    return f" {name}" if str(name).startswith("_") else str(name)


def _legend(fig_or_ax, classes, labels, **kwargs) -> None:
    if len(classes) > 20:
        return  # 20+ colours are not readable; the panel titles carry the numbers
    colours = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours(c % colours.N), label=legend_label(classes[c]))
               for c in np.unique(labels)]
    fig_or_ax.legend(handles=handles, fontsize=8, markerscale=1.2, **kwargs)


def _title(record: dict) -> str:
    probe = f", probe {100 * record['probe_top1']:.0f}%" if np.isfinite(record["probe_top1"]) else ""
    return (f"{record['features']} / {record['layer']}\n"
            f"k-NN {100 * record['knn_acc_features']:.0f}% (2-D {100 * record['knn_acc_tsne']:.0f}%), "
            f"sil {record['silhouette']:.2f}{probe}")


def _probe_accuracy(results_csv: Path) -> dict:
    """(features, layer) -> test top-1 of the probe chosen by cross-validation score."""
    results = read_results(results_csv)
    if results is None:
        return {}
    given = results[results["protocol"] == "given"]
    if given.empty:
        return {}
    chosen = best_per(given, ["features", "layer"])
    return {} if chosen.empty else chosen.set_index(["features", "layer"])["top1"].to_dict()


@plt.rc_context(TEXT_ONLY)
def embed_stores(store_paths, *, out_dir: Path, report_dir: Path, n: int = DEFAULT_SAMPLES, seed: int = 0,
                 layers=None, progress: bool = True) -> pd.DataFrame:
    """t-SNE and numbers for every layer of every store; writes layers.csv, one PNG per layer
    under ``report_dir/tsne/`` and ``report_dir/tsne_grid.png``."""
    probe = _probe_accuracy(out_dir / "results.csv")
    records, panels = [], []
    jobs = []
    for path in store_paths:
        with FeatureStore(path) as store:
            jobs += [(path, tap) for tap in store.taps if layers is None or tap in set(layers)]
    (report_dir / "tsne").mkdir(parents=True, exist_ok=True)
    for path, tap in tqdm(jobs, desc="t-SNE", disable=not progress):
        with FeatureStore(path) as store:
            if store.dim(tap) == 0 or len(store) < 3:
                continue
            rows = balanced_sample(store.labels, n, seed)
            labels, classes = store.labels[rows], store.classes
            result = embed_layer(store.features(tap, rows), labels, seed)
            record = {
                "dataset": store.dataset, "features": store.extractor, "kind": store.kind, "layer": tap,
                "layer_depth": store.taps.index(tap), "n_samples": len(rows), "n_classes": len(np.unique(labels)), "seed": seed,
                "knn_k": min(KNN_K, len(rows) - 1), **{k: v for k, v in result.items() if k != "embedding"},
                "probe_top1": probe.get((store.extractor, tap), float("nan")),
            }
        records.append(record)
        panels.append((record, result["embedding"], labels, classes))
        fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
        _scatter(ax, result["embedding"], labels, classes, _title(record))
        _legend(ax, classes, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class", title_fontsize=8)
        fig.savefig(report_dir / "tsne" / f"{record['features']}__{tap}.png", dpi=110)
        plt.close(fig)
    table = pd.DataFrame(records, columns=LAYER_COLUMNS)
    def merge(old: pd.DataFrame | None) -> pd.DataFrame:  # this run's stores replace their rows; others stay
        if old is None:
            return table
        kept = old[~old["features"].isin(table["features"])].reindex(columns=LAYER_COLUMNS)
        return pd.concat([kept, table], ignore_index=True) if len(kept) else table

    # Under the file's lock and atomically: `make tsne` of another backbone may write beside this one.
    update_csv(out_dir / "layers.csv", merge, float_format="%.4f")
    if panels:
        plot_grid(panels, report_dir / "tsne_grid.png")
    return table


@plt.rc_context(TEXT_ONLY)
def plot_grid(panels, path: Path, columns: int = 4) -> Path:
    """All panels, CNN layers first from low to high, then the baselines."""
    panels = sorted(panels, key=lambda p: (p[0]["kind"] != "cnn", p[0]["features"], p[0]["layer_depth"]))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.0 * rows + 0.8), squeeze=False, constrained_layout=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (record, embedding, labels, classes) in zip(axes.flat, panels):
        _scatter(ax, embedding, labels, classes, _title(record))
    record, _, labels, classes = panels[0]
    fig.suptitle(f"{record['dataset']}: t-SNE of each layer ({record['n_samples']} images, class-balanced, seed {record['seed']}); "
                 "k-NN: leave-one-out accuracy, sil: silhouette", fontsize=11)
    _legend(fig, classes, labels, loc="outside lower center", ncols=min(10, len(classes)))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
