"""Command line: ``python -m baselines --dataset ... --baselines hog,surf_bow,sift_bow,vlad,fisher,color,raw``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extract.cli import add_dataset_arguments, dataset_from, run_command
from extract.pipeline import extract_to_store, store_path

BASELINES = ("hog", "surf_bow", "sift_bow", "vlad", "fisher", "color", "raw")


def build(name: str, dataset, *, dense: bool = False, words: int | None = None, seed: int = 0):
    """A featurizer for baseline ``name``; codebook baselines still need ``fit_dataset``."""
    if name == "hog":
        from baselines.hog import HOGFeaturizer

        return HOGFeaturizer.for_dataset(dataset)
    if name == "color":
        from baselines.simple import ColorHistogram

        return ColorHistogram()
    if name == "raw":
        from baselines.simple import RawPixels

        return RawPixels(min(32, min(dataset.read(0).shape[:2]))) if len(dataset) else RawPixels()
    local = {"surf_bow": ("surf", "bow"), "sift_bow": ("sift", "bow"), "vlad": ("sift", "vlad"), "fisher": ("sift", "fisher")}
    if name in local:
        from baselines.local import LocalFeaturizer

        descriptor, encoding = local[name]
        return LocalFeaturizer(descriptor, encoding, words=words, dense=dense, seed=seed)
    raise ValueError(f"unknown baseline {name!r}; valid: {', '.join(BASELINES)}")


def cmd_baselines(args) -> None:
    dataset = dataset_from(args)
    for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        featurizer = build(name, dataset, dense=args.dense, words=args.words, seed=args.seed)
        path = store_path(args.features_dir, dataset, featurizer)
        if hasattr(featurizer, "fit_dataset"):
            featurizer.fit_dataset(dataset, Path(str(path).removesuffix(".h5") + ".codebook.npz"))
        path = extract_to_store(
            dataset, featurizer, path,
            on_error=args.on_error, overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds,
        )
        print(f"features: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m baselines", description="hand-crafted features into features/<dataset>/<baseline>.h5")
    add_dataset_arguments(parser)
    parser.add_argument("--baselines", default=",".join(BASELINES), help=f"comma-separated, from: {', '.join(BASELINES)}")
    parser.add_argument("--dense", action="store_true", help="SURF/SIFT on a dense grid instead of detected keypoints")
    parser.add_argument("--words", type=int, default=None, help="codebook size (default: 1000 for BoW, 64 for VLAD, 16 GMM modes for Fisher)")
    parser.add_argument("--workers", type=int, default=None)
    return run_command(cmd_baselines, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
