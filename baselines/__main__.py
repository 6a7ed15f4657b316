"""Command line: ``python -m baselines --dataset ... --baselines hog``."""

from __future__ import annotations

import argparse
import sys

from extract.cli import add_dataset_arguments, dataset_from, run_command
from extract.pipeline import extract_to_store, store_path

BASELINES = ("hog",)


def build(name: str, dataset):
    if name == "hog":
        from baselines.hog import HOGFeaturizer

        return HOGFeaturizer.for_dataset(dataset)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")


def cmd_baselines(args) -> None:
    dataset = dataset_from(args)
    for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        featurizer = build(name, dataset)
        path = extract_to_store(
            dataset, featurizer, store_path(args.features_dir, dataset, featurizer),
            on_error=args.on_error, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds,
        )
        print(f"features: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baselines", description="hand-crafted features into features/<dataset>/<baseline>.h5")
    add_dataset_arguments(parser)
    parser.add_argument("--baselines", default=",".join(BASELINES), help=f"comma-separated, from: {', '.join(BASELINES)}")
    parser.add_argument("--workers", type=int, default=None)
    return run_command(cmd_baselines, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
