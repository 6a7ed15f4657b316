"""Command line of ``python -m extract {features,layers,fetch,data-info}``, and the dataset
options and error handling that ``python -m baselines`` shares."""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from extract.arguments import FRACTION, POSITIVE, SEEDS, ArgumentParser, names, number, option
from extract.datasets import CROPS, DATASETS, load_dataset
from extract.errors import UserError
from extract.images import MISSING, RESIZES, VIEWS, ImageDecodeError, check_views
from extract.pipeline import CHECKPOINT_SECONDS
from extract.store import DISK_ERRNOS

DTYPES = ("float32", "bfloat16")  # extract.extractor.DTYPES, without importing Keras to parse a command line


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", help=f"{', '.join(DATASETS)}, folder:PATH or csv:FILE")
    parser.add_argument("--data-dir", default=None, help="where an existing copy of the dataset lives")
    parser.add_argument("--crop", default=None, choices=CROPS, help="birds: crop to the bounding box enlarged 1.5x")
    parser.add_argument("--resize", default=None, choices=RESIZES,
                        help="non-square images to square inputs: centre square, warp the whole image, or pad it "
                             "(default: warp for bounding-box crops, else centre)")
    parser.add_argument("--limit", type=option(POSITIVE), default=None, help="class-balanced subset: N train and N//2 per other split")
    parser.add_argument("--full", action="store_true", help="use every image (no default subset)")
    parser.add_argument("--seed", type=option(SEEDS), default=0, help="seed for subsets, splits and random weights")
    parser.add_argument("--features-dir", default="features", help="root folder of the feature stores")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="on an unreadable image: stop, or record it as skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--checkpoint-seconds", type=option(number(0)), default=CHECKPOINT_SECONDS, help="save finished batches at least this often")


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images are decoded and featurized: here, or on Ray workers (``extract.distributed``)."""
    parser.add_argument("--threads", type=option(POSITIVE), default=None, help="image decoding threads of this process")
    parser.add_argument("--workers", type=option(POSITIVE), default=None,
                        help="Ray workers: a local Ray cluster of this machine's CPUs with N workers, or N workers of --ray-address")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="an existing Ray cluster (auto: the one this machine belongs to; default: $RAY_ADDRESS); "
                             "one worker per GPU where it has GPUs")
    parser.add_argument("--ship-bytes", action="store_true",
                        help="send each image's encoded bytes from here to the Ray workers (when they cannot read the image paths)")


def scaling_options(args) -> dict:
    return {"threads": args.threads, "workers": args.workers, "ray_address": args.ray_address, "ship_bytes": args.ship_bytes}


def dataset_from(args):
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit, full=args.full, seed=args.seed, crop=args.crop)
    return replace(dataset, info={**dataset.info, "resize": args.resize}) if args.resize else dataset


def cmd_features(args) -> None:
    from extract.extractor import CNNFeaturizer
    from extract.pipeline import extract_to_store, store_path

    for view in args.views:  # every value checked before the dataset is read or any store written
        check_views(view)
    dataset = dataset_from(args)
    for view in args.views:  # one store per view setting
        featurizer = CNNFeaturizer(
            args.model, layers=args.layers, pooling=args.pooling, weights=args.weights, seed=args.seed,
            batch_size=args.batch_size, crop_pct=args.crop_pct, resize=dataset.resize, dtype=args.dtype, views=view,
        )
        path = extract_to_store(
            dataset, featurizer, store_path(args.features_dir, dataset, featurizer),
            on_error=args.on_error, overwrite=args.overwrite, progress=not args.no_progress,
            checkpoint_seconds=args.checkpoint_seconds, **scaling_options(args),
        )
        print(f"features: {path}")


def cmd_layers(args) -> None:
    from extract.backbones import layer_paths, tap_tensor
    from extract.extractor import CNNFeaturizer

    featurizer = CNNFeaturizer(args.model, weights=None, pooling=args.pooling, fold_batchnorm=False)  # shapes of the real layers
    size = featurizer.input_size
    print(f"{args.model}: input {size}x{size}x3 RGB in [0, 255]; preprocessing {featurizer.spec.preprocessing}")
    print(f"{'index':>5}  {'tap':<12} {'layer':<24} {'output shape':<16} {'stride':>6} {'pooled dim':>10}")
    for index, info in enumerate(featurizer.feature_info):
        shape = tuple(tap_tensor(featurizer.backbone, info.layer).shape[1:])
        print(f"{index:>5}  {info.name:<12} {info.layer:<24} {str(shape):<16} {info.stride:>6} {featurizer.dims[info.name]:>10}")
    if args.all:
        print("\nevery layer (any of these names, or a glob of them, works in LAYERS=):")
        for path in layer_paths(featurizer.backbone):
            print(f"  {path:<48} {tuple(tap_tensor(featurizer.backbone, path).shape[1:])}")


def cmd_fetch(args) -> None:
    from extract.datasets import fetch_dataset

    print(f"{args.dataset}: {fetch_dataset(args.dataset, progress=not args.no_progress)}")


def unreadable_images(dataset, *, threads: int | None = None, progress: bool = True) -> list[tuple[str, str]]:
    """(path, reason) of every image that is missing or does not decode, in dataset order."""
    from extract.pipeline import decode_pool
    from tqdm.auto import tqdm

    def check(i: int):
        try:
            dataset.read(i, min_side=64)
        except ImageDecodeError as error:
            return dataset.paths[i], error.reason
        return None

    with decode_pool(threads) as pool:
        found = list(tqdm(pool.map(check, range(len(dataset))), total=len(dataset), desc="checking images", disable=not progress))
    return [f for f in found if f is not None]


def cmd_data_info(args) -> None:
    dataset = dataset_from(args)
    counts = dataset.counts()
    width = max(28, *(len(c) + 2 for c in dataset.classes))
    print(f"{dataset.name}: {len(dataset)} images, {len(dataset.classes)} classes, source {dataset.info.get('source')}")
    print(f"{'class':<{width}}" + "".join(f"{s:>10}" for s in counts))
    for name in dataset.classes:
        print(f"{name:<{width}}" + "".join(f"{counts[s][name]:>10}" for s in counts))
    print(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>10}" for s in counts))
    if dataset.targets is not None:
        present = (dataset.targets == 1).sum(axis=1)
        print(f"multi-label: {present.mean():.2f} classes per image on average, {int((dataset.targets == -1).sum())} difficult-only labels")
    if args.no_check:
        return
    bad = unreadable_images(dataset, progress=not args.no_progress)
    missing = [(p, r) for p, r in bad if r.startswith(MISSING)]
    broken = [(p, r) for p, r in bad if not r.startswith(MISSING)]
    print(f"missing files: {len(missing)}" + "".join(f"\n  {p}{r.removeprefix(MISSING)}" for p, r in missing))
    print(f"unreadable files: {len(broken)}" + "".join(f"\n  {p}: {r}" for p, r in broken))


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m extract", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    features = sub.add_parser("features", help="extract CNN features into features/<dataset>/<model>.h5")
    add_dataset_arguments(features)
    features.add_argument("--model", default="efficientnet_lite0", help="a registered backbone (see `layers`)")
    features.add_argument("--layers", default=None, help="taps: names, globs, indices, or N for the last N (default: all)")
    features.add_argument("--pooling", default="avg", choices=("avg", "max", "avgmax", "spp"))
    features.add_argument("--weights", default="imagenet", help="imagenet, random, or a weights file")
    features.add_argument("--crop-pct", type=option(FRACTION), default=None, help="centre-crop fraction of the shorter side (default 1.0; ImageNet evaluation used 0.875)")
    features.add_argument("--batch-size", type=option(POSITIVE), default=32, help="images per batch (each forward pass holds all their views)")
    # No argparse choices: a wrong value is the one line of extract.images.check_views, as for any bad setting.
    features.add_argument("--views", type=names, default="centre",
                          help=f"{', '.join(VIEWS)}: the views of each image whose pooled features are averaged into its row "
                               "(flip: it and its mirror; crops5: four corners and the centre of a 1/0.875 larger square; "
                               "crops10: those and their mirrors); recorded in the store's name and fingerprint. "
                               "Several, comma-separated (centre,flip): one store each, all candidates of `classify probe`")
    features.add_argument("--dtype", default="float32", choices=DTYPES,
                          help="the model's weights and arithmetic; bfloat16 is faster on GPUs, features are stored as float32 "
                               "either way (and the dtype is recorded: a store is never mixed across dtypes)")
    add_scaling_arguments(features)
    features.set_defaults(func=cmd_features)

    layers = sub.add_parser("layers", help="list a backbone's taps and their output shapes")
    layers.add_argument("--model", default="efficientnet_lite0")
    layers.add_argument("--pooling", default="avg", choices=("avg", "max", "avgmax", "spp"))
    layers.add_argument("--all", action="store_true", help="also list every Keras layer that can be tapped by name")
    layers.set_defaults(func=cmd_layers)

    fetch = sub.add_parser("fetch", help="download a dataset's official files (checksummed) into the cache")
    fetch.add_argument("--dataset", default="fashion-mnist", choices=list(DATASETS))
    fetch.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    fetch.set_defaults(func=cmd_fetch)

    info = sub.add_parser("data-info", help="counts per split and class; missing and unreadable images")
    add_dataset_arguments(info)
    info.add_argument("--no-check", action="store_true", help="skip decoding every image")
    info.set_defaults(func=cmd_data_info)

    args = parser.parse_args(argv)
    return run_command(args.func, args)


def run_command(func, args) -> int:
    """Run a command with logging set up; expected failures print one clear line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        func(args)
    except (UserError, FileNotFoundError) as error:  # a bug elsewhere keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        print(f"error: {disk_error_message(error, output_option(args, error.filename))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def exit_process(code: int) -> NoReturn:
    """``sys.exit(code)`` at the end of a command's process (``python -m ...``), without the
    interpreter's last garbage collections over every object still alive: after TensorFlow's
    import they took 1.3 s of each command's wall time (0.13 s frozen), 0.4 s after scikit-learn's.
    Atexit handlers, stream flushes and the freeing of each module's objects still happen."""
    gc.freeze()
    sys.exit(code)


