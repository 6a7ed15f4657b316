"""Command line: ``python -m transfer {pretrain-cae,finetune,recipe,rule-of-thumb}``."""

from __future__ import annotations

import argparse
from pathlib import Path

from extract.arguments import POSITIVE, ArgumentParser, names, number, option, whole
from extract.commands import add_dataset_arguments, dataset_from, run_command
from extract.datasets import dataset_slug
from transfer.analysis import REGIMES_TEXT
from transfer.finetune import TRAIN_MODES, FinetuneSettings, run_finetune
from transfer.layers import BATCHNORM_POLICIES, DEFAULT_BATCHNORM
from transfer.recipe import RecipeSettings, pretrain_cae, train_classifier
from transfer.training import image_arrays, split_rows


def _full_training_images(args, size: int):
    """The dataset's training images, unlabelled: all of them (not the --limit subset),
    or --pretrain-limit of them."""
    full = argparse.Namespace(**{**vars(args), "limit": args.pretrain_limit, "full": args.pretrain_limit is None})
    dataset = dataset_from(full)
    return image_arrays(dataset, split_rows(dataset, "train"), size, progress=not args.no_progress)


def _recipe_settings(args) -> RecipeSettings:
    return RecipeSettings(input_size=args.input_size, pretrain_epochs=args.pretrain_epochs, train_epochs=args.epochs,
                          batch_size=args.batch_size, seed=args.seed)


def _checkpoint(args) -> Path:
    return Path(args.out or Path(args.models_dir) / f"cae-{dataset_slug(args.dataset, args.crop)}.keras")


def cmd_pretrain(args) -> None:
    settings = _recipe_settings(args)
    path, losses = pretrain_cae(_full_training_images(args, settings.input_size), _checkpoint(args), settings,
                                progress=not args.no_progress)
    print(f"autoencoder: {path}; reconstruction loss by epoch: {', '.join(f'{v:.4f}' for v in losses)}")
    print(f"use its encoder as a backbone: make extract MODEL=cae:{path}")


def cmd_finetune(args) -> None:
    settings = FinetuneSettings(train=args.train, epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                                backbone_lr_scale=args.backbone_lr_scale, weights=args.weights, seed=args.seed,
                                init_from=args.init_from, restore=tuple(args.restore.split(",")), batchnorm=args.batchnorm)
    dataset = dataset_from(args)
    row = run_finetune(dataset, args.model, settings, results_dir=Path(args.results_dir) / dataset.name, progress=not args.no_progress)
    print(f"{row['features']} {row['layer']}: top-1 {100 * row['top1']:.2f}%, mean per-class {100 * row['mean_per_class_acc']:.2f}% "
          f"({row['fit_seconds']:.0f} s); results: {Path(args.results_dir) / dataset.name / 'results.csv'}")


