"""Milliseconds per image of each hand-crafted baseline, end to end (files -> store), side by side.

    .venv/bin/python benchmarks/baseline_speed.py [--dataset folder:../shared/data/hymenoptera] [--limit 200]

Without --dataset it writes photo-sized JPEGs (500 x 375) to a temporary folder.
Codebook learning is timed separately from encoding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.__main__ import BASELINES, build  # noqa: E402
from benchmarks.extract_throughput import write_jpegs  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.pipeline import extract_to_store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--baselines", default=",".join(BASELINES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = args.dataset or f"folder:{write_jpegs(Path(tmp) / 'photos', args.limit)}"
        dataset = load_dataset(spec, limit=args.limit)
        print(f"{len(dataset)} images of {dataset.name}")
        print(f"{'baseline':<14} {'codebook s':>10} {'ms / image':>11} {'dims':>30}")
        for name in args.baselines.split(","):
            featurizer = build(name, dataset)
            codebook_s = 0.0
            if hasattr(featurizer, "fit_dataset"):
                start = time.perf_counter()
                featurizer.fit_dataset(dataset, Path(tmp) / f"{name}.codebook.npz")
                codebook_s = time.perf_counter() - start
            start = time.perf_counter()
            path = extract_to_store(dataset, featurizer, Path(tmp) / f"{name}.h5", progress=False)
            per_image = 1000 * (time.perf_counter() - start) / len(dataset)
            from extract.store import FeatureStore

            with FeatureStore(path) as store:
                dims = ", ".join(f"{t}={store.dim(t)}" for t in store.taps)
            print(f"{name:<14} {codebook_s:>10.1f} {per_image:>11.1f} {dims:>30}")


if __name__ == "__main__":
    main()
