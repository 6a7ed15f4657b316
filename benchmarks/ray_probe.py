"""``python -m classify probe`` here vs on Ray workers, on the same stores: wall time, and the rows equal.

    .venv/bin/python benchmarks/ray_probe.py --features-dir DIR [--dataset fashion-mnist] [--rounds 3] [--workers 2] [-- PROBE OPTIONS]

Runs the command alternately without and with ``--workers`` (a local Ray cluster of this machine's
CPUs, started by each run: its start is in the time), each into a fresh results folder under a
temporary one, and prints each run's wall time and the load before it. A run whose process was
seen stopped (SIGSTOP, as another benchmark on a shared machine pauses others) is marked PAUSED:
its time is not the command's. Then it compares every run's results.csv with the first's, column
by column, and their prediction files byte for byte: only ``fit_seconds`` and ``created`` may differ.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.datasets import dataset_slug  # noqa: E402


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
    except OSError:
        return False


def timed(command: list[str], log: Path) -> tuple[float, bool, int]:
    """Wall seconds, whether the process was seen stopped, and its exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start, paused = time.monotonic(), False
    with log.open("w") as out:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        while child.poll() is None:
            paused |= stopped(child.pid)
            time.sleep(0.1)
    return time.monotonic() - start, paused, child.returncode


def differences(got: Path, want: Path) -> tuple[list[str], list[str]]:
    """Columns of results.csv that differ, and prediction files that differ or are missing."""
    a, b = pd.read_csv(got / "results.csv"), pd.read_csv(want / "results.csv")
    columns = [c for c in b.columns if c not in a.columns or not a[c].equals(b[c])]
    files = sorted(p.relative_to(want) for p in (want / "predictions").rglob("*.csv"))
    return columns, [str(f) for f in files if not (got / f).is_file() or not filecmp.cmp(got / f, want / f, shallow=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features-dir", required=True)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("probe_options", nargs="*", help="more options of `python -m classify probe`, after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-probe-") as tmp:
        runs = []
        for round_ in range(1, args.rounds + 1):
            for mode, extra in (("here", []), (f"workers={args.workers}", ["--workers", str(args.workers)])):
                out = Path(tmp) / f"{mode}-{round_}"
                load = Path("/proc/loadavg").read_text().split()[0]
                command = [sys.executable, "-m", "classify", "probe", "--dataset", args.dataset, "--features-dir", args.features_dir,
                           "--results-dir", str(out), "--no-progress", *args.probe_options, *extra]
                wall, paused, status = timed(command, Path(f"{out}.log"))
                if status:
                    sys.exit(f"{' '.join(command)} failed ({status}):\n{Path(f'{out}.log').read_text()[-3000:]}")
                print(f"{mode:>10} round {round_}: {wall:6.1f} s (load before {load}){'  PAUSED' if paused else ''}", flush=True)
                runs.append(out / dataset_slug(args.dataset))
        for run in runs[1:]:
            columns, files = differences(run, runs[0])
            print(f"{run.parent.name} vs {runs[0].parent.name}: columns differing {columns}; prediction files differing {files or 'none'}")


if __name__ == "__main__":
    main()
