"""Command line: ``python -m classify {probe,predict,tsne,projector,summary,report}``: probes on every store and layer,
predictions of a saved probe, t-SNE of every layer, Embedding Projector files, the summary across datasets, and the report."""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pandas as pd

from classify.budget import DEFAULT_MEMORY_BUDGET, describe_bytes, parse_bytes
from classify.evaluate import (ALL_CLASSIFIERS, FUSE_SIZES, PROBE_RANGES, PROTOCOL_HELP, Evaluation, ProbeSettings, parse_protocol,
                               store_paths)
from classify.persist import SavedProbe
from classify.probe import CLASSIFIERS, NORMALIZATIONS, SEARCHES, SELECT_BY, parse_cs
from classify.recipe import DEFAULT_RECIPE, RECIPES
from classify.results import read_results, update_results, write_csv
from extract.arguments import POSITIVE, SEEDS, ArgumentParser, names, option, user_option, whole
from extract.commands import add_cluster_arguments, run_command
from extract.datasets import CROPS, DATASETS, dataset_slug
from extract.errors import UserError
from extract.store import FeatureStore

TSNE_SAMPLES = whole(3)  # classify.embed.TSNE_SAMPLES, without importing matplotlib to parse a command line


def results_dir(args) -> Path:
    return Path(args.results_dir) / dataset_slug(args.dataset, args.crop)


def protocols_for(args) -> list:
    """``--protocol``, else the dataset's standard ones (Office: every transfer between domains)."""
    if args.protocol:
        return [parse_protocol(args.protocol)]
    spec = DATASETS.get(args.dataset)
    return [parse_protocol(p) for p in (spec.protocols if spec else ("given",))]


def probe_settings(args) -> ProbeSettings:
    """The recipe's settings (``--recipe``), with any option given on the command line instead; the
    rows carry the recipe's name, or "custom" where an option changed it."""
    recipe = RECIPES[args.recipe]
    chosen = {
        "classifiers": None if args.classifier is None else
        {"both": CLASSIFIERS, "auto": RECIPES["best"].classifiers, "all": ALL_CLASSIFIERS}.get(args.classifier, (args.classifier,)),
        "normalizations": None if args.normalization is None else
        (RECIPES["best"].normalizations if args.normalization == "auto" else (args.normalization,)),
        "Cs": args.cs, "cv_repeats": args.cv_repeats,
        "fuse": args.fuse,
    }
    fields = recipe.probe_settings()
    given = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in chosen.items() if v is not None}
    if any(fields[k] != v for k, v in given.items()):
        fields = {**fields, **given, "recipe": "custom"}
    return ProbeSettings(**fields, search=args.search, cv=args.cv, select_by=args.select_by, seed=args.seed,
                         repeats=args.repeats, n_jobs=args.jobs, memory_budget=args.memory_budget)


def parse_fuse(text: str) -> tuple[int, ...]:
    """``auto`` (the top 2 and top 3 taps), ``none``, or sizes ``2,3,4`` (each in ``FUSE_SIZES``)."""
    if text == "auto":
        return RECIPES["best"].fuse
    if text == "none":
        return ()
    bad = UserError(f"{text!r}: give auto, none, or how many taps to join, each {FUSE_SIZES.each.describe()}, e.g. 2,3")
    try:
        sizes = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise bad from None
    if not sizes or sizes not in FUSE_SIZES:
        raise bad
    return sizes


def dataset_stores(args, features=None) -> list[Path]:
    """The stores of the dataset (``--features``, else all), each checked to hold that dataset's
    features: a store renamed or copied from another dataset's folder is refused in one line."""
    slug = dataset_slug(args.dataset, args.crop)
    paths = store_paths(args.features_dir, slug, features)
    for path in paths:
        with FeatureStore(path, dataset=slug):
            pass
    return paths