def cmd_recipe(args) -> None:
    from classify.evaluate import Evaluation, ProbeSettings, parse_protocol
    from classify.results import update_results
    from extract.extractor import CNNFeaturizer
    from extract.pipeline import extract_to_store, store_path

    settings = _recipe_settings(args)
    path, losses = pretrain_cae(_full_training_images(args, settings.input_size), _checkpoint(args), settings,
                                progress=not args.no_progress)
    print(f"1. pretrained without labels: {path}; reconstruction loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    dataset = dataset_from(args)
    results_dir = Path(args.results_dir) / dataset.name
    rows = {"restored": train_classifier(dataset, path, settings, results_dir=results_dir, progress=not args.no_progress)[0],
            "scratch": train_classifier(dataset, None, settings, results_dir=results_dir, progress=not args.no_progress)[0]}
    featurizer = CNNFeaturizer(f"cae:{path}", batch_size=256)
    store = extract_to_store(dataset, featurizer, store_path(args.features_dir, dataset, featurizer), overwrite=True,
                             progress=not args.no_progress)
    probes = Evaluation(store, parse_protocol("given"), ProbeSettings(seed=args.seed), out_dir=results_dir).run(progress=not args.no_progress)
    update_results(results_dir / "results.csv", probes)
    print(f"2. on {rows['restored']['n_train']} labelled images, tested on {rows['restored']['n_test']}:")
    print(f"   conv restored from the autoencoder, frozen; dense trained: top-1 {100 * rows['restored']['top1']:.2f}%")
    print(f"   same classifier from scratch:                            top-1 {100 * rows['scratch']['top1']:.2f}%")
    for probe in probes:
        print(f"   linear probe on the encoder's {probe['layer']:<6} ({probe['n_features']:>4} features):    top-1 {100 * probe['top1']:.2f}%")
    print(f"results: {results_dir / 'results.csv'}")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give training images per class, comma-separated whole numbers from 1, e.g. 5,10,20")
    return sizes


def cmd_rule_of_thumb(args) -> None:
    from transfer.analysis import RULE_OF_THUMB_CSV
    from transfer.rule_of_thumb import RuleOfThumb, RuleSettings

    settings = RuleSettings(model=args.model, regimes=args.regimes,
                            sizes=args.sizes, repeats=args.repeats, seed=args.seed, max_epochs=args.max_epochs,
                            max_epochs_uncached=args.max_epochs_uncached, batch_size=args.batch_size or 32, batchnorm=args.batchnorm)
    dataset = dataset_from(args)
    csv = Path(args.results_dir) / dataset.name / RULE_OF_THUMB_CSV
    table = RuleOfThumb(dataset, settings, csv_path=csv, progress=not args.no_progress).run()
    summary = table.groupby(["regime", "per_class"])["top1"].agg(["mean", "std", "count"]).reset_index()
    for row in summary.itertuples(index=False):
        print(f"{row.regime:<10} {row.per_class:>5} per class: top-1 {100 * row.mean:6.2f}% ± {100 * (row.std if row.count > 1 else 0):.2f} "
              f"({row.count} draws)")
    print(f"rule of thumb: {csv}; `make report` adds the learning curves")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m transfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, *, epochs: bool = True):
        add_dataset_arguments(p)
        p.add_argument("--results-dir", default="results")
        p.add_argument("--batch-size", type=option(POSITIVE), default=None)
        if epochs:  # the rule of thumb stops early, within --max-epochs
            p.add_argument("--epochs", type=option(POSITIVE), default=None, help="training epochs")

    def batchnorm_option(p):
        p.add_argument("--batchnorm", default=DEFAULT_BATCHNORM, choices=BATCHNORM_POLICIES,
                       help="BatchNorm of the unfrozen pretrained layers: frozen (inference mode, pretrained statistics) or train")

    def cae_options(p):
        p.add_argument("--input-size", type=option(whole(4)), default=28, help="autoencoder input side (a multiple of 4)")
        p.add_argument("--pretrain-epochs", type=option(POSITIVE), default=5)
        p.add_argument("--pretrain-limit", type=option(POSITIVE), default=None, help="pretrain on this many training images (default: all)")
        p.add_argument("--models-dir", default="models")
        p.add_argument("--out", default=None, help="checkpoint path (default: models/cae-<dataset>.keras)")

    pretrain = sub.add_parser("pretrain-cae", help="train a convolutional autoencoder on a dataset's training images, no labels")
    common(pretrain)
    cae_options(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    recipe = sub.add_parser("recipe", help="the original recipe: CAE pretraining, restore conv, freeze, train dense; vs probe and scratch")
    common(recipe)
    cae_options(recipe)
    recipe.set_defaults(func=cmd_recipe)

    finetune = sub.add_parser("finetune", help="train a new head and optionally the top blocks of a backbone")
    common(finetune)
    finetune.add_argument("--model", default="efficientnet_lite0")
    finetune.add_argument("--train", default="head", choices=TRAIN_MODES)
    finetune.add_argument("--lr", type=option(number(0, closed="neither")), default=1e-3, help="the head's learning rate (Adam)")
    finetune.add_argument("--backbone-lr-scale", type=option(number(0)), default=0.1, help="unfrozen pretrained layers learn this much slower")
    finetune.add_argument("--weights", default="imagenet")
    finetune.add_argument("--init-from", default=None, help="restore layers from this .keras / .weights.h5 first")
    finetune.add_argument("--restore", default="*", help="comma-separated layer patterns to restore from --init-from")
    batchnorm_option(finetune)
    finetune.set_defaults(func=cmd_finetune)

    rule = sub.add_parser("rule-of-thumb", help="probe vs head vs top blocks vs all vs scratch, at several images per class")
    common(rule, epochs=False)
    batchnorm_option(rule)
    rule.add_argument("--model", default="efficientnet_lite0")
    rule.add_argument("--regimes", type=names, default="probe,head,top1,top2",
                      help=f"comma-separated: {REGIMES_TEXT}")
    rule.add_argument("--sizes", type=_sizes, default=(5, 10, 20, 50, 100),
                      help="training images per class (sizes above the smallest class are left out)")
    rule.add_argument("--repeats", type=option(POSITIVE), default=3, help="seeded draws per size")
    rule.add_argument("--max-epochs", type=option(POSITIVE), default=30, help="epochs at most for head and topN (early stopping)")
    rule.add_argument("--max-epochs-uncached", type=option(POSITIVE), default=8, help="epochs at most for all and scratch")
    rule.set_defaults(func=cmd_rule_of_thumb)

    args = parser.parse_args(argv)
    defaults = {"pretrain-cae": (128, 5), "recipe": (128, 10), "finetune": (32, 3), "rule-of-thumb": (32, 0)}[args.command]
    args.batch_size = args.batch_size or defaults[0]
    if "epochs" in args:
        args.epochs = args.epochs or defaults[1]
    return run_command(args.func, args)
