"""What a streamed probe costs: wall and CPU seconds, passes and peak RSS of ``StreamingSGDProbe.fit_store``.

It writes a store of Gaussian blobs (``budget_calibration.write_store``: 10 classes, float32,
gzip-compressed as extraction writes them) of ``--rows`` training rows of ``--width`` values, then
fits the streaming probe of ``make classify`` on it in a fresh process for each ``--keep`` (the
share of Cs kept after each epoch: 0.5 is successive halving, 1 trains every C every epoch), with
chunks sized for ``--budget``; ``--code DIR`` fits with another checkout's code instead (e.g. one of
the commit before, for the time before). Prints, per fit, the wall and CPU seconds, the passes over
the training rows, the peak RSS of the fit, the chosen C and the test top-1, and the CPU seconds
scaled to ``--target`` rows x width, on the assumption that a pass costs in proportion to the
values it reads and SGD to the values it sees (both linear in rows x width).

    .venv/bin/python benchmarks/stream_cost.py [--rows 16000] [--width 8000] [--budget 1G] [--keep 1,0.5] [--code /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.budget_calibration import write_store  # noqa: E402

# Runs in a fresh process with the code of argv[1]: one streamed fit, its costs as JSON on the last line.
RUNNER = r'''
import inspect, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from classify.budget import streaming_chunk_rows
from classify.probe import DEFAULT_CS, StreamingSGDProbe
from extract.store import FeatureStore

path, budget, keep = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
with FeatureStore(path) as store:
    train, test = np.flatnonzero(store.splits == "train"), np.flatnonzero(store.splits == "test")
    sizing = inspect.signature(streaming_chunk_rows).parameters
    extra = {"candidates": len(DEFAULT_CS)} if "candidates" in sizing else {}
    chunk = streaming_chunk_rows(budget, store.dim("layer"), classes=10, **extra)
    settings = {"keep": keep} if "keep" in inspect.signature(StreamingSGDProbe).parameters else {}
    start, cpu = time.perf_counter(), time.process_time()
    probe = StreamingSGDProbe(chunk_rows=chunk, **settings).fit_store(store, "layer", train, store.labels)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    top1 = float(np.mean(probe.predict(store.features("layer", test)) == store.labels[test]))
print(json.dumps({"keep": keep if settings else None, "train_rows": len(train), "wall_s": wall, "cpu_s": cpu, "fit_peak_rss_mib": peak, "chunk_rows": chunk,
                  "C": probe.best_C_, "top1": top1, "passes": getattr(probe, "passes_", None), "selection": probe.selection_,
                  "weights_abs_sum": float(np.abs(probe.pipeline_["classify"].coef_).sum())}))
'''


def main(argv=None) -> list[dict]:
    from classify.budget import parse_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16_000, help="training rows (a quarter as many test rows besides)")
    parser.add_argument("--width", type=int, default=8_000)
    parser.add_argument("--budget", default="1G", help="the memory budget the chunks are sized for")
    parser.add_argument("--keep", default="1,0.5", help="shares of Cs kept after each epoch, comma-separated")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose classify/ fits (default: this one)")
    parser.add_argument("--target", default="60000x40960", help="rows x width to scale the CPU seconds to")
    parser.add_argument("--store", type=Path, default=None, help="reuse (or keep) the store here instead of a temporary one")
    args = parser.parse_args(argv)
    target_rows, target_width = (int(v) for v in args.target.split("x"))
    with tempfile.TemporaryDirectory(prefix="stream-cost-") as scratch:
        path = args.store or Path(scratch) / "blobs.h5"
        if not path.exists():
            write_store(path, args.rows, args.width)
        results = []
        for keep in args.keep.split(","):
            done = subprocess.run([sys.executable, "-c", RUNNER, str(args.code.resolve()), str(path), str(parse_bytes(args.budget)), keep],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the fit failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["cpu_s_at_target"] = result["cpu_s"] * (target_rows * target_width) / (result["train_rows"] * args.width)
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


if __name__ == "__main__":
    main()
