"""Peak memory of single-process extraction does not grow with the dataset.

For each ``--sizes`` (default 500 and 5,000) a fresh process runs
``python -m extract features`` (``extract.cli.main``, the command a user runs) over that
many 400x300 photo-like JPEGs, with the same backbone and settings, and reports its peak
resident set size (``VmHWM`` of /proc/self/status, and ``ru_maxrss``). Prints each, and the
ratio of the largest run's peak to the smallest's (target: at most 1.2):

    .venv/bin/python benchmarks/extract_memory.py [--sizes 500,5000] [--model efficientnet_lite0] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_extract import write_jpegs  # noqa: E402

# Runs in a fresh process: the extraction command, then its own peak memory as JSON on the last line.
RUNNER = r'''
import json, resource, sys, time
from extract.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
print(json.dumps({"code": code, "seconds": seconds, "vm_hwm_kib": int(status["VmHWM"].split()[0]),
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def peak_memory(folder: Path, features_dir: Path, *, model: str, dtype: str, batch_size: int) -> dict:
    command = [sys.executable, "-c", RUNNER, "features", "--dataset", f"folder:{folder}", "--full", "--model", model,
               "--dtype", dtype, "--batch-size", str(batch_size), "--features-dir", str(features_dir), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"extraction failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,5000", help="images per run, comma-separated")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)

    sizes = [int(n) for n in args.sizes.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="extract-memory-") as tmp:
        tmp = Path(tmp)
        for n in sizes:
            folder = write_jpegs(tmp / f"photos-{n}", n)
            run = {"images": n, **peak_memory(folder, tmp / f"features-{n}", model=args.model, dtype=args.dtype,
                                              batch_size=args.batch_size), "load_average": os.getloadavg()[0]}
            runs.append(run)
            print(f"{n:>7} images: peak RSS {run['vm_hwm_kib'] / 1024:7.1f} MiB (ru_maxrss {run['ru_maxrss_kib'] / 1024:.1f}), "
                  f"{run['seconds']:.1f} s, {n / run['seconds']:.1f} img/s, load {run['load_average']:.1f}", flush=True)
    smallest, largest = min(runs, key=lambda r: r["images"]), max(runs, key=lambda r: r["images"])
    ratio = largest["vm_hwm_kib"] / smallest["vm_hwm_kib"]
    print(f"peak RSS of {largest['images']} images / {smallest['images']} images: {ratio:.3f} (target at most 1.2); "
          f"{args.model}, {args.dtype}, batch {args.batch_size}, {time.strftime('%Y-%m-%d %H:%M')}")
    results = {"model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "runs": runs, "ratio": ratio}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
