"""``reports/<dataset>/report.md``: the results table and accuracy-by-layer plot, from results.csv."""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from classify import fusion
from classify.evaluate import store_fingerprint_id
from classify.recipe import ablation, chosen_among
from classify.results import PROBE_KINDS, PROBES_VERSION, best_per, live_rows, read_csv, read_predictions, read_results, select_best, write_csv
from extract import package_versions
from extract.errors import UserError
from extract.store import FeatureStore, StoreError
from transfer.analysis import RULE_OF_THUMB_CSV, regime_depth, rule_of_thumb_crossovers, rule_of_thumb_curves, rule_of_thumb_winners

log = logging.getLogger(__name__)
PUBLISHED = Path(__file__).with_name("published.csv")
REPORT_PACKAGES = ("scikit-learn", "opentsne", "mahotas", "scikit-image", "opencv-python-headless", "matplotlib")

# Names are drawn as the text they are: no mathtext, whose parser dies on a class named `a$\bogus$b`.
TEXT_ONLY = {"text.parse_math": False}
METRIC_LABELS = {"top1": "top-1 accuracy", "mean_per_class_acc": "mean per-class accuracy", "mAP": "mean average precision"}


@plt.rc_context(TEXT_ONLY)
def plot_accuracy_by_layer(table: pd.DataFrame, path: Path, *, metric: str = "top1", title: str = "") -> Path:
    """CNN layers as curves (``kind`` cnn); baseline variants, fine-tuned and trained models as
    horizontal lines. Backbones with other taps share the axis by relative depth, each point
    labelled with its tap."""
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
    chosen = select_best(table)
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


