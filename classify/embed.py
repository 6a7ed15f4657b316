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

``results/<dataset>/embeddings/<features>.npz`` keeps what the HTML page (``classify.page``) and
the projector files show: the sample's rows, paths, labels and splits, and per layer the 2-D
embedding and each image's ``NEIGHBOURS`` nearest others in the standardised features (not in
the picture), under the store's fingerprint id: a store rebuilt since is never shown with them.

Low layers of a CNN give generic features whose classes overlap; high layers cluster by
meaning. These columns show that trend in numbers.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
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

from classify.evaluate import store_fingerprint_id
from classify.report.plots import TEXT_ONLY
from classify.results import best_per, read_results, update_csv
from extract.arguments import SEEDS, check, whole
from extract.fileio import save_arrays
from extract.store import FeatureStore

log = logging.getLogger(__name__)
logging.getLogger("openTSNE").setLevel(logging.WARNING)  # it logs every optimisation phase at INFO

DEFAULT_SAMPLES = 1000
TSNE_SAMPLES = whole(3)  # the images of a sample: t-SNE needs three at least
PCA_DIMENSIONS = 50
KNN_K = 10
PERPLEXITY = 30.0
NEIGHBOURS = 8  # nearest images per point that the page shows on a click
EMBEDDINGS = "embeddings"  # results/<dataset>/embeddings/<features>.npz
# Bump when a change to this code alters an embedding or a number of layers.csv (CONTRIBUTING.md): an
# embeddings file of another version is then recomputed whole, never merged with this version's layers.
EMBEDDING_VERSION = 1
LAYER_COLUMNS = [
    "dataset", "features", "kind", "layer", "layer_depth", "n_samples", "n_classes", "seed", "embedding_version", "knn_k",
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


def nearest_neighbours(X: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest other rows (Euclidean), nearest first: (n, min(k, n - 1)) indices.
    A row is left out of its own list even when another row has the same features (and so may
    come first)."""
    k = min(k, len(X) - 1)
    if k < 1:
        return np.zeros((len(X), 0), np.int64)
    _, found = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    others = found != np.arange(len(X))[:, None]
    first = np.argsort(~others, axis=1, kind="stable")[:, :k]  # the columns that are not the row itself, in order
    return np.take_along_axis(found, first, axis=1)


def vote_accuracy(neighbours: np.ndarray, y: np.ndarray) -> float:
    """Each point classified by the majority of its neighbours' labels (ties go to the class of the
    nearest among the tied): the fraction right."""
    if neighbours.shape[1] < 1:
        return float("nan")
    correct = 0
    for row, true in zip(y[neighbours], y):
        counts = np.bincount(row)
        tied = np.flatnonzero(counts == counts.max())
        predicted = next(label for label in row if label in tied)
        correct += predicted == true
    return correct / len(y)


def knn_accuracy(X: np.ndarray, y: np.ndarray, k: int = KNN_K) -> float:
    """Leave-one-out k-NN accuracy: each point is classified by the majority of its k nearest
    others (ties go to the class of the nearest among the tied)."""
    return vote_accuracy(nearest_neighbours(X, k), y)


def embed_layer(X: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Everything for one layer: 2-D embedding, each point's ``NEIGHBOURS`` nearest others in the
    standardised features, and the three cluster numbers."""
    start = time.perf_counter()
    with threadpool_limits(1):
        standardised = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
        reduced = standardised
        if standardised.shape[1] > PCA_DIMENSIONS and len(X) > PCA_DIMENSIONS:
            reduced = PCA(PCA_DIMENSIONS, random_state=seed).fit_transform(standardised)
        embedding, library = tsne_2d(reduced, seed)
        neighbours = nearest_neighbours(standardised, max(KNN_K, NEIGHBOURS))
        several = len(np.unique(labels)) > 1
        return {
            "embedding": embedding, "tsne": library, "neighbours": neighbours[:, :NEIGHBOURS],
            "knn_acc_features": vote_accuracy(neighbours[:, :KNN_K], labels), "knn_acc_tsne": knn_accuracy(embedding, labels),
            "silhouette": float(silhouette_score(standardised, labels)) if several else float("nan"),
            "seconds": time.perf_counter() - start,
        }


@dataclass
class StoreEmbedding:
    """The t-SNE sample of one store: which images, and per layer (in the store's tap order) their
    2-D positions and nearest neighbours (indices into the sample). ``fingerprint_id`` names the
    store's settings and image list it was computed from."""

    features: str
    kind: str
    fingerprint_id: str
    seed: int
    classes: list[str]
    rows: np.ndarray
    paths: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tap -> (embedding, neighbours)
    version: int = EMBEDDING_VERSION

    def same_sample(self, other: StoreEmbedding) -> bool:
        return ((self.fingerprint_id, self.seed, self.version) == (other.fingerprint_id, other.seed, other.version)
                and np.array_equal(self.rows, other.rows))

    def save(self, path: Path) -> Path:
        """Atomically (a temporary file renamed over ``path``)."""
        meta = {"features": self.features, "kind": self.kind, "fingerprint_id": self.fingerprint_id, "seed": self.seed, "version": self.version,
                "classes": list(self.classes), "taps": list(self.layers)}
        arrays = {"meta": np.array(json.dumps(meta)), "rows": self.rows, "paths": np.asarray(self.paths, dtype=str),
                  "labels": self.labels, "splits": np.asarray(self.splits, dtype=str)}
        for i, (embedding, neighbours) in enumerate(self.layers.values()):
            arrays[f"embedding_{i}"] = np.asarray(embedding, np.float32)
            arrays[f"neighbours_{i}"] = np.asarray(neighbours, np.int32)
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_arrays(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> StoreEmbedding | None:
        """None when there is no such file."""
        if not path.is_file():
            return None
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            layers = {tap: (data[f"embedding_{i}"], data[f"neighbours_{i}"]) for i, tap in enumerate(meta["taps"])}
            return cls(meta["features"], meta["kind"], meta["fingerprint_id"], int(meta["seed"]), meta["classes"], data["rows"],
                       data["paths"], data["labels"], data["splits"], layers, int(meta.get("version", 0)))


def embeddings_path(out_dir: Path, features: str) -> Path:
    return Path(out_dir) / EMBEDDINGS / f"{features}.npz"


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
    under ``report_dir/tsne/``, ``report_dir/tsne_grid.png`` and each store's embeddings file."""
    check("t-SNE", "n", n, TSNE_SAMPLES)
    check("t-SNE", "seed", seed, SEEDS)
    probe = _probe_accuracy(out_dir / "results.csv")
    records, panels = [], []
    jobs = []
    for path in store_paths:
        with FeatureStore(path) as store:
            jobs += [(path, tap) for tap in store.taps if layers is None or tap in set(layers)]
    (report_dir / "tsne").mkdir(parents=True, exist_ok=True)
    embeddings: dict[Path, StoreEmbedding] = {}
    taps: dict[Path, list[str]] = {}
    for path, tap in tqdm(jobs, desc="t-SNE", disable=not progress):
        with FeatureStore(path) as store:
            if store.dim(tap) == 0 or len(store) < 3:
                continue
            rows = balanced_sample(store.labels, n, seed)
            labels, classes = store.labels[rows], store.classes
            result = embed_layer(store.features(tap, rows), labels, seed)
            record = {
                "dataset": store.dataset, "features": store.extractor, "kind": store.kind, "layer": tap,
                "layer_depth": store.taps.index(tap), "n_samples": len(rows), "n_classes": len(np.unique(labels)), "seed": seed, "embedding_version": EMBEDDING_VERSION,
                "knn_k": min(KNN_K, len(rows) - 1), **{k: v for k, v in result.items() if k not in ("embedding", "neighbours")},
                "probe_top1": probe.get((store.extractor, tap), float("nan")),
            }
            if path not in embeddings:
                embeddings[path] = StoreEmbedding(store.extractor, store.kind, store_fingerprint_id(store.fingerprint, store.dataset_digest),
                                                  seed, classes, rows, store.paths[rows], labels, store.splits[rows])
            embeddings[path].layers[tap] = (result["embedding"], result["neighbours"])
            taps[path] = store.taps
        records.append(record)
        panels.append((record, result["embedding"], labels, classes))
        fig, ax = plt.subplots(figsize=(7.5, 6), constrained_layout=True)
        _scatter(ax, result["embedding"], labels, classes, _title(record))
        _legend(ax, classes, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class", title_fontsize=8)
        fig.savefig(report_dir / "tsne" / f"{record['features']}__{tap}.png", dpi=110)
        plt.close(fig)
    for path, embedding in embeddings.items():
        save_embeddings(embedding, embeddings_path(out_dir, embedding.features), taps[path])
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


def save_embeddings(embedding: StoreEmbedding, path: Path, taps: list[str]) -> Path:
    """Write ``embedding``, keeping the layers of the file already there that this run did not
    embed when they come from the same sample of the same store."""
    old = StoreEmbedding.load(path)
    kept = old.layers if old is not None and old.same_sample(embedding) else {}
    merged = {**kept, **embedding.layers}
    embedding.layers = {tap: merged[tap] for tap in taps if tap in merged}
    return embedding.save(path)


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
