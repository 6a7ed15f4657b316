"""``reports/<dataset>/report.md``: the results table and accuracy-by-layer plot, from results.csv."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from classify.metrics import confusion, per_class_accuracy
from extract import package_versions
from extract.store import FeatureStore, StoreError

log = logging.getLogger(__name__)
PUBLISHED = Path(__file__).with_name("published.csv")
REPORT_PACKAGES = ("scikit-learn", "opentsne", "mahotas", "scikit-image", "opencv-python-headless", "matplotlib")

METRIC_LABELS = {"top1": "top-1 accuracy", "mean_per_class_acc": "mean per-class accuracy", "mAP": "mean average precision"}


def plot_accuracy_by_layer(table: pd.DataFrame, path: Path, *, metric: str = "top1", title: str = "") -> Path:
    """CNN layers as curves (``kind`` cnn); baseline variants, fine-tuned and trained models as
    horizontal lines. Backbones with other taps share the axis by relative depth, each point
    labelled with its tap."""
    fig, ax = plt.subplots(figsize=(12, 5.5), constrained_layout=True)
    styles = {"logreg": "-", "svm": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = table[table["kind"] == "cnn"]
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
            if not shared_taps:
                for xi, yi, name in zip(x, 100 * rows[metric], rows["layer"]):
                    ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7,
                                color=colors[i % len(colors)])
    lines = table[table["kind"] != "cnn"]
    if len(lines):  # one line per baseline variant or trained model, at its better classifier
        best_lines = lines.loc[lines.groupby(["features", "layer"])[metric].idxmax()].sort_values(metric, ascending=False)
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


def plot_confusion(predictions: pd.DataFrame, classes: list[str], path: Path, *, title: str) -> Path:
    matrix = confusion(predictions["label"], predictions["predicted"], classes)
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
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (%), mean ± std over draws")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_best_per_method(table: pd.DataFrame, path: Path, *, metric: str, title: str) -> Path:
    best = table.loc[table.groupby("features")[metric].idxmax()].sort_values(metric)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(best) + 1.8), constrained_layout=True)
    bars = ax.barh([f"{r.features} / {r.layer} ({r.classifier})" for r in best.itertuples()], 100 * best[metric], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", padding=3, fontsize=8)
    ax.set_xlabel(f"{METRIC_LABELS[metric]} (%)")
    ax.set_xlim(0, 105)
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _predictions_path(results_dir: Path, record) -> Path:
    name = f"{record['layer']}__{record['classifier']}__{record['protocol']}"
    return results_dir / "predictions" / str(record["features"]) / f"{name}.csv"


def _mean_over_protocols(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (features, layer, classifier): metrics averaged over the protocols."""
    keys = ["dataset", "features", "kind", "layer", "layer_depth", "classifier"]
    numeric = ["top1", "mean_per_class_acc", "C", "n_train", "n_test", "n_features", "fit_seconds", "images_without_features"]
    mean = rows.groupby(keys, as_index=False)[numeric].mean()
    counts = ["n_train", "n_test", "n_features", "images_without_features"]
    mean[counts] = mean[counts].round().astype(int)
    count = rows.groupby(keys)["protocol"].nunique().iloc[0]
    return mean.assign(protocol=f"mean of {count} transfers", train_split="source", test_split="target",
                       converged=rows.groupby(keys)["converged"].all().to_numpy(), mAP=np.nan, mAP_voc07=np.nan)


def _scores(record, metric: str) -> str:
    if metric == "mAP":
        return f"mAP {100 * record['mAP']:.2f}% (VOC07 11-point {100 * record['mAP_voc07']:.2f}%)"
    return f"top-1 {100 * record['top1']:.2f}%, mean per-class {100 * record['mean_per_class_acc']:.2f}%"


def layers_section(results_dir: Path, report_dir: Path) -> list[str]:
    """The t-SNE grid and layers.csv, when `make tsne` has run."""
    table_path, grid = results_dir / "layers.csv", report_dir / "tsne_grid.png"
    if not table_path.is_file():
        return ["## Seeing the layers", "", "Run `make tsne` to add t-SNE pictures and layer-wise cluster numbers here.", ""]
    table = pd.read_csv(table_path)
    table = table.assign(baseline=table["kind"] != "cnn").sort_values(["baseline", "features", "layer_depth"])
    shown = pd.DataFrame({
        "features": table["features"], "layer": table["layer"],
        "k-NN % (features)": (100 * table["knn_acc_features"]).round(1), "k-NN % (t-SNE 2-D)": (100 * table["knn_acc_tsne"]).round(1),
        "silhouette": table["silhouette"].round(3), "linear probe %": (100 * table["probe_top1"]).round(1),
    })
    lines = ["## Seeing the layers", "",
             f"t-SNE of {int(table['n_samples'].max())} class-balanced images per layer (seed {int(table['seed'].iloc[0])}; "
             f"standardised, PCA to 50 dimensions, then {table['tsne'].iloc[0]}). Numbers: leave-one-out {int(table['knn_k'].max())}-NN "
             "accuracy on the standardised features and in the 2-D picture, the classes' silhouette score, and the layer's best "
             f"linear probe (`{table_path.as_posix()}`).", ""]
    if grid.is_file():
        lines += [f"![t-SNE of each layer]({grid.name})", ""]
    return lines + [_markdown_table(shown), ""]