def chosen_per(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Probe rows: per group of ``by``, the one with the best CV score; trained models' rows as they are."""
    probes = rows[rows["kind"].isin(PROBE_KINDS)]
    chosen = best_per(probes, by) if len(probes) else probes
    return pd.concat([chosen, rows[~rows["kind"].isin(PROBE_KINDS)]], ignore_index=True)


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


class Markdown(str):
    """Text that is Markdown already (a bold number), put into the report as it is."""


# What Markdown (GitHub's, with tables, strikethrough and math) would read as markup: backslash,
# code, emphasis, links, table cells, strikethrough, math; an underscore only where it can emphasise.
_MARKUP = re.compile(r"[\\`*\[\]|~$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md(value) -> str:
    """``value`` (a class, split, layer or file name) as literal text in Markdown and in the HTML it
    renders to: whitespace runs (a newline would end a table row) become one space, ``&`` and ``<``
    become entities (no tag, no live HTML; ``>`` alone starts none), and Markdown's markup characters
    are backslash-escaped."""
    if isinstance(value, Markdown):
        return value
    text = " ".join(str(value).split()).replace("&", "&amp;").replace("<", "&lt;")
    return _MARKUP.sub(lambda match: "\\" + match.group(0), text)


def _code(value) -> str:
    """``value`` as a code span, whatever backticks it holds (CommonMark: a longer fence)."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-Markdown table; every header and cell is text (``md``) unless it is ``Markdown``."""
    header = "| " + " | ".join(md(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c].infer_objects()) else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(md(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _mean_over_protocols(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (features, layer, classifier): metrics averaged over the protocols."""
    keys = ["dataset", "features", "kind", "views", "recipe", "layer", "layer_depth", "classifier", "normalization", "search", "Cs"]
    numeric = ["top1", "mean_per_class_acc", "cv_score", "C", "n_train", "n_test", "n_features", "fit_seconds",
               "images_without_features", "classes_unseen_in_train"]
    mean = rows.groupby(keys, as_index=False, dropna=False)[numeric].mean()
    counts = ["n_train", "n_test", "n_features", "images_without_features", "classes_unseen_in_train"]
    mean[counts] = mean[counts].round().astype(int)
    count = rows.groupby(keys, dropna=False)["protocol"].nunique().iloc[0]
    return mean.assign(protocol=f"mean of {count} transfers", train_split="source", test_split="target",
                       converged=rows.groupby(keys, dropna=False)["converged"].all().to_numpy(), mAP=np.nan, mAP_voc07=np.nan,
                       selection=rows.groupby(keys, dropna=False)["selection"].first().astype(str).to_numpy() + " on each source domain")


def _scores(record, metric: str) -> str:
    if metric == "mAP":
        return f"mAP {100 * record['mAP']:.2f}% (VOC07 11-point {100 * record['mAP_voc07']:.2f}%)"
    return f"top-1 {100 * record['top1']:.2f}%, mean per-class {100 * record['mean_per_class_acc']:.2f}%"


def layers_section(results_dir: Path, report_dir: Path) -> list[str]:
    """The t-SNE grid and layers.csv, when `make tsne` has run."""
    table_path, grid = results_dir / "layers.csv", report_dir / "tsne_grid.png"
    if not table_path.is_file():
        return ["## Seeing the layers", "", "Run `make tsne` to add t-SNE pictures and layer-wise cluster numbers here.", ""]
    table = read_csv(table_path)
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
             f"linear probe ({_code(table_path.as_posix())}).", ""]
    if grid.is_file():
        lines += [f"![t-SNE of each layer]({grid.name})", ""]
    return lines + [_markdown_table(shown), ""]


def published_section(dataset: str) -> list[str]:
    """Published numbers on file for this dataset, labelled as other protocols."""
    table = pd.read_csv(PUBLISHED)
    rows = table[table["dataset"] == dataset]
    lines = ["## Published numbers (other networks and protocols: context, not our results)", ""]
    if rows.empty:
        return lines + [f"No published reference for {_code(dataset)} is on file (`classify/{PUBLISHED.name}`).", ""]
    return lines + [_markdown_table(rows.drop(columns="dataset")), ""]


def read_stores(features_dir: Path | None, dataset: str) -> list[dict]:
    """Name, size, run record, fingerprint (and its id) and taps of each store of the dataset, read once."""
    stores = []
    for path in sorted((features_dir / dataset).glob("*.h5")) if features_dir else []:
        try:
            with FeatureStore(path, dataset=dataset) as store:
                stores.append({"extractor": store.extractor, "images": len(store), "run": store.run, "fingerprint": store.fingerprint,
                               "fingerprint_id": store_fingerprint_id(store.fingerprint, store.dataset_digest), "taps": store.taps})
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
    lines += ["Probe and training time (s, summed over layers and protocols): " + ", ".join(f"{md(k)} {v:g}" for k, v in fit.items()), ""]
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
            f"- Python {platform.python_version()} on {md(platform.platform())}",
            f"- CPU: {md(cpu)}, {os.cpu_count()} cores; GPU: {md(gpu)}",
            "- Packages: " + ", ".join(f"{md(k)} {md(v)}" for k, v in sorted(versions.items(), key=str)), ""]


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


def rule_of_thumb_section(results_dir: Path, report_dir: Path) -> list[str]:
    """Learning curves of every regime, the best one per size, and where one overtakes another."""
    table_path = results_dir / RULE_OF_THUMB_CSV
    if not table_path.is_file():
        return []
    table = read_csv(table_path)
    curves = rule_of_thumb_curves(table)
    plot = plot_rule_of_thumb(curves, report_dir / "rule_of_thumb.png",
                              title=f"{report_dir.name}: how many layers to train for how much data")
    wide = curves.assign(cell=[f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(curves["mean"], curves["std"])])
    wide = wide.pivot(index="per_class", columns="regime", values="cell").reset_index()
    wide = wide[["per_class", *sorted(wide.columns[1:], key=regime_depth)]]
    winners = rule_of_thumb_winners(curves).set_index("per_class")["best regime"]
    wide.insert(1, "best regime", wide["per_class"].map(winners))
    draws = int(curves["count"].max())
    return ["## Rule of thumb", "",
            f"Every regime trained on the same {draws} seeded draws of k images per class and tested on the same test split "
            f"({_code(table_path.as_posix())}, `make rule-of-thumb`). probe: linear probe on the layer chosen by CV; head: a softmax "
            "layer on the frozen top layer; topN: the last N blocks too; all: every layer; scratch: random start. Epochs by "
            "early stopping on held-out training images. \"best regime\" names the highest mean test accuracy: it describes "
            "the curves, nothing was chosen by it.", "",
            f"![rule of thumb]({plot.name})", "", _markdown_table(wide.rename(columns={"per_class": "per class"})), "",
            *(f"- {_code(c.regime)} {c.verb} {_code(c.reference)} {c.when}" for c in rule_of_thumb_crossovers(curves)), ""]


def main_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows a dataset is ranked by: the given split, or for domain datasets the mean over the
    whole-source transfers."""
    given = results[results["protocol"] == "given"]
    transfers = results[results["protocol"].str.startswith("transfer:")]
    return _mean_over_protocols(transfers) if given.empty and len(transfers) else given


def describe(row) -> str:
    """features / layer / classifier, and the normalisation where it is not the standard one."""
    normalization = row.get("normalization")
    extra = f" ({normalization})" if isinstance(normalization, str) and normalization not in ("standard", "none") else ""
    return f"{row['features']} / {row['layer']} / {row['classifier']}{extra}"


def headline(rows: pd.DataFrame, metric: str) -> tuple[pd.Series, list[str]]:
    """The row chosen by cross-validation score, and the lines that state it (with the test-best as an
    oracle, labelled so, when it differs)."""
    best = select_best(rows)
    if best is None:
        raise UserError("no result has a cross-validation score (cv_score) to choose by; rerun `make classify` "
                        "(results.csv from an older offshelf lacks it)")
    among = rows["cv_score"].notna().sum()
    lines = [
        f"Best by cross-validation on the training data: **{md(describe(best))}** "
        f"(CV {_percent(best['cv_score'])}, {'the only candidate' if among == 1 else f'the highest of {among} candidates'}), {_scores(best, metric)} on the test split "
        f"(trained on {_code(best['train_split'])}, {best['n_train']} images; tested on {_code(best['test_split'])}, {best['n_test']} images).",
    ]
    oracle = rows.loc[rows[metric].idxmax()]
    if oracle.name != best.name:
        lines.append(f"Oracle, for reference only (picked on the test split, not a result): {md(describe(oracle))}, "
                     f"{METRIC_LABELS[metric]} {100 * oracle[metric]:.2f}%.")
    return best, lines


def ablation_section(rows: pd.DataFrame, metric: str) -> list[str]:
    """What each step of ``RECIPE=best`` bought: the choice by CV with the steps added one at a time."""
    measure = "mAP" if metric == "mAP" else "mean_per_class_acc"
    table = ablation(rows, measure)
    if table.empty:
        return []
    shown = pd.DataFrame({
        "backbone": table["backbone"], "step": table["step"], "candidates": table["candidates"],
        "chosen by CV": [f"{r.features} / {r.layer} / {r.classifier} ({r.normalization}), C {r.C:g}" for r in table.itertuples()],
        "CV %": (100 * table["cv_score"]).round(2),
        **({"mAP %": (100 * table["mAP"]).round(2)} if metric == "mAP" else
           {"top-1 %": (100 * table["top1"]).round(2), "mean per-class %": (100 * table["mean_per_class_acc"]).round(2)}),
        f"change vs plain ({METRIC_LABELS[measure]}, points)": (100 * table["change"]).round(2),
    })
    first, last = table.iloc[0], table.iloc[-1]
    return ["## What each step bought (ablation)", "",
            "The choice by cross-validation on the training images, with the steps of `RECIPE=best` added one at a time "
            "(each line chooses among its candidates and those of the lines above, but for the first, today's plain probe). "
            "CV % is what chose the line; the test columns are what it gave. Choosing among more candidates makes the "
            f"winner's CV score more optimistic: here CV - test {METRIC_LABELS[measure]} is "
            f"{100 * (first['cv_score'] - first[measure]):+.2f} points for the plain probe and "
            f"{100 * (last['cv_score'] - last[measure]):+.2f} for the full recipe.", "",
            _markdown_table(shown), ""]


def _percent(value) -> str:
    return f"{100 * value:.2f}%" if pd.notna(value) else "-"


def domain_section(results: pd.DataFrame) -> list[str]:
    """Domain datasets: per transfer, each feature set's layer and classifier chosen by CV score on the
    source, and its mean per-class accuracy on the target (DeCAF's metric), side by side (DeCAF's Office table)."""
    metric, lines = "mean_per_class_acc", []
    for kind, title, note in (
        ("transfer:", "whole source domain", "The whole source domain trains; the whole target domain tests."),
        ("sampled:", "sampled protocol of Saenko et al. (2010)",
         "20 images per class from amazon (or caltech), 8 from dslr or webcam, as source; the whole target tests; "
         "mean ± std over seeded draws (the protocol DeCAF reports)."),
    ):
        rows = results[results["protocol"].str.startswith(kind) & results["kind"].isin(PROBE_KINDS)]
        if rows.empty:
            continue
        chosen = best_per(rows, ["protocol", "features"])
        chosen = chosen.assign(cell=[f"{100 * r[metric]:.1f}" + (f" ± {100 * r[f'{metric}_std']:.1f}" if r["repeats"] > 1 else "")
                                     + f" ({r['layer']})" for _, r in chosen.iterrows()])
        table = chosen.pivot(index="protocol", columns="features", values="cell").reset_index()
        table["protocol"] = table["protocol"].str.removeprefix(kind)
        lines += [f"## Domain transfer: {title}", "", note + f" Cells: {METRIC_LABELS[metric]} % on the target (the layer "
                  "and classifier chosen by cross-validation on the source).", "",
                  _markdown_table(table.rename(columns={"protocol": "source -> target"}).fillna("-")), ""]
    return lines


def write_report(results_csv: str | Path, report_dir: str | Path, *, metric: str | None = None,
                 features_dir: str | Path | None = None) -> Path:
    """Write report.md and its PNGs. "Best" is always the highest cross-validation score on the
    training data; the test split only reports. The metric is top-1 accuracy, or mAP for
    multi-label datasets. With ``features_dir``, rows of stores that were deleted or rebuilt with
    other settings are left out, and the stores' extraction times and package versions are added."""
    results_csv = Path(results_csv)
    results = read_results(results_csv)
    if results is None:
        raise FileNotFoundError(f"{results_csv} is missing; run `make classify` first")
    report_dir = Path(report_dir)
    slug = report_dir.name
    features_dir = Path(features_dir) if features_dir is not None else None
    stores = read_stores(features_dir, slug)
    if features_dir is not None:
        results = live_rows(results, {s["extractor"]: s for s in stores})
    if metric is None:
        metric = "mAP" if results["mAP"].notna().any() else "top1"
    report_dir.mkdir(parents=True, exist_ok=True)
    dataset = ", ".join(sorted(results["dataset"].astype(str).unique()))
    every = main_rows(results)
    if every.empty:
        raise UserError(f"{results_csv} has no results of the given split or of transfers; run `make classify` first")
    given = chosen_among(every)
    best, headline_lines = headline(given, metric)
    plot = plot_accuracy_by_layer(given, report_dir / "accuracy_by_layer.png", metric=metric,
                                  title=f"{dataset}: linear-probe {METRIC_LABELS[metric]} by layer")
    bars = plot_best_per_method(given, report_dir / "best_per_method.png", metric=metric,
                                title=f"{dataset}: each feature set at its layer chosen by CV")

    table = every.sort_values(["features", "layer_depth", "layer", "classifier", "normalization"]).copy()
    rows = []
    for index, record in zip(table.index, table.itertuples(index=False)):
        is_best = index == best.name
        cell = lambda v: Markdown(f"**{100 * v:.2f}**") if is_best else f"{100 * v:.2f}"  # noqa: E731
        rows.append({
            "features": record.features, "layer": record.layer, "classifier": record.classifier,
            "normalisation": record.normalization, "recipe": record.recipe if isinstance(record.recipe, str) else "-",
            "C chosen by": record.selection, "C": f"{record.C:g}",
            "CV %": _percent(record.cv_score), "converged": "yes" if record.converged else "no",
            **({"mAP %": cell(record.mAP), "VOC07 mAP %": f"{100 * record.mAP_voc07:.2f}"} if metric == "mAP" else
               {"top-1 %": cell(record.top1), "mean per-class %": cell(record.mean_per_class_acc)}),
            "n train / test": f"{record.n_train} / {record.n_test}", "dim": record.n_features,
            "no features": int(getattr(record, "images_without_features", 0) or 0),
            "fit s": f"{record.fit_seconds:.1f}",
        })
    probes = given[given["kind"] == "baseline"]
    top_baseline = select_best(probes) if len(probes) else None
    lines = [f"# {md(dataset)}: off-the-shelf features vs hand-crafted baselines", "", *headline_lines]
    if top_baseline is not None:
        lines.append(
            f"Best hand-crafted baseline (by CV): {md(describe(top_baseline))}, "
            f"{METRIC_LABELS[metric]} {100 * top_baseline[metric]:.2f}% ({100 * (best[metric] - top_baseline[metric]):+.2f} points for the best)."
        )
    unseen = given[given["classes_unseen_in_train"].fillna(0) > 0]
    if len(unseen):
        lines.append(f"Warning: {int(unseen['classes_unseen_in_train'].max())} test classes have no training image; "
                     "every test image of them counts as wrong.")
    lines += ["", "Explore it in a browser: [index.html](index.html), every layer's embedding image by image, neighbours and confusions (offline)."]
    lines += ["", f"![accuracy by layer]({plot.name})", "", f"![each feature set at its chosen layer]({bars.name})", ""]
    lines += ablation_section(every, metric)
    lines += domain_section(results)

    frame = read_predictions(results_csv.parent, best)
    if frame is not None:
        classes = sorted(set(frame["label"]) | set(frame["predicted"]))
        counts = confusion_matrix(frame["label"], frame["predicted"], labels=classes)
        matrix = plot_confusion(counts, classes, report_dir / "confusion_best.png", title=describe(best))
        totals = counts.sum(axis=1)
        accuracy = np.divide(np.diag(counts), totals, out=np.full(len(classes), np.nan), where=totals > 0)
        per_class = pd.DataFrame({"class": classes, "test images": totals,
                                  "accuracy %": [f"{100 * a:.1f}" for a in accuracy]}).sort_values("accuracy %", key=lambda s: s.astype(float))
        write_csv(per_class, report_dir / "per_class_accuracy_best.csv")
        lines += ["## The chosen probe, class by class", "", f"![confusion matrix]({matrix.name})", "",
                  _markdown_table(per_class), ""]

    few_shot = results[results["protocol"].str.endswith("-shot")]
    if len(few_shot):
        curve = plot_few_shot(few_shot, report_dir / "few_shot.png", metric=metric, title=f"{dataset}: few-shot linear probes")
        lines += ["## Few-shot", "", f"Each point: mean ± std over {int(few_shot['repeats'].max())} seeded draws of k training "
                  "images per class; same test split.", "", f"![few-shot curves]({curve.name})", ""]

    others = results[results["protocol"].str.startswith("cross:")]
    if len(others):
        lines += ["## Transfer across datasets", "", _markdown_table(others[
            ["features", "layer", "classifier", "protocol", "train_split", "test_split", "n_train", "n_test", "cv_score",
             *(["mAP"] if metric == "mAP" else ["top1", "mean_per_class_acc"])]
        ].round(4)), ""]

    lines += rule_of_thumb_section(results_csv.parent, report_dir)
    lines += layers_section(results_csv.parent, report_dir)
    lines += published_section(slug)
    lines += baselines_section(stores)
    lines += run_section(results, stores)
    lines += environment_section(stores)
    lines += [
        "## Every probe",
        "",
        "Each probe was fitted on the training split only: the normaliser's statistics, and C, chosen as the column "
        "\"C chosen by\" says (a grid of C values scored on held-out training rows), then refitted on all training rows. "
        "CV % is that held-out score; it alone chooses the bold row. Trained models (fine-tuned, the recipe) have no CV score "
        "and are shown, never chosen.",
        "",
        _markdown_table(pd.DataFrame(rows, dtype=object)),  # object: pandas' str columns would drop Markdown, the bold
        "",
        f"Source: {_code(results_csv.as_posix())}.",
        "",
    ]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


@plt.rc_context(TEXT_ONLY)
def write_summary(results_root: str | Path, reports_root: str | Path, datasets: list[str]) -> Path:
    """reports/summary.md (+ .csv, .png): per dataset, the CNN layer and the baseline chosen by CV score."""
    rows = []
    for slug in datasets:
        results_csv = Path(results_root) / slug / "results.csv"
        results = read_results(results_csv)
        if results is None:
            raise FileNotFoundError(f"{results_csv} is missing; run `make benchmark DATASET=...` for {slug} first")
        results = live_rows(results, None)
        if results.empty:
            raise UserError(f"{results_csv} has no rows of this offshelf's probes (probe_version {PROBES_VERSION}); "
                            f"run `make classify DATASET=...` for {slug} again")
        metric = "mAP" if results["mAP"].notna().any() else "top1"
        every = main_rows(results)
        main = chosen_among(every)
        steps = ablation(every, "mAP" if metric == "mAP" else "mean_per_class_acc")
        plain = [] if steps.empty else [("plain CNN probe", steps.iloc[0])]  # the same choice RECIPE=plain makes
        chosen = [(label, select_best(main[main["kind"] == kind].dropna(subset=[metric])))
                  for kind, label in (("cnn", "best CNN layer" if steps.empty else "best CNN (RECIPE=best)"), ("baseline", "best baseline"))]
        for label, best in plain + chosen:
            if best is None:
                continue
            rows.append({"dataset": slug, "method": label, "features": best["features"], "layer": best["layer"],
                         "classifier": best["classifier"], "normalisation": best["normalization"], "metric": METRIC_LABELS[metric],
                         "CV %": round(100 * best["cv_score"], 2), "score %": round(100 * best[metric], 2),
                         "mean per-class %": round(100 * best["mean_per_class_acc"], 2) if metric != "mAP" else np.nan,
                         "n train / test": f"{int(best['n_train'])} / {int(best['n_test'])}"})
    table = pd.DataFrame(rows)
    out = Path(reports_root)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(table, out / "summary.csv")
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
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    rule = []
    for slug in datasets:
        path = Path(results_root) / slug / RULE_OF_THUMB_CSV
        if path.is_file():
            winners = rule_of_thumb_winners(rule_of_thumb_curves(read_csv(path)))
            rule += [{"dataset": slug, "per class": int(k), "best regime": best} for k, best in zip(winners["per_class"], winners["best regime"])]
    rule_lines = (["## Rule of thumb: the regime with the highest mean test accuracy, per dataset and images per class", "",
                   _markdown_table(pd.DataFrame(rule).pivot(index="per class", columns="dataset", values="best regime").reset_index().fillna("-")),
                   ""] if rule else [])
    lines = ["# Cross-dataset summary", "", "![best CNN vs best baseline per dataset](summary.png)", "",
             "Per dataset, the CNN layer and the baseline with the best cross-validation score on the training data; "
             "score % is their test result. Where `RECIPE=best` ran, its choice stands beside the plain probe's.", "", _markdown_table(table), "",
             *rule_lines, "Per-dataset reports: " + ", ".join(f"[{d}]({d}/report.md)" for d in datasets), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
