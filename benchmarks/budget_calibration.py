"""The memory estimates of ``classify.budget`` against the peak RSS of real fits.

For each case (training rows, width, classifier) it writes a store of Gaussian blobs (10 classes,
float32) through the project's store writer, then, in a fresh process, probes it as `make classify
--jobs 1` does (``Evaluation``, protocol ``given``, the C search in that process) and prints that
process's peak RSS (``ru_maxrss``) beside ``in_memory_peak``'s estimate. With ``--budget`` the
same cases are probed within that budget: candidates over it are streamed, and the peak RSS is
printed beside the budget and ``streaming_peak``'s estimate at the chunk used. With
``--split-workers N`` the C search's splits run in N worker processes (`--jobs N` on a store of
one layer); the peak is then that of the whole process tree, sampled every 50 ms: the sum of the
processes' proportional set sizes (PSS: a page shared by several counts once) plus joblib's
memory-mapped copies in /dev/shm (counted again where a worker maps them: an upper bound).

    .venv/bin/python benchmarks/budget_calibration.py [--cases 6000x8192:logreg,12000x1024:logreg,4000x16384:svm] [--budget 512M]
    .venv/bin/python benchmarks/budget_calibration.py --split-workers 3 [--cases ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = 10
TEST_FRACTION = 0.2
CS = (0.01, 1.0)


def write_store(path: Path, train_rows: int, width: int) -> None:
    from extract.datasets.base import ImageDataset
    from extract.store import StoreWriter

    n = int(round(train_rows / (1 - TEST_FRACTION)))
    y = np.arange(n) % CLASSES
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.3, (CLASSES, width)).astype(np.float32)
    splits = np.where(rng.random(n) < TEST_FRACTION, "test", "train")
    dataset = ImageDataset("blobs", tuple(f"c{i}" for i in range(CLASSES)), tuple(f"x{i}" for i in range(n)), y, tuple(splits), read=None)
    with StoreWriter(path, dataset=dataset, extractor=path.stem, fingerprint={"calibration": 1}, taps=["layer"]) as writer:
        for start in range(0, n, 2048):
            rows = np.arange(start, min(n, start + 2048))
            X = centres[y[rows]] + rng.normal(0, 1, (len(rows), width)).astype(np.float32)
            writer.write_shard(rows, {"layer": X})
        writer.finalize()


class TreeSampler(threading.Thread):
    """The largest memory of this process and its children seen while it runs: PSS summed over the
    tree, plus the size of joblib's memory-mapped files in /dev/shm."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.done.wait(0.05):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:  # a worker that just ended
                    pass
            total += sum(f.stat().st_size for f in Path("/dev/shm").glob("joblib_memmapping_folder_*/**/*") if f.is_file())
            self.peak = max(self.peak, total)


def probe_store(path: Path, classifier: str, budget: int, split_workers: int) -> dict:
    """In this process: probe the store, return the peak RSS, the estimates and what ran."""
    from classify import budget as memory
    from classify.evaluate import Evaluation, ProbeSettings, parse_protocol
    from extract.store import FeatureStore

    with FeatureStore(path) as store:
        train = int(np.sum(store.splits == "train"))
        width = store.dim("layer")
    settings = ProbeSettings((classifier,), Cs=CS, n_jobs=split_workers, memory_budget=budget)
    evaluation = Evaluation(path, parse_protocol("given"), settings)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = TreeSampler()
    if split_workers > 1:
        sampler.start()
    row, = evaluation.run(progress=False)
    sampler.done.set()
    peak = sampler.peak if split_workers > 1 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kind, splits = ("val", 1) if train > 10_000 else ("cv", 3)
    chunk = memory.streaming_chunk_rows(budget, width, classes=CLASSES)
    return {"rows": train, "width": width, "classifier": classifier, "search": row["search"], "selection": row["selection"],
            "rss_before_fit": before, "peak_rss": peak,
            "in_memory_estimate": memory.in_memory_peak(train, width, classes=CLASSES, classifier=classifier, splits=splits,
                                                        held_out_fraction=0.2 if kind == "val" else None,
                                                        split_workers=min(splits, split_workers)),
            "streaming_estimate": memory.streaming_peak(chunk, width, classes=CLASSES), "chunk_rows": chunk, "top1": row["top1"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="6000x8192:logreg,12000x1024:logreg,4000x16384:svm")
    parser.add_argument("--budget", default=None, help="probe within this budget (default: one large enough for every fit)")
    parser.add_argument("--split-workers", type=int, default=1, help="worker processes for the C search's splits (default: 1, none)")
    parser.add_argument("--child", nargs=4, metavar=("STORE", "CLASSIFIER", "BUDGET", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(probe_store(Path(args.child[0]), args.child[1], int(args.child[2]), int(args.child[3]))))
        return 0
    from classify.budget import describe_bytes, parse_bytes

    budget = parse_bytes(args.budget) if args.budget else 2**50
    print(f"# {platform.processor() or platform.machine()}, {platform.python_version()}, budget {describe_bytes(budget)}, "
          f"split workers {args.split_workers}")
    print(f"{'rows':>6} {'width':>6} {'clf':<6} {'search':<7} {'at start':>10} {'peak RSS':>10} {'estimate':>10} {'ratio':>6}  selection")
    with tempfile.TemporaryDirectory() as folder:
        for case in args.cases.split(","):
            size, classifier = case.split(":")
            rows, width = (int(v) for v in size.split("x"))
            path = Path(folder) / f"blobs{rows}x{width}.h5"
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
                            f"from benchmarks.budget_calibration import write_store; from pathlib import Path; "
                            f"write_store(Path({str(path)!r}), {rows}, {width})"], check=True, cwd=ROOT)
            done = subprocess.run([sys.executable, __file__, "--child", str(path), classifier, str(budget), str(args.split_workers)],
                                  check=True, capture_output=True, text=True, cwd=ROOT)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            estimate = result["streaming_estimate"] if result["search"] == "stream" else result["in_memory_estimate"]
            print(f"{result['rows']:>6} {result['width']:>6} {classifier:<6} {result['search']:<7} "
                  f"{describe_bytes(result['rss_before_fit']):>10} {describe_bytes(result['peak_rss']):>10} "
                  f"{describe_bytes(estimate):>10} {estimate / result['peak_rss']:>6.2f}  {result['selection']}"
                  + (f" (chunks of {result['chunk_rows']} rows)" if result["search"] == "stream" else ""))
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