def cmd_probe(args) -> None:
    settings = probe_settings(args)
    # The best recipe's ablation opens with the plain probe: its rows too (cached where they exist).
    runs = [replace(settings, **RECIPES["plain"].probe_settings()), settings] if settings.recipe == "best" else [settings]
    out = results_dir(args)
    started = time.monotonic()
    previous = None if args.refit else read_results(out / "results.csv")
    rows, cached = [], 0
    # Each fitted job's rows are merged as soon as they are done: a killed run keeps them.
    merge = functools.partial(update_results, out / "results.csv")
    paths = dataset_stores(args, args.features)
    with ExitStack() as stack:
        cluster = None
        if args.workers or args.ray_address:
            from classify.distributed import RayJobs  # imports Ray only where asked for

            cluster = RayJobs(stack, args.workers, args.ray_address)
        for path in paths:
            for protocol, run in itertools.product(protocols_for(args), runs):
                evaluation = Evaluation(path, protocol, run, out_dir=out, features_dir=Path(args.features_dir),
                                        save_probes=args.save_probes, results=previous, on_rows=merge, cluster=cluster)
                rows += evaluation.run(layers=args.layers, progress=not args.no_progress)
                cached += evaluation.cached
    if not rows:
        raise UserError(f"no store of {args.dataset} has any of the layers {','.join(args.layers)}")
    for row in rows:
        spread = f" ± {100 * row['top1_std']:.2f}" if row["repeats"] > 1 else ""
        score = (f"mAP {100 * row['mAP']:6.2f}%" if pd.notna(row.get("mAP")) else
                 f"top-1 {100 * row['top1']:6.2f}%{spread}  mean/class {100 * row['mean_per_class_acc']:6.2f}%")
        cv = f"cv {100 * row['cv_score']:6.2f}%" if pd.notna(row["cv_score"]) else "cv    -   "
        print(f"{row['features']:>24} {row['layer']:<12} {row['classifier']:<7} {row['normalization']:<8} {row['protocol']:<22} "
              f"C={row['C']:<8.3g} {cv}  {score}")
    print(f"results: {out / 'results.csv'} ({len(rows)} rows, {cached} probe jobs cached; {time.monotonic() - started:.1f} s)")


def cmd_predict(args) -> None:
    probe = SavedProbe.load(args.probe)
    with FeatureStore(args.store) as store:
        probe.check_store(store)
        predicted = probe.predict(probe.read_features(store))
        table = pd.DataFrame({"path": store.paths, "split": store.splits, "predicted": predicted})
    out = Path(args.out or Path(args.store).with_suffix(f".{Path(args.probe).stem}.predictions.csv"))
    write_csv(table, out)
    print(f"predictions: {out}")


def image_source(args):
    """Where the thumbnails' images are read from: the dataset as `make extract` read it."""
    from classify.thumbnails import ImageSource

    return ImageSource(args.dataset, crop=args.crop, data_dir=args.data_dir)


def cmd_tsne(args) -> None:
    from classify.embed import StoreEmbedding, embed_stores, embeddings_path
    from classify.page import collect
    from classify.thumbnails import ensure_thumbnails

    slug = dataset_slug(args.dataset, args.crop)
    paths = dataset_stores(args, args.features)
    if args.model:  # that backbone's stores (any pooling) and every baseline
        from extract.backbones import get_backbone

        name = get_backbone(args.model).name
        paths = [p for p in paths if p.stem == name or p.stem.startswith(f"{name}-") or _is_baseline(p)]
    table = embed_stores(paths, out_dir=results_dir(args), report_dir=Path(args.reports_dir) / slug, n=args.n, seed=args.seed,
                         layers=args.layers, progress=not args.no_progress)
    print(table[["features", "layer", "knn_acc_features", "knn_acc_tsne", "silhouette", "probe_top1"]].to_string(index=False))
    # The page's thumbnails, now that the dataset is read anyway: the sample, and the confusion strips
    # of the probe chosen so far (`make report` then reads no image).
    report_dir = Path(args.reports_dir) / slug
    wanted = {str(p) for f in table["features"].unique() for p in StoreEmbedding.load(embeddings_path(results_dir(args), f)).paths}
    if (results_dir(args) / "results.csv").is_file():
        wanted |= set(collect(results_dir(args), report_dir, features_dir=args.features_dir).thumbnail_paths())
    ensure_thumbnails(report_dir, sorted(wanted), image_source(args), progress=not args.no_progress)
    print(f"layers: {results_dir(args) / 'layers.csv'}; pictures: {Path(args.reports_dir) / slug / 'tsne_grid.png'}")


