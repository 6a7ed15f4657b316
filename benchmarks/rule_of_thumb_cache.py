"""Training the top blocks on cached activations vs running the whole network every epoch.

With no augmentation the frozen part of the network computes the same activations every
epoch, so `make rule-of-thumb` computes them once at the cut and trains the top blocks on
them (``tests/test_rule_of_thumb.py`` checks that a step is the same both ways). This script
measures, side by side in one run, the seconds per epoch of the naive loop (the whole network
on the images, lower layers frozen) and of the cached loop (the cut's activations computed
once, then the top blocks only), and the cost of that one forward pass. It prints the
speed-up per epoch and over a typical run of ``--epochs`` epochs.

    .venv/bin/python benchmarks/rule_of_thumb_cache.py [--images 256] [--regime top2] [--epochs 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.backbones import get_backbone, tap_tensor  # noqa: E402
from transfer.finetune import unfrozen_layer_paths  # noqa: E402
from transfer.layers import set_trainable  # noqa: E402
from transfer.layers import apply_batchnorm_policy  # noqa: E402
from transfer.rule_of_thumb import cut_layer  # noqa: E402


def seconds_per_epoch(model, x, y, epochs: int) -> float:
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)  # tracing and first-epoch costs
    start = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--regime", default="top2")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=17)
    parser.add_argument("--measure-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15, help="a typical run's epochs, for the whole-run ratio")
    args = parser.parse_args()
    spec = get_backbone(args.model)
    keras.utils.set_random_seed(0)
    backbone, _ = spec.build(spec.default_weights)
    set_trainable(backbone, ["*"], False)
    set_trainable(backbone, unfrozen_layer_paths(spec, backbone, args.regime), True)
    apply_batchnorm_policy(backbone, "frozen")
    cut, top = tap_tensor(backbone, cut_layer(spec, backbone, args.regime)), tap_tensor(backbone, spec.feature_info[-1].layer)
    head = keras.layers.Dense(args.classes, activation="softmax")
    pool = keras.layers.GlobalAveragePooling2D()
    naive = keras.Model(backbone.inputs, head(pool(top)))
    upper = keras.Model(cut, top)
    inputs = keras.Input(cut.shape[1:])
    cached = keras.Model(inputs, head(pool(upper(inputs))))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.images, spec.input_size, spec.input_size, 3)).astype("float32")
    labels = rng.integers(0, args.classes, args.images)
    for model in (naive, cached):
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False)
    start = time.perf_counter()
    activations = keras.Model(backbone.inputs, cut).predict(images, batch_size=64, verbose=0)
    cache_seconds = time.perf_counter() - start
    naive_epoch = seconds_per_epoch(naive, images, labels, args.measure_epochs)
    cached_epoch = seconds_per_epoch(cached, activations, labels, args.measure_epochs)
    print(f"{args.model} {args.regime}, {args.images} images of {spec.input_size} px, cut at {cut_layer(spec, backbone, args.regime)} "
          f"{tuple(cut.shape[1:])}")
    print(f"naive: whole network every epoch   {naive_epoch:8.2f} s/epoch")
    print(f"cached: top blocks on activations  {cached_epoch:8.2f} s/epoch   (+ {cache_seconds:.2f} s once for the activations)")
    print(f"speed-up per epoch: {naive_epoch / cached_epoch:.1f}x; over {args.epochs} epochs: "
          f"{args.epochs * naive_epoch / (cache_seconds + args.epochs * cached_epoch):.1f}x")


if __name__ == "__main__":
    main()
