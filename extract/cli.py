"""Command line of ``python -m extract {features,layers,fetch,data-info}``; the options and error
handling every package's command line shares are in ``extract.commands``."""

from __future__ import annotations


from extract.arguments import FRACTION, POSITIVE, ArgumentParser, names, option
from extract.datasets import DATASETS
from extract.commands import add_dataset_arguments, add_scaling_arguments, dataset_from, run_command, scaling_options
from extract.images import MISSING, VIEWS, ImageDecodeError, check_views

DTYPES = ("float32", "bfloat16")  # extract.extractor.DTYPES, without importing Keras to parse a command line
RUNTIMES = ("auto", "keras", "litert")  # extract.litert.RUNTIMES, likewise


def cmd_features(args) -> None:
    from extract.cached import cnn_featurizer
    from extract.pipeline import extract_to_store, store_path

    for view in args.views:  # every value checked before the dataset is read or any store written
        check_views(view)
    dataset = dataset_from(args)
    for view in args.views:  # one store per view setting
        featurizer = cnn_featurizer(  # a run whose LiteRT model is cached starts without TensorFlow
            args.model, layers=args.layers, pooling=args.pooling, weights=args.weights, seed=args.seed,
            batch_size=args.batch_size, crop_pct=args.crop_pct, resize=dataset.resize, dtype=args.dtype, views=view,
            runtime=args.runtime,
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
    from extract.parallel import decode_pool
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
    features.add_argument("--runtime", default="auto", choices=RUNTIMES,
                          help="what runs the CNN: litert (LiteRT's XNNPACK kernels, fastest on CPUs), keras (the Keras "
                               "backend), auto (litert on the TensorFlow backend in float32, else keras); recorded in the fingerprint")
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