def cmd_projector(args) -> None:
    from classify.projector import write_projector

    slug = dataset_slug(args.dataset, args.crop)
    store = store_paths(args.features_dir, slug, [args.features])[0]
    report_dir = Path(args.reports_dir) / slug
    out = write_projector(store, args.layer, report_dir / "projector" / f"{args.features}__{args.layer}", report_dir=report_dir,
                          n=args.n, seed=args.seed, images=image_source(args), pca=args.pca)
    print(f"projector: {out} (`tensorboard --logdir {out}`, or load its projector_config.json in the standalone projector)")


def _is_baseline(path: Path) -> bool:
    with FeatureStore(path) as store:
        return store.kind == "baseline"


def cmd_summary(args) -> None:
    from classify.report import write_summary

    slugs = [dataset_slug(d) for d in args.datasets.split()]
    print(f"summary: {write_summary(args.results_dir, args.reports_dir, slugs)}")


def cmd_report(args) -> None:
    from classify.page import write_page
    from classify.report import write_report  # matplotlib: imported only where a report is drawn

    report_dir = Path(args.reports_dir) / dataset_slug(args.dataset, args.crop)
    report = write_report(results_dir(args) / "results.csv", report_dir, features_dir=Path(args.features_dir))
    print(f"report: {report}")
    page = write_page(results_dir(args), report_dir, features_dir=Path(args.features_dir), images=image_source(args))
    print(f"page: {page} (open it in a browser; it needs no server)")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m classify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", default="fashion-mnist")
    common.add_argument("--crop", default=None, choices=CROPS, help="birds: the bounding-box-cropped stores")
    common.add_argument("--features-dir", default="features")
    common.add_argument("--results-dir", default="results")
    common.add_argument("--reports-dir", default="reports")
    common.add_argument("--data-dir", default=None, help="where the dataset's images are, as for `make extract` (thumbnails)")

    probe = sub.add_parser("probe", parents=[common], help="fit linear probes on every store and layer; update results.csv")
    probe.add_argument("--features", type=names, default=None, help="comma-separated store names (default: every store of the dataset)")
    probe.add_argument("--layers", type=names, default=None, help="comma-separated layer names, a+b for a fused layer (default: all)")
    probe.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                       help="plain: one probe per layer (standardised, logistic regression); best: also fused layers, "
                            "every normalisation and classifier, a wider C range and repeated CV, all chosen by CV "
                            "(the options below override it)")
    probe.add_argument("--classifier", default=None, choices=(*ALL_CLASSIFIERS, "both", "auto", "all"),
                       help="both / auto: logistic regression and linear SVM, each a candidate (default: the recipe's)")
    probe.add_argument("--protocol", default=None,
                       help=f"{PROTOCOL_HELP} (default: the dataset's standard protocols)")
    probe.add_argument("--normalization", default=None, choices=(*NORMALIZATIONS, "auto"),
                       help="auto: standard, l2 and sqrt, each a candidate (default: the recipe's)")
    probe.add_argument("--fuse", type=user_option(parse_fuse), default=None,
                       help="fused layers from the best taps by CV: auto (top 2 and top 3), none, or sizes 2,3 "
                            "(default: the recipe's); LAYERS=a+b names one")
    probe.add_argument("--search", default="cv", choices=SEARCHES, help="C chosen by k-fold CV or on a held-out validation split")
    probe.add_argument("--select-by", default="loss", choices=SELECT_BY,
                       help="C with the lowest mean held-out loss (stable under tiny feature changes), or the highest held-out accuracy")
    probe.add_argument("--cs", type=user_option(parse_cs), default=None, help="C grid: LOW:HIGH:COUNT (log-spaced) or a,b,c (default: the recipe's)")
    probe.add_argument("--cv", type=option(PROBE_RANGES["cv"]), default=3, help="cross-validation folds on the training split")
    probe.add_argument("--cv-repeats", type=option(PROBE_RANGES["cv_repeats"]), default=None, help="repeat the k-fold CV on this many seeded partitions (default: the recipe's)")
    probe.add_argument("--repeats", type=option(PROBE_RANGES["repeats"]), default=5, help="few-shot draws per k")
    probe.add_argument("--seed", type=option(PROBE_RANGES["seed"]), default=0)
    probe.add_argument("--jobs", type=option(PROBE_RANGES["n_jobs"]), default=None, help="worker processes: one probe (layer, classifier) each, or the C search's folds when a store has one probe to fit (default: all cores; with --workers or --ray-address, the Ray tasks instead)")
    probe.add_argument("--memory-budget", type=user_option(parse_bytes), default=DEFAULT_MEMORY_BUDGET,
                       help="what the fits running at once may hold, e.g. 8G, 512M or bytes: a (layer, classifier) whose "
                            "in-memory fit is estimated above it is fitted by streaming SGD over chunks of the store "
                            f"(default: {describe_bytes(DEFAULT_MEMORY_BUDGET)})")
    add_cluster_arguments(probe, per_gpu=False)  # each (layer, classifier) a Ray task: the same rows as here
    probe.add_argument("--save-probes", action="store_true", help="save each probe to results/<dataset>/probes/ (npz)")
    probe.add_argument("--refit", action="store_true", help="fit every probe again, even those whose rows results.csv already holds")
    probe.add_argument("--no-progress", action="store_true")
    probe.set_defaults(func=cmd_probe)

    predict = sub.add_parser("predict", help="apply a saved probe to a store")
    predict.add_argument("--probe", required=True, help="a .npz written by `probe --save-probes`")
    predict.add_argument("--store", required=True, help="a feature store made with the same settings")
    predict.add_argument("--out", default=None, help="CSV to write (default: beside the store)")
    predict.set_defaults(func=cmd_predict)

    tsne = sub.add_parser("tsne", parents=[common], help="t-SNE of every layer and baseline; results/<dataset>/layers.csv")
    tsne.add_argument("--features", type=names, default=None, help="comma-separated store names (default: every store)")
    tsne.add_argument("--model", default=None, help="only this backbone's stores (and the baselines)")
    tsne.add_argument("--layers", type=names, default=None, help="comma-separated layer names (default: all)")
    tsne.add_argument("--n", type=option(TSNE_SAMPLES), default=1000, help="images per embedding: a seeded, class-balanced sample")
    tsne.add_argument("--seed", type=option(SEEDS), default=0)
    tsne.add_argument("--no-progress", action="store_true")
    tsne.set_defaults(func=cmd_tsne)

    projector = sub.add_parser("projector", parents=[common], help="TensorBoard Embedding Projector files of one layer")
    projector.add_argument("--features", required=True, help="the store's name, e.g. efficientnet_lite0")
    projector.add_argument("--layer", required=True, help="one of its layers")
    projector.add_argument("--n", type=option(POSITIVE), default=1000, help="images: the seeded, class-balanced sample of `make tsne`")
    projector.add_argument("--seed", type=option(SEEDS), default=0)
    projector.add_argument("--pca", type=option(POSITIVE), default=None, help="standardise and reduce to this many dimensions (wide layers)")
    projector.set_defaults(func=cmd_projector)

    summary = sub.add_parser("summary", help="reports/summary.md: the best CNN layer and baseline of several datasets")
    summary.add_argument("--datasets", required=True, help="space-separated dataset specs, as in DATASETS=")
    summary.add_argument("--results-dir", default="results")
    summary.add_argument("--reports-dir", default="reports")
    summary.set_defaults(func=cmd_summary)

    report = sub.add_parser("report", parents=[common], help="write reports/<dataset>/report.md from results.csv")
    report.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    return run_command(args.func, args)
