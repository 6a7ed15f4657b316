"""The report's sections, each a list of Markdown lines: the headline, the ablation, domain transfer,
the rule of thumb, the layers' pictures, published numbers, the baselines' settings, run times and
the environment."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from classify.recipe import ablation, chosen_among
from classify.report.markdown import code_span, markdown_table, md
from classify.report.plots import METRIC_LABELS, plot_rule_of_thumb
from classify.report.rows import describe, weights_pairs
from classify.results import PROBE_KINDS, best_per, read_csv, select_best
from extract.errors import UserError
from transfer.analysis import RULE_OF_THUMB_CSV, regime_depth, rule_of_thumb_crossovers, rule_of_thumb_curves, rule_of_thumb_winners

PUBLISHED = Path(__file__).parents[1] / "published.csv"


def percent(value) -> str:
    """A fraction as a percentage with two decimals; "-" where there is none."""
    return f"{100 * value:.2f}%" if pd.notna(value) else "-"


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
             f"linear probe ({code_span(table_path.as_posix())}).", ""]
    if grid.is_file():
        lines += [f"![t-SNE of each layer]({grid.name})", ""]
    return lines + [markdown_table(shown), ""]


def published_section(dataset: str) -> list[str]:
    """Published numbers on file for this dataset, labelled as other protocols."""
    table = pd.read_csv(PUBLISHED)
    rows = table[table["dataset"] == dataset]
    lines = ["## Published numbers (other networks and protocols: context, not our results)", ""]
    if rows.empty:
        return lines + [f"No published reference for {code_span(dataset)} is on file (`classify/{PUBLISHED.name}`).", ""]
    return lines + [markdown_table(rows.drop(columns="dataset")), ""]


def run_section(results: pd.DataFrame, stores: list[dict]) -> list[str]:
    """Extraction time and throughput per store, and the probes' fitting time."""
    lines = ["## Run time and throughput", ""]
    rows = [{"features": s["extractor"], "images": s["images"], "extraction s": s["run"].get("seconds", ""),
             "images/s": s["run"].get("images_per_second", ""), "resumed from": s["run"].get("resumed_from", ""),
             "Keras backend": s["fingerprint"].get("keras_backend", "-")} for s in stores]
    if rows:
        lines += [markdown_table(pd.DataFrame(rows)), ""]
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
    return ["## Baselines: encodings and presets", "", markdown_table(pd.DataFrame(rows)), ""]


UNRECORDED = "not recorded (made before 0.2.1)"


def _listed(value) -> str:
    """A recorded list (or one value) as text; "-" for none."""
    text = ", ".join(map(str, value)) if isinstance(value, list) else "" if value is None else str(value)
    return text or "-"


def environment_section(stores: list[dict]) -> list[str]:
    """Per store, the machine and software that computed it (its run record's ``environment``, written
    at extraction), and whether the stores come from more than one machine. The record is shown as
    text whatever it holds: it informs, nothing depends on it."""
    if not stores:
        return []
    rows, machines = [], set()
    for store in stores:
        run = store["run"]
        environment = run.get("environment")
        if not isinstance(environment, dict):
            rows.append({"store": store["extractor"], "host": UNRECORDED, "CPU": "-", "ISA": "-", "GPU": "-", "backend": "-", "versions": "-"})
            continue
        host, cpu, gpus = (_listed(environment.get(key)) for key in ("host", "cpu", "gpus"))
        machines.add((host, cpu, gpus))
        workers, versions = run.get("ray_workers"), environment.get("versions")
        rows.append({
            "store": store["extractor"],
            "host": host + (f" (driver of {workers} Ray workers, which computed it)" if workers else ""),
            "CPU": f"{cpu}, {_listed(environment.get('cores'))} cores", "ISA": _listed(environment.get("isa")),
            "GPU": "none" if gpus == "-" else gpus, "backend": _listed(environment.get("keras_backend")),
            "versions": ", ".join(f"{name} {version}" for name, version in versions.items()) if isinstance(versions, dict) else "-",
        })
    lines = ["## Environment", "", "What computed each store, as recorded when it was extracted.", "", markdown_table(pd.DataFrame(rows)), ""]
    if len(machines) > 1:
        lines += [f"The stores were computed on {len(machines)} different machines (host, CPU or GPU differ): "
                  "their run times above are not comparable.", ""]
    return lines


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
            f"({code_span(table_path.as_posix())}, `make rule-of-thumb`). probe: linear probe on the layer chosen by CV; head: a softmax "
            "layer on the frozen top layer; topN: the last N blocks too; all: every layer; scratch: random start. Epochs by "
            "early stopping on held-out training images. \"best regime\" names the highest mean test accuracy: it describes "
            "the curves, nothing was chosen by it.", "",
            f"![rule of thumb]({plot.name})", "", markdown_table(wide.rename(columns={"per_class": "per class"})), "",
            *(f"- {code_span(c.regime)} {c.verb} {code_span(c.reference)} {c.when}" for c in rule_of_thumb_crossovers(curves)), ""]


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
        f"(CV {percent(best['cv_score'])}, {'the only candidate' if among == 1 else f'the highest of {among} candidates'}), {_scores(best, metric)} on the test split "
        f"(trained on {code_span(best['train_split'])}, {best['n_train']} images; tested on {code_span(best['test_split'])}, {best['n_test']} images).",
    ]
    oracle = rows.loc[rows[metric].idxmax()]
    if oracle.name != best.name:
        lines.append(f"Oracle, for reference only (picked on the test split, not a result): {md(describe(oracle))}, "
                     f"{METRIC_LABELS[metric]} {100 * oracle[metric]:.2f}%.")
    return best, lines


def weights_section(rows: pd.DataFrame, stores: list[dict], metric: str) -> list[str]:
    """Per backbone with a random-weights control beside it (the same network and settings, weights
    drawn at random): each store's layer and classifier chosen by CV on the training data, their test
    scores and the difference, which is what the pretrained weights add."""
    shown = []
    for pretrained, control in weights_pairs(stores):
        chosen = [select_best(chosen_among(rows[rows["features"] == store["extractor"]])) for store in (pretrained, control)]
        if any(row is None for row in chosen):  # a store not probed yet
            continue
        trained, untrained = chosen
        shown.append({"backbone": pretrained["fingerprint"]["model"],
                      "pretrained (chosen by CV)": describe(trained), "pretrained %": f"{100 * trained[metric]:.2f}",
                      "random weights (chosen by CV)": describe(untrained), "random weights %": f"{100 * untrained[metric]:.2f}",
                      "pretrained - random (points)": f"{100 * (trained[metric] - untrained[metric]):+.2f}"})
    if not shown:
        return []
    return ["## Pretrained vs random weights", "",
            "The same network and settings with its pretrained weights and with weights drawn at random (`WEIGHTS=random`, "
            f"seeded), each at the layer and classifier chosen by cross-validation on the training data; test {METRIC_LABELS[metric]}. "
            "The difference is what pretraining put into the features beyond the architecture. The random-weights rows are a "
            "control: they are never the headline.", "", markdown_table(pd.DataFrame(shown)), ""]


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
            markdown_table(shown), ""]


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
                  markdown_table(table.rename(columns={"protocol": "source -> target"}).fillna("-")), ""]
    return lines