# The options that say where a command writes, most specific first (a results folder may lie inside the features folder).
OUTPUT_OPTIONS = {"out": "--out", "reports_dir": "--reports-dir", "results_dir": "--results-dir", "models_dir": "--models-dir",
                  "features_dir": "--features-dir"}


def output_option(args, filename) -> str:
    """The option naming the folder (or file) that holds ``filename``; else ``--out`` where the command has one."""
    if filename:
        path = Path(os.fspath(filename)).resolve()
        for attribute, flag in OUTPUT_OPTIONS.items():
            folder = getattr(args, attribute, None)
            if folder is not None and (path == Path(folder).resolve() or Path(folder).resolve() in path.parents):
                return flag
    return "--out" if hasattr(args, "out") else "--features-dir"


def disk_error_message(error: OSError, option: str = "--features-dir") -> str:
    """One line for a full disk, a file-size limit or a read-only folder: the file and the fix
    (``option``: the command-line option that moves the file elsewhere)."""
    name = error.filename or "a file"
    if error.errno in (errno.EACCES, errno.EPERM):  # reading or writing
        return f"{name}: {error.strerror}; give this user access to it, or write elsewhere with {option}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space there, or write elsewhere with {option}, then rerun the same command (finished work is kept)"
    elif error.errno == errno.EFBIG:
        fix = "the file is larger than this process may write (ulimit -f): raise the limit, then rerun the same command (finished work is kept)"
    else:
        fix = f"the folder is on a read-only file system: write elsewhere with {option}"
    return f"cannot write {name}: {error.strerror}; {fix}"