def published_section(dataset: str) -> list[str]:
    """Published numbers on file for this dataset, labelled as other protocols."""
    table = pd.read_csv(PUBLISHED)
    rows = table[table["dataset"] == dataset]
    lines = ["## Published numbers (other networks and protocols: context, not our results)", ""]
    if rows.empty:
        return lines + [f"No published reference for `{dataset}` is on file (`classify/{PUBLISHED.name}`).", ""]
    return lines + [_markdown_table(rows.drop(columns="dataset")), ""]


def read_stores(features_dir: Path | None, dataset: str) -> list[dict]:
    """Name, size, run record and fingerprint of each store of the dataset, read once for the report."""
    stores = []
    for path in sorted((features_dir / dataset).glob("*.h5")) if features_dir else []:
        try:
            with FeatureStore(path) as store:
                stores.append({"extractor": store.extractor, "images": len(store), "run": store.run, "fingerprint": store.fingerprint})
        except (StoreError, OSError) as error:
            log.warning("leaving %s out of the report: %s", path, error)
    return stores


def run_section(results: pd.DataFrame, stores: list[dict]) -> list[str]:
    """Extraction time and throughput per store, and the probes' fitting time."""
    lines = ["## Run time and throughput", ""]
    rows = [{"features": s["extractor"], "images": s["images"], "extraction s": s["run"].get("seconds", ""),
             "images/s": s["run"].get("images_per_second", ""), "resumed from": s["run"].get("resumed_from", ""),
             "Keras backend": s["fingerprint"].get("keras_backend", "-")} for s in stores]
    if rows:
        lines += [_markdown_table(pd.DataFrame(rows)), ""]
    fit = results.groupby("features")["fit_seconds"].sum().round(1)
    lines += ["Probe and training time (s, summed over layers and protocols): " + ", ".join(f"{k} {v:g}" for k, v in fit.items()), ""]
    return lines


def describe_baseline(fingerprint: dict) -> tuple[str, str, str]:
    """(preset, descriptor, encoding) of a baseline store, in words, from its fingerprint."""
    descriptor = fingerprint.get("descriptor")
    if not descriptor:  # HOG, colour, raw: their settings are the fingerprint itself
        settings = {k: v for k, v in fingerprint.items() if k not in ("baseline", "versions")}
        return fingerprint.get("preset", "any (no preset settings)"), fingerprint.get("baseline", "-"), ", ".join(f"{k} {v}" for k, v in settings.items())
    where = (f"dense, step {descriptor['step']} px, bins {'/'.join(map(str, descriptor['bin_sizes']))} px" if descriptor.get("dense")
             else f"detected keypoints (up to {descriptor.get('max_keypoints')})")
    what = f"{'Root' if fingerprint.get('root_sift') else ''}{descriptor['kind'].upper()}, {where}, shorter side {descriptor['side']} px"
    encoder = fingerprint.get("encoder", {})
    kind = encoder.get("type", fingerprint.get("encoding", "-"))
    if kind == "BagOfWords":
        levels = encoder.get("levels", 1)
        encoding = f"bag of {encoder['n_words']} words" + (f", {levels}-level spatial pyramid" if levels > 1 else "")
    elif kind == "VLAD":
        encoding = f"VLAD, {encoder['n_words']} words, intra-normalised"
    elif kind == "FisherVector":
        layout = " + ".join(f"{r}x{c}" for r, c in (encoder.get("layout") or [[1, 1]]))
        encoding = f"improved Fisher vector, {encoder['n_modes']} modes, PCA-{encoder['pca_dim']}, layout {layout}"
    else:
        encoding = str(kind)
    if fingerprint.get("kernel_map"):
        encoding += "; chi2 kernel map layer"
    sample = fingerprint.get("codebook_sample") or {}
    if sample:
        encoding += f"; codebook on `{sample.get('split')}`"
    return fingerprint.get("preset", "-"), what, encoding


