"""Baselines end to end (files -> stores): ms per image of each alone, then the speed-up from
computing descriptors once for every encoder, and the speed-up from worker processes.

    .venv/bin/python benchmarks/baseline_speed.py [--dataset folder:../shared/data/flowers17] [--limit 100] [--preset paper]

Without --dataset it writes photo-sized JPEGs (500 x 375) to a temporary folder. Codebooks
are learned once, first (timed on their own), and every run below reuses them, so the
three runs of the local-descriptor baselines differ only in how the work is shared out:

1. each store alone, in threads (offshelf 0.1: every encoder describes every image again);
2. one pass, descriptors computed once per image and fed to every encoder, in threads;
3. the same pass in spawned worker processes, one per core (the CLI's default).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.__main__ import BASELINES, build, codebook_path  # noqa: E402
from baselines.local import SharedDescriptors, fit_codebooks  # noqa: E402
from benchmarks.extract_throughput import write_jpegs  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.parallel import host_cores, process_pool  # noqa: E402
from extract.pipeline import extract_group, extract_to_store, store_path  # noqa: E402
from extract.store import FeatureStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--baselines", default=",".join(BASELINES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = args.dataset or f"folder:{write_jpegs(tmp / 'photos', args.limit)}"
        dataset = load_dataset(spec, limit=args.limit)
        names = args.baselines.split(",")
        featurizers = {name: build(name, dataset, preset=args.preset) for name in names}
        local = [n for n in names if hasattr(featurizers[n], "spec")]
        start = time.perf_counter()
        fit_codebooks(dataset, [featurizers[n] for n in local], [codebook_path(store_path(tmp / "cb", dataset, featurizers[n])) for n in local])
        print(f"{len(dataset)} images of {dataset.name}, preset {args.preset}, {host_cores()} cores; "
              f"codebooks of {', '.join(local)} learned in {time.perf_counter() - start:.1f} s (one shared description pass)")
        print(f"{'baseline':<12} {'ms / image':>11}  dims")
        alone = {}
        for name in names:
            featurizer = featurizers[name]
            start = time.perf_counter()
            path = extract_to_store(dataset, featurizer, store_path(tmp / "alone", dataset, featurizer), progress=False)
            alone[name] = time.perf_counter() - start
            with FeatureStore(path) as store:
                dims = ", ".join(f"{t}={store.dim(t)}" for t in store.taps)
            print(f"{name:<12} {1000 * alone[name] / len(dataset):>11.1f}  {dims}")
        if len(local) < 2:
            return
        group = [featurizers[n] for n in local]
        start = time.perf_counter()
        extract_group(dataset, group, [store_path(tmp / "shared", dataset, f) for f in group], prepare=SharedDescriptors(group), progress=False)
        shared = time.perf_counter() - start
        start = time.perf_counter()
        with process_pool(host_cores()) as pool:
            extract_group(dataset, group, [store_path(tmp / "procs", dataset, f) for f in group], prepare=SharedDescriptors(group), pool=pool, progress=False)
        procs = time.perf_counter() - start
        each = sum(alone[n] for n in local)
        print(f"\n{' + '.join(local)}:")
        print(f"  each alone, threads            {each:7.1f} s")
        print(f"  descriptors once, threads      {shared:7.1f} s   speed-up from computing descriptors once: {each / shared:.2f}x")
        print(f"  descriptors once, {host_cores()} processes {procs:7.1f} s   speed-up from processes: {shared / procs:.2f}x "
              f"(pool start-up included); together {each / procs:.2f}x")


if __name__ == "__main__":
    main()
