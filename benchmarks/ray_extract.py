"""One process vs Ray workers on the same images, and how fast the single writer writes.

    .venv/bin/python benchmarks/ray_extract.py [--images 1000] [--workers 2] [--data folder:PATH] [--layers all]

On the first ``--images`` images of ``--data`` (default: ../shared/data/flowers17 when
present, else photo-sized JPEGs written into a temporary folder), it extracts EfficientNet-Lite0
features (``--layers``, default all taps) into an empty store in this process, then with
``--workers`` Ray workers on a local Ray cluster of this machine's CPUs, and prints the two
rates side by side with their ratio, and the largest feature difference. Each rate is
images / (making the featurizer + extraction + publication), both started as a second run of the
command starts: the LiteRT model converted before, so neither the driver nor a worker imports
TensorFlow (``extract.cached``); the Ray cluster's own start is printed apart (a long-running
cluster pays it once). Then it times the driver's writing alone:
``StoreWriter.write_shard`` of Lite0-sized rows (MB/s of float32 features, fsync included) and
the assembly into the HDF5 store, and says how many workers one writer can serve at the
measured rate per worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from extract.datasets import load_dataset  # noqa: E402
from extract.parallel import host_cores  # noqa: E402
from extract.pipeline import extract_to_store  # noqa: E402
from extract.store import FeatureStore, StoreWriter  # noqa: E402


def dataset_of(spec: str | None, images: int, scratch: Path):
    if spec is None:
        flowers = ROOT.parent / "shared" / "data" / "flowers17"
        if flowers.is_dir():
            spec = f"folder:{flowers}"
        else:
            from benchmarks.kill_campaign import write_photos

            spec = f"folder:{write_photos(scratch / 'photos', images, 0)}"
    dataset = load_dataset(spec)
    return dataset.subset(np.arange(min(images, len(dataset))), benchmark_images=images), spec


def timed_extract(dataset, path: Path, layers, **options) -> tuple[float, Path]:
    from extract.cached import cnn_featurizer

    started = time.perf_counter()
    featurizer = cnn_featurizer("efficientnet_lite0", layers=layers)  # as `python -m extract features` makes it
    store = extract_to_store(dataset, featurizer, path, progress=False, **options)
    return time.perf_counter() - started, store


def cnn_featurizer_warmed(layers) -> str:
    """Convert (or find) the LiteRT model of the featurizer both runs use, in a child process; its class name there."""
    code = ("import sys, numpy as np; from extract.cached import cnn_featurizer; f = cnn_featurizer('efficientnet_lite0', layers=sys.argv[1] or None); "
            "f(np.zeros((1, f.input_size, f.input_size, 3), np.uint8)); print(type(f).__name__)")
    return subprocess.run([sys.executable, "-c", code, layers or ""], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()[-1]


def write_rate(dims: dict[str, int], rows: int, folder: Path) -> tuple[float, float, float]:
    """(MB/s of shards, MB/s of the assembly, bytes per image) for ``rows`` rows of these layers."""
    from extract.datasets.base import ImageDataset

    n = rows
    dataset = ImageDataset(name="write-rate", classes=("a",), paths=tuple(f"{i}.jpg" for i in range(n)), labels=np.zeros(n, np.int64),
                           splits=("train",) * n, read=lambda i, min_side=None: None)
    rng = np.random.default_rng(0)
    batch = 32
    features = {name: rng.random((batch, d), dtype=np.float32) for name, d in dims.items()}
    per_image = 4 * sum(dims.values())
    with StoreWriter(folder / "w.h5", dataset=dataset, extractor="rate", fingerprint={"benchmark": 1}, taps=list(dims), overwrite=True) as writer:
        started = time.perf_counter()
        for start in range(0, n, batch):  # one shard per batch: the slowest way the driver writes (CHECKPOINT_SECONDS=0)
            rows_ = np.arange(start, min(start + batch, n))
            writer.write_shard(rows_, {k: v[: len(rows_)] for k, v in features.items()})
        shards = time.perf_counter() - started
        started = time.perf_counter()
        writer.finalize()
        assembly = time.perf_counter() - started
    return n * per_image / shards / 1e6, n * per_image / assembly / 1e6, per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default=None, help="folder:PATH or any DATASET (default: ../shared/data/flowers17, else generated photos)")
    parser.add_argument("--layers", default=None, help="taps (default: all)")
    parser.add_argument("--write-rows", type=int, default=4000, help="rows for the write-rate measurement")
    args = parser.parse_args()
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="ray-extract-") as scratch:
        scratch = Path(scratch)
        dataset, spec = dataset_of(args.data, args.images, scratch)
        print(f"{len(dataset)} images of {spec}, EfficientNet-Lite0, layers {args.layers or 'all'}; {host_cores()} CPUs")
        # Both runs start as a second run of the command does: from the cached LiteRT model, without TensorFlow.
        warm = cnn_featurizer_warmed(args.layers)
        local_seconds, local = timed_extract(dataset, scratch / "local" / "lite0.h5", args.layers)
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=host_cores(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        cluster_seconds = time.perf_counter() - started
        try:
            ray_seconds, distributed = timed_extract(dataset, scratch / "ray" / "lite0.h5", args.layers, workers=args.workers)
        finally:
            ray.shutdown()
        with FeatureStore(local) as a, FeatureStore(distributed) as b:
            assert list(a.paths) == list(b.paths)
            difference = max(float(np.abs(a.features(t) - b.features(t)).max()) for t in a.taps)
            dims = {t: a.dim(t) for t in a.taps}
        n = len(dataset)
        local_rate, ray_rate = n / local_seconds, n / ray_seconds
        print(f"{'':<28}{'one process':>14}{f'Ray, {args.workers} workers':>20}")
        print(f"{'seconds':<28}{local_seconds:>14.1f}{ray_seconds:>20.1f}")
        print(f"{'images/s':<28}{local_rate:>14.1f}{ray_rate:>20.1f}")
        print(f"ratio Ray / one process: {ray_rate / local_rate:.2f}x (Ray cluster start, apart: {cluster_seconds:.1f} s; "
              f"LiteRT model cached before both runs, warm-up made a {warm}); "
              f"largest feature difference {difference:.2e}")
        shard_rate, assembly_rate, per_image = write_rate(dims, args.write_rows, scratch)
        shutil.rmtree(scratch / "local", ignore_errors=True)
        per_worker = ray_rate / args.workers
        print(f"store writing: {per_image / 1e3:.1f} kB of features per image ({sum(dims.values())} values, {len(dims)} layers); "
              f"shards {shard_rate:.0f} MB/s = {shard_rate * 1e6 / per_image:,.0f} images/s, assembly {assembly_rate:.0f} MB/s = "
              f"{assembly_rate * 1e6 / per_image:,.0f} images/s")
        print(f"one writer serves about {shard_rate * 1e6 / per_image / per_worker:,.0f} workers of {per_worker:.1f} images/s each "
              "(shards; the assembly runs once, after the workers)")
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
