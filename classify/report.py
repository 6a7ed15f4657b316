"""``reports/<dataset>/report.md``: the results table and accuracy-by-layer plot, from results.csv."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

METRIC_LABELS = {"top1": "top-1 accuracy", "mean_per_class_acc": "mean per-class accuracy"}


def _is_cnn(table: pd.DataFrame, features: str) -> bool:
    """CNN stores have several layers; a baseline's variants are drawn as horizontal lines."""
    return table.loc[table["features"] == features, "layer"].nunique() > 1


def plot_accuracy_by_layer(table: pd.DataFrame, path: Path, *, metric: str = "top1", title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(9, 5), constrained_layout=True)
    styles = {"logreg": "-", "svm": "--"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    cnn = [f for f in table["features"].unique() if _is_cnn(table, f)]
    baselines = [f for f in table["features"].unique() if f not in cnn]
    xticks: list[str] = []
    for i, features in enumerate(cnn):
        for classifier, rows in table[table["features"] == features].groupby("classifier"):
            rows = rows.sort_values("layer_depth")
            xticks = xticks if len(xticks) >= len(rows) else list(rows["layer"])
            ax.plot(rows["layer_depth"], 100 * rows[metric], styles.get(classifier, ":"), marker="o",
                    color=colors[i % len(colors)], label=f"{features} ({classifier})")
    for j, features in enumerate(baselines):
        for (layer, classifier), rows in table[table["features"] == features].groupby(["layer", "classifier"]):
            value = 100 * rows[metric].iloc[0]
            ax.axhline(value, linestyle=styles.get(classifier, ":"), color=colors[(len(cnn) + j) % len(colors)], linewidth=1.5,
                       label=f"{layer} baseline ({classifier}): {value:.1f}%")
    if xticks:
        ax.set_xticks(range(len(xticks)), xticks, rotation=30, ha="right")
    ax.set_xlabel("tapped layer (low to high)")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (%)")
    ax.set_title(title or f"Linear-probe {METRIC_LABELS[metric]} by layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else "---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_report(results_csv: str | Path, report_dir: str | Path, *, metric: str = "top1") -> Path:
    """Write report.md and its PNGs; the best (features, layer, classifier) is in bold."""
    results = pd.read_csv(results_csv)
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    dataset = ", ".join(sorted(results["dataset"].astype(str).unique()))
    given = results[results["protocol"] == "given"]
    best = given.loc[given[metric].idxmax()]
    plot = plot_accuracy_by_layer(given, report_dir / "accuracy_by_layer.png", metric=metric,
                                  title=f"{dataset}: linear-probe {METRIC_LABELS[metric]} by layer")

    table = given.sort_values(["features", "layer_depth", "classifier"]).copy()
    rows = []
    for record in table.itertuples(index=False):
        is_best = (record.features, record.layer, record.classifier) == (best["features"], best["layer"], best["classifier"])
        cell = lambda v: f"**{100 * v:.2f}**" if is_best else f"{100 * v:.2f}"  # noqa: E731
        rows.append({
            "features": record.features, "layer": record.layer, "classifier": record.classifier,
            "C": f"{record.C:g}", "converged": "yes" if record.converged else "no",
            "top-1 %": cell(record.top1), "mean per-class %": cell(record.mean_per_class_acc),
            "n train / test": f"{record.n_train} / {record.n_test}", "dim": record.n_features,
            "fit s": f"{record.fit_seconds:.1f}",
        })
    best_baseline = given[~given["features"].map(lambda f: _is_cnn(given, f))]
    lines = [
        f"# {dataset}: off-the-shelf features vs hand-crafted baselines",
        "",
        f"Best: **{best['features']} / {best['layer']} / {best['classifier']}**, "
        f"top-1 {100 * best['top1']:.2f}%, mean per-class {100 * best['mean_per_class_acc']:.2f}% "
        f"(trained on `{best['train_split']}`, {best['n_train']} images; tested on `{best['test_split']}`, {best['n_test']} images).",
    ]
    if len(best_baseline):
        top_baseline = best_baseline.loc[best_baseline[metric].idxmax()]
        lines.append(
            f"Best hand-crafted baseline: {top_baseline['features']} / {top_baseline['classifier']}, "
            f"top-1 {100 * top_baseline['top1']:.2f}% ({100 * (best['top1'] - top_baseline['top1']):+.2f} points for the best)."
        )
    lines += [
        "",
        f"![accuracy by layer]({plot.name})",
        "",
        "## Every probe",
        "",
        "C was chosen by stratified cross-validation on the training split only, then refitted on all of it; "
        "features were standardised with statistics of the training rows.",
        "",
        _markdown_table(pd.DataFrame(rows)),
        "",
        f"Source: `{Path(results_csv).as_posix()}`.",
        "",
    ]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
