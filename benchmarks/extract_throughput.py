"""Extraction throughput, measured side by side in one run.

For each backbone it prints images/s of
  (a) the model alone on random uint8 tensors (our compiled call),
  (b) ``model.predict`` on the same tensors (the naive Keras call),
  (c) the whole path: JPEG files -> decode -> resize -> model -> HDF5 store,
and the ratio (c)/(a): the share of model throughput the pipeline keeps.

    .venv/bin/python benchmarks/extract_throughput.py [--images 256] [--models efficientnet_lite0,...]

By default every registered backbone runs. Throughput does not depend on the weights'
values, so backbones whose ImageNet weights are not offline (keras.applications) run with
random weights; the ``weights`` column says which.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract.backbones import get_backbone, list_backbones  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.extractor import CNNFeaturizer  # noqa: E402
from extract.pipeline import extract_to_store  # noqa: E402


def write_jpegs(root: Path, count: int, size=(500, 375), seed=0) -> Path:
    """Photo-sized JPEGs (the size of a typical ImageNet / hymenoptera image), two classes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / ("train" if i % 4 else "test") / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.roll(base, i, axis=1)).resize(size, Image.Resampling.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: tracing and compilation are not throughput
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated backbones (default: all registered)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    models = args.models.split(",") if args.models else list_backbones()
    print(f"{'backbone':<20} {'weights':>8} {'(a) model img/s':>16} {'(b) predict img/s':>18} {'(c) files->store img/s':>23} {'(c)/(a)':>8} {'(a)/(b)':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tree = write_jpegs(Path(tmp) / "photos", args.images)
        dataset = load_dataset(f"folder:{tree}")
        for name in models:
            spec = get_backbone(name)
            weights = "imagenet" if spec.offline_weights else "random"
            featurizer = CNNFeaturizer(name, weights=weights, batch_size=args.batch_size)
            size = featurizer.input_size
            batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)
            repeats = max(2, args.images // args.batch_size)
            model_rate = args.batch_size / timed(lambda: featurizer(batch), repeats)
            floats = batch.astype(np.float32)
            predict_rate = args.batch_size / timed(lambda: featurizer.model.predict(floats, batch_size=args.batch_size, verbose=0), repeats)
            featurizer(batch)  # the pipeline below starts warm, like the model timing
            start = time.perf_counter()
            extract_to_store(dataset, featurizer, Path(tmp) / f"{name}.h5", progress=False)
            pipeline_rate = len(dataset) / (time.perf_counter() - start)
            print(f"{name:<20} {weights:>8} {model_rate:>16.1f} {predict_rate:>18.1f} {pipeline_rate:>23.1f} {pipeline_rate / model_rate:>8.2f} {model_rate / predict_rate:>8.2f}")


if __name__ == "__main__":
    main()
