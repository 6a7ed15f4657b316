"""The cost of views at extraction (``--views``), side by side in one run.

For each views setting (default: centre, flip, crops5, crops10) it prints, with the ratio to
``centre`` beside each:
  (a) the model alone: images/s of the featurizer's forward pass on random uint8 inputs, every
      view of a batch of ``--batch-size`` images in one pass, features averaged per image,
  (b) decode + views: images/s of decoding the dataset's files (once per image) and preparing
      its views, in the decoding threads, no model,
  (c) the whole process: ``python -m extract features --views V`` from an empty store, start-up
      and exit included, and its peak resident memory.
With decode shared, (a) and (c) should slow down about linearly in the number of views and (b)
hardly at all. The timings of (a) are medians of ``--repeats`` repetitions interleaved across
the settings, so the machine's load hits every setting alike.

    .venv/bin/python benchmarks/views.py --data folder:../shared/data/flowers17 [--keep DIR]

``--keep DIR`` keeps the stores of (c) in ``DIR/<dataset>/`` for ``python -m classify probe
--features-dir DIR`` (the gain of each setting).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.extract_throughput import median_time, timed_process  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.extractor import CNNFeaturizer  # noqa: E402
from extract.images import VIEWS  # noqa: E402
from extract.pipeline import ImageMapper, store_path  # noqa: E402


def decode_and_views(dataset, featurizer) -> float:
    """Seconds to decode every image of ``dataset`` and prepare its views, in the decoding threads."""
    start = time.perf_counter()
    with ImageMapper(dataset, featurizer.prepare, min_side=featurizer.min_side) as mapper:
        for future in [mapper.submit(row) for row in range(len(dataset))]:
            future.result()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{ROOT.parent / 'shared' / 'data' / 'flowers17'}", help="folder:PATH of photos")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--views", default=",".join(VIEWS), help="comma-separated views settings; the first is the reference")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (the forward pass holds all their views)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions of (a); medians are reported")
    parser.add_argument("--keep", default=None, help="keep the whole-process stores in this features folder")
    args = parser.parse_args()

    settings = args.views.split(",")
    dataset = load_dataset(args.data)
    featurizers = {v: CNNFeaturizer(args.model, batch_size=args.batch_size, views=v) for v in settings}
    rng = np.random.default_rng(0)
    start_load = os.getloadavg()[0]
    print(f"{args.model}, {len(dataset)} images of {args.data}, batch {args.batch_size} images; load average {start_load:.1f} at the start")

    batches = {}
    for views, featurizer in featurizers.items():
        size, count = featurizer.input_size, featurizer.view_count
        shape = (args.batch_size, size, size, 3) if count == 1 else (args.batch_size, count, size, size, 3)
        batches[views] = rng.integers(0, 256, shape, dtype=np.uint8)
        featurizer(batches[views])  # warm-up: the graph is traced once per setting
    model_times: dict[str, list[float]] = {v: [] for v in settings}
    for _ in range(args.repeats):
        for views, featurizer in featurizers.items():
            model_times[views].append(median_time(lambda: featurizer(batches[views]), 1))
    model_rate = {v: args.batch_size / float(np.median(t)) for v, t in model_times.items()}
    decode_rate = {v: len(dataset) / decode_and_views(dataset, f) for v, f in featurizers.items()}

    process, memory = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for views in settings:
            features_dir = Path(tmp) / views
            process[views], memory[views] = timed_process(args.data, features_dir, args.model, "imagenet", "--views", views,
                                                          "--batch-size", str(args.batch_size))
            if args.keep:
                store = store_path(features_dir, dataset, featurizers[views])
                kept = store_path(args.keep, dataset, featurizers[views])
                kept.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(store, kept)

    first = settings[0]
    print(f"{'views':<8} {'count':>5} {'(a) model img/s':>15} {'ratio':>6} {'(b) decode+views img/s':>22} {'ratio':>6} "
          f"{'(c) process s':>13} {'img/s':>6} {'ratio':>6} {'peak MiB':>8}")
    for views in settings:
        count = featurizers[views].view_count
        print(f"{views:<8} {count:>5} {model_rate[views]:>15.1f} {model_rate[first] / model_rate[views]:>5.2f}x "
              f"{decode_rate[views]:>22.1f} {decode_rate[first] / decode_rate[views]:>5.2f}x {process[views]:>13.1f} "
              f"{len(dataset) / process[views]:>6.1f} {process[views] / process[first]:>5.2f}x {memory[views]:>8.0f}")
    print(f"ratio: time per image over {first}'s (1.00x = free; the number of views = linear). "
          f"Load average {start_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
          + (f"; stores kept in {Path(args.keep) / dataset.name}" if args.keep else ""))


if __name__ == "__main__":
    main()