def baselines_section(stores: list[dict]) -> list[str]:
    """Each baseline store's preset, descriptor and encoding, read from its fingerprint."""
    rows = [{"baseline": s["extractor"], **dict(zip(("preset", "descriptor", "encoding"), describe_baseline(s["fingerprint"])))}
            for s in stores if "baseline" in s["fingerprint"]]
    if not rows:
        return []
    return ["## Baselines: encodings and presets", "", _markdown_table(pd.DataFrame(rows)), ""]


def environment_section(stores: list[dict]) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown") if Path("/proc/cpuinfo").exists() else platform.processor()
    gpu = "none"
    if shutil.which("nvidia-smi"):
        found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout.strip()
        gpu = found.replace("\n", "; ") or "none"
    versions: dict = {}
    for store in stores:
        versions.update(store["fingerprint"].get("versions", {}))
    versions.update(package_versions(*REPORT_PACKAGES))
    return ["## Environment", "",
            f"- Python {platform.python_version()} on {platform.platform()}",
            f"- CPU: {cpu}, {os.cpu_count()} cores; GPU: {gpu}",
            "- Packages: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())), ""]


def write_report(results_csv: str | Path, report_dir: str | Path, *, metric: str | None = None,
                 features_dir: str | Path | None = None) -> Path:
    """Write report.md and its PNGs; the best (features, layer, classifier) is in bold.
    The metric is top-1 accuracy, or mAP for multi-label datasets. ``features_dir`` adds
    the stores' extraction times and package versions."""
    results_csv = Path(results_csv)
    results = pd.read_csv(results_csv)
    if metric is None:
        metric = "mAP" if "mAP" in results and results["mAP"].notna().any() else "top1"
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    dataset = ", ".join(sorted(results["dataset"].astype(str).unique()))
    given = results[results["protocol"] == "given"]
    transfers = results[results["protocol"].str.startswith("transfer:")]
    if given.empty and len(transfers):  # domain datasets: rank by the mean over the transfer pairs
        given = _mean_over_protocols(transfers)
    if given.empty:
        raise ValueError(f"{results_csv} has no results of the given split or of transfers; run `make classify` first")
    best = given.loc[given[metric].idxmax()]
    plot = plot_accuracy_by_layer(given, report_dir / "accuracy_by_layer.png", metric=metric,
                                  title=f"{dataset}: linear-probe {METRIC_LABELS[metric]} by layer")
    bars = plot_best_per_method(given, report_dir / "best_per_method.png", metric=metric, title=f"{dataset}: best layer of each feature set")

    table = given.sort_values(["features", "layer_depth", "classifier"]).copy()
    rows = []
    for record in table.itertuples(index=False):
        is_best = (record.features, record.layer, record.classifier) == (best["features"], best["layer"], best["classifier"])
        cell = lambda v: f"**{100 * v:.2f}**" if is_best else f"{100 * v:.2f}"  # noqa: E731
        rows.append({
            "features": record.features, "layer": record.layer, "classifier": record.classifier,
            "C": f"{record.C:g}", "converged": "yes" if record.converged else "no",
            **({"mAP %": cell(record.mAP), "VOC07 mAP %": f"{100 * record.mAP_voc07:.2f}"} if metric == "mAP" else
               {"top-1 %": cell(record.top1), "mean per-class %": cell(record.mean_per_class_acc)}),
            "n train / test": f"{record.n_train} / {record.n_test}", "dim": record.n_features,
            "no features": int(getattr(record, "images_without_features", 0) or 0),
            "fit s": f"{record.fit_seconds:.1f}",
        })
    best_baseline = given[given["kind"] == "baseline"]
    lines = [
        f"# {dataset}: off-the-shelf features vs hand-crafted baselines",
        "",
        f"Best: **{best['features']} / {best['layer']} / {best['classifier']}**, "
        f"{_scores(best, metric)} "
        f"(trained on `{best['train_split']}`, {best['n_train']} images; tested on `{best['test_split']}`, {best['n_test']} images).",
    ]
    if len(best_baseline):
        top_baseline = best_baseline.loc[best_baseline[metric].idxmax()]
        lines.append(
            f"Best hand-crafted baseline: {top_baseline['features']} / {top_baseline['layer']} / {top_baseline['classifier']}, "
            f"{METRIC_LABELS[metric]} {100 * top_baseline[metric]:.2f}% ({100 * (best[metric] - top_baseline[metric]):+.2f} points for the best)."
        )
    lines += ["", f"![accuracy by layer]({plot.name})", "", f"![best of each feature set]({bars.name})", ""]

    predictions = _predictions_path(results_csv.parent, best)
    if predictions.is_file():
        frame = pd.read_csv(predictions, dtype=str, keep_default_na=False)
        classes = sorted(set(frame["label"]) | set(frame["predicted"]))
        matrix = plot_confusion(frame, classes, report_dir / "confusion_best.png",
                                title=f"{best['features']} / {best['layer']} / {best['classifier']}")
        accuracy = per_class_accuracy(frame["label"], frame["predicted"], classes)
        per_class = pd.DataFrame({"class": classes, "test images": [int((frame["label"] == c).sum()) for c in classes],
                                  "accuracy %": [f"{100 * a:.1f}" for a in accuracy]}).sort_values("accuracy %", key=lambda s: s.astype(float))
        per_class.to_csv(report_dir / "per_class_accuracy_best.csv", index=False)
        lines += ["## The best probe, class by class", "", f"![confusion matrix]({matrix.name})", "",
                  _markdown_table(per_class), ""]

    few_shot = results[results["protocol"].str.endswith("-shot")]
    if len(few_shot):
        curve = plot_few_shot(few_shot, report_dir / "few_shot.png", metric=metric, title=f"{dataset}: few-shot linear probes")
        lines += ["## Few-shot", "", f"Each point: mean ± std over {int(few_shot['repeats'].max())} seeded draws of k training "
                  "images per class; same test split.", "", f"![few-shot curves]({curve.name})", ""]

    others = results[~results["protocol"].isin(["given"]) & ~results["protocol"].str.endswith("-shot")]
    if len(others):
        lines += ["## Transfer across splits and datasets", "", _markdown_table(others[
            ["features", "layer", "classifier", "protocol", "train_split", "test_split", "n_train", "n_test",
             *(["mAP"] if metric == "mAP" else ["top1", "mean_per_class_acc"])]
        ].round(4)), ""]

    slug = report_dir.name
    features_dir = Path(features_dir) if features_dir is not None else None
    lines += layers_section(results_csv.parent, report_dir)
    lines += published_section(slug)
    stores = read_stores(features_dir, slug)
    lines += baselines_section(stores)
    lines += run_section(results, stores)
    lines += environment_section(stores)
    lines += [
        "## Every probe",
        "",
        "C was chosen on the training split only (stratified cross-validation), then the probe was refitted on all of it; "
        "features were normalised with statistics of the training rows.",
        "",
        _markdown_table(pd.DataFrame(rows)),
        "",
        f"Source: `{results_csv.as_posix()}`.",
        "",
    ]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_summary(results_root: str | Path, reports_root: str | Path, datasets: list[str]) -> Path:
    """reports/summary.md (+ .csv, .png): per dataset, the best CNN layer and the best baseline."""
    rows = []
    for slug in datasets:
        results_csv = Path(results_root) / slug / "results.csv"
        if not results_csv.is_file():
            raise FileNotFoundError(f"{results_csv} is missing; run `make benchmark DATASET=...` for {slug} first")
        results = pd.read_csv(results_csv)
        metric = "mAP" if "mAP" in results and results["mAP"].notna().any() else "top1"
        main = results[results["protocol"] == "given"]
        if main.empty:
            main = _mean_over_protocols(results[results["protocol"].str.startswith("transfer:")])
        for kind, label in (("cnn", "best CNN layer"), ("baseline", "best baseline")):
            part = main[main["kind"] == kind].dropna(subset=[metric])
            if part.empty:
                continue
            best = part.loc[part[metric].idxmax()]
            rows.append({"dataset": slug, "method": label, "features": best["features"], "layer": best["layer"],
                         "classifier": best["classifier"], "metric": METRIC_LABELS[metric], "score %": round(100 * best[metric], 2),
                         "n train / test": f"{int(best['n_train'])} / {int(best['n_test'])}"})
    table = pd.DataFrame(rows)
    out = Path(reports_root)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "summary.csv", index=False)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(datasets) + 2), 4.5), constrained_layout=True)
    width = 0.38
    for offset, (label, colour) in zip((-width / 2, width / 2), (("best CNN layer", "tab:blue"), ("best baseline", "tab:gray"))):
        values = [table[(table["dataset"] == d) & (table["method"] == label)]["score %"].max() for d in datasets]
        bars = ax.bar(np.arange(len(datasets)) + offset, np.nan_to_num(values), width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(datasets)), datasets, rotation=20, ha="right")
    ax.set_ylabel("score (%): top-1, or mAP for multi-label")
    ax.set_ylim(0, 105)
    ax.set_title("Off-the-shelf CNN features vs hand-crafted baselines, per dataset")
    ax.legend(loc="lower right")
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    lines = ["# Cross-dataset summary", "", "![best CNN vs best baseline per dataset](summary.png)", "", _markdown_table(table), "",
             "Per-dataset reports: " + ", ".join(f"[{d}]({d}/report.md)" for d in datasets), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
