"""``reports/<dataset>/report.md``: the results table and accuracy-by-layer plot, from results.csv;
``reports/summary.md`` across datasets.

Modules: ``rows`` (the stores and the rows a report ranks), ``sections`` (each section's Markdown),
``plots`` (the figures), ``markdown`` (names as literal text). ``write_report`` and ``write_summary``
are here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from classify.recipe import ablation, chosen_among
from classify.report.markdown import Markdown, code_span, markdown_table, md
from classify.report.plots import METRIC_LABELS, plot_accuracy_by_layer, plot_best_per_method, plot_confusion, plot_few_shot, plot_summary
from classify.report.rows import describe, headline_rows, main_rows, read_stores
from classify.report.sections import (
    ablation_section, baselines_section, domain_section, environment_section, headline, layers_section, percent, published_section,
    rule_of_thumb_section, run_section, weights_section,
)
from classify.results import PROBES_VERSION, live_rows, read_csv, read_predictions, read_results, select_best, write_csv
from extract.errors import UserError
from transfer.analysis import RULE_OF_THUMB_CSV, rule_of_thumb_curves, rule_of_thumb_winners


def write_report(results_csv: str | Path, report_dir: str | Path, *, metric: str | None = None,
                 features_dir: str | Path | None = None) -> Path:
    """Write report.md and its PNGs. "Best" is always the highest cross-validation score on the
    training data; the test split only reports. The metric is top-1 accuracy, or mAP for
    multi-label datasets. With ``features_dir``, rows of stores that were deleted or rebuilt with
    other settings are left out, the stores' extraction times and environments are added, and a
    random-weights store (by its fingerprint) is shown beside its pretrained backbone, never as the headline."""
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
    best, headline_lines = headline(headline_rows(given, stores), metric)
    plot = plot_accuracy_by_layer(given, report_dir / "accuracy_by_layer.png", chosen=best, metric=metric,
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
            "CV %": percent(record.cv_score), "converged": "yes" if record.converged else "no",
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
    lines += weights_section(every, stores, metric)
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
                  markdown_table(per_class), ""]

    few_shot = results[results["protocol"].str.endswith("-shot")]
    if len(few_shot):
        curve = plot_few_shot(few_shot, report_dir / "few_shot.png", metric=metric, title=f"{dataset}: few-shot linear probes")
        lines += ["## Few-shot", "", f"Each point: mean ± std over {int(few_shot['repeats'].max())} seeded draws of k training "
                  "images per class; same test split.", "", f"![few-shot curves]({curve.name})", ""]

    others = results[results["protocol"].str.startswith("cross:")]
    if len(others):
        lines += ["## Transfer across datasets", "", markdown_table(others[
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
        markdown_table(pd.DataFrame(rows, dtype=object)),  # object: pandas' str columns would drop Markdown, the bold
        "",
        f"Source: {code_span(results_csv.as_posix())}.",
        "",
    ]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


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
    plot_summary(table, datasets, out / "summary.png")
    rule = []
    for slug in datasets:
        path = Path(results_root) / slug / RULE_OF_THUMB_CSV
        if path.is_file():
            winners = rule_of_thumb_winners(rule_of_thumb_curves(read_csv(path)))
            rule += [{"dataset": slug, "per class": int(k), "best regime": best} for k, best in zip(winners["per_class"], winners["best regime"])]
    rule_lines = (["## Rule of thumb: the regime with the highest mean test accuracy, per dataset and images per class", "",
                   markdown_table(pd.DataFrame(rule).pivot(index="per class", columns="dataset", values="best regime").reset_index().fillna("-")),
                   ""] if rule else [])
    lines = ["# Cross-dataset summary", "", "![best CNN vs best baseline per dataset](summary.png)", "",
             "Per dataset, the CNN layer and the baseline with the best cross-validation score on the training data; "
             "score % is their test result. Where `RECIPE=best` ran, its choice stands beside the plain probe's.", "", markdown_table(table), "",
             *rule_lines, "Per-dataset reports: " + ", ".join(f"[{d}]({d}/report.md)" for d in datasets), ""]
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path
