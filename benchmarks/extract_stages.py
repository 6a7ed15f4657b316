"""Where the time of ``python -m extract features`` goes, stage by stage, in one process.

Wall-clock stamps for the imports (TensorFlow/Keras alone too), building the model and
reading its weights, the first batch (graph tracing), the model on every later batch,
store writes and assembly, and the CPU time spent decoding and resizing in the decode
threads (which overlap the model):

    .venv/bin/python benchmarks/extract_stages.py --data folder:../shared/data/flowers17 [--model efficientnet_lite0] [--no-fold]

Run it from a checkout's root to time that checkout's code.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extract import store  # noqa: E402
from extract.datasets import load_dataset  # noqa: E402
from extract.pipeline import extract_to_store, store_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset, e.g. folder:PATH")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--no-fold", action="store_true", help="the unfolded model (real BatchNorm layers)")
    args = parser.parse_args()
    light = time.perf_counter()
    import keras  # noqa: F401  (TensorFlow too)

    heavy = time.perf_counter()
    from extract.extractor import CNNFeaturizer

    kwargs = {"fold_batchnorm": False} if args.no_fold else {}
    featurizer = CNNFeaturizer(args.model, **kwargs)
    built = time.perf_counter()
    seconds = {"decode": 0.0, "resize": 0.0, "first batch": 0.0, "model": 0.0, "write": 0.0, "finalize": 0.0}

    def timed(key, fn, clock=time.perf_counter):
        """``fn``, adding the ``clock`` seconds of each call to ``seconds[key]``."""
        def run(*a, **k):
            start = clock()
            try:
                return fn(*a, **k)
            finally:
                seconds[key] += clock() - start
        return run

    dataset = load_dataset(args.data)
    dataset = dataclasses.replace(dataset, read=timed("decode", dataset.read, time.thread_time))
    featurizer.prepare = timed("resize", featurizer.prepare, time.thread_time)
    forward, calls = featurizer.__class__.__call__, [0]

    class Timed:  # the featurizer, with its batches timed (the first one traces the graph)
        def __getattr__(self, name):
            return getattr(featurizer, name)

        def __call__(self, batch):
            start = time.perf_counter()
            result = forward(featurizer, batch)
            seconds["first batch" if calls[0] == 0 else "model"] += time.perf_counter() - start
            calls[0] += 1
            return result

    store.StoreWriter.write_shard = timed("write", store.StoreWriter.write_shard)
    store.StoreWriter.finalize = timed("finalize", store.StoreWriter.finalize)
    with tempfile.TemporaryDirectory() as tmp:
        begin = time.perf_counter()
        extract_to_store(dataset, Timed(), store_path(tmp, dataset, featurizer), progress=False)
        end = time.perf_counter()
    n = len(dataset)
    print(f"{args.model}{' (unfolded)' if args.no_fold else ''}, {n} images of {args.data}; load {os.getloadavg()[0]:.1f}")
    print(f"  imports            {heavy - START:6.1f} s (TensorFlow + Keras {heavy - light:.1f})")
    print(f"  model + weights    {built - heavy:6.1f} s")
    print(f"  first batch        {seconds['first batch']:6.1f} s (graph tracing)")
    print(f"  model, later       {seconds['model']:6.1f} s ({(n - featurizer.batch_size) / max(seconds['model'], 1e-9):.0f} img/s)")
    print(f"  store writes       {seconds['write'] + seconds['finalize']:6.1f} s")
    print(f"  pipeline in all    {end - begin:6.1f} s; whole {end - START:.1f} s after the interpreter started")
    print(f"  decode threads     {1000 * seconds['decode'] / n:.1f} ms/img decode + {1000 * seconds['resize'] / n:.1f} ms/img resize, CPU "
          f"({seconds['decode'] + seconds['resize']:.1f} s in all, overlapping the model)")


if __name__ == "__main__":
    main()
