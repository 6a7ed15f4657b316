"""Command line: ``python -m classify {probe,report}``."""

from __future__ import annotations

import argparse
from pathlib import Path

from classify.evaluate import probe_store, store_paths, update_results
from classify.probe import CLASSIFIERS, DEFAULT_CS, NORMALIZATIONS, parse_cs
from classify.report import write_report
from extract.cli import run_command
from extract.datasets import dataset_slug


def _split_list(text: str | None):
    return None if not text else [item.strip() for item in text.split(",") if item.strip()]


def results_csv(args) -> Path:
    return Path(args.results_dir) / dataset_slug(args.dataset) / "results.csv"


def cmd_probe(args) -> None:
    classifiers = list(CLASSIFIERS) if args.classifier == "both" else [args.classifier]
    rows = []
    for path in store_paths(args.features_dir, dataset_slug(args.dataset), _split_list(args.features)):
        rows += probe_store(
            path, classifiers=classifiers, layers=_split_list(args.layers), Cs=args.cs, cv=args.cv,
            normalization=args.normalization, seed=args.seed, train_split=args.train_split,
            test_split=args.test_split, progress=not args.no_progress,
        )
    update_results(results_csv(args), rows)
    for row in rows:
        print(f"{row['features']:>24} {row['layer']:<12} {row['classifier']:<7} C={row['C']:<8.3g} top-1 {100 * row['top1']:6.2f}%  mean/class {100 * row['mean_per_class_acc']:6.2f}%")
    print(f"results: {results_csv(args)}")


def cmd_report(args) -> None:
    report = write_report(results_csv(args), Path(args.reports_dir) / dataset_slug(args.dataset))
    print(f"report: {report}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m classify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", default="fashion-mnist")
    common.add_argument("--features-dir", default="features")
    common.add_argument("--results-dir", default="results")
    common.add_argument("--reports-dir", default="reports")

    probe = sub.add_parser("probe", parents=[common], help="fit linear probes on every store and layer; update results.csv")
    probe.add_argument("--features", default=None, help="comma-separated store names (default: every store of the dataset)")
    probe.add_argument("--layers", default=None, help="comma-separated layer names (default: all)")
    probe.add_argument("--classifier", default="logreg", choices=(*CLASSIFIERS, "both"))
    probe.add_argument("--normalization", default="standard", choices=NORMALIZATIONS)
    probe.add_argument("--cs", type=parse_cs, default=DEFAULT_CS, help="C grid: LOW:HIGH:COUNT (log-spaced) or a,b,c")
    probe.add_argument("--cv", type=int, default=3, help="cross-validation folds on the training split")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--train-split", default="train")
    probe.add_argument("--test-split", default=None, help="default: test, else val")
    probe.add_argument("--no-progress", action="store_true")
    probe.set_defaults(func=cmd_probe)

    report = sub.add_parser("report", parents=[common], help="write reports/<dataset>/report.md from results.csv")
    report.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    return run_command(args.func, args)
