"""`make extract` + `make classify` from empty stores at two commits, side by side in one run.

Each commit is checked out into its own temporary git worktree and runs there with this
project's interpreter (the checkout's packages shadow the installed ones), so the two sides
see the same machine, the same data and the same packages. Stages are interleaved (extract
at A, extract at B, classify at A, classify at B), each a fresh process, wall-clock timed,
``--repeats`` times from empty stores; the medians are compared.
Then ``results.csv`` rows are matched on (features, layer, classifier, protocol), and the
largest change of top-1 (points) and the rows whose C changed are printed twice: for the
two commits' features both probed by the ``--after`` code (what the features changed), and
for the two commits as they are (features and probe code).

    .venv/bin/python benchmarks/before_after.py [--before 2227daa] [--after HEAD] [--data folder:../shared/data/flowers17]

The default ``--before`` is the last commit before the speed work of issue #12.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), rev],
                   check=True, capture_output=True, text=True)
    return where


def timed(args: list[str], cwd: Path, log: Path) -> float:
    started = time.perf_counter()
    with open(log, "ab") as out:
        done = subprocess.run([sys.executable, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(cwd), "TF_CPP_MIN_LOG_LEVEL": "2"})
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed in {cwd} (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def rows(results: Path) -> dict[tuple, dict]:
    with open(results, newline="") as handle:
        return {(r["features"], r["layer"], r["classifier"], r["protocol"]): r for r in csv.DictReader(handle)}


def compare(what: str, before: dict, after: dict) -> None:
    common = sorted(set(before) & set(after))
    changes = [(abs(float(after[k]["top1"]) - float(before[k]["top1"])) * 100, k) for k in common]
    worst = max(changes, default=(0.0, None))
    print(f"\n{what}: {len(common)} rows in both; largest top-1 change {worst[0]:.2f} points")
    for key in common:
        b, a = before[key], after[key]
        if b.get("C") != a.get("C") or abs(float(a["top1"]) - float(b["top1"])) > 0.002:
            print(f"  {'/'.join(key)}: top-1 {float(b['top1']):.4f} -> {float(a['top1']):.4f}, C {b.get('C')} -> {a.get('C')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="2227daa")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs from empty stores; medians are compared")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flowers17"), help="a dataset spec or a folder")
    args = parser.parse_args()
    data = args.data if ":" in args.data or args.data in ("fashion-mnist",) else f"folder:{Path(args.data).resolve()}"
    with tempfile.TemporaryDirectory(prefix="offshelf-before-after-") as tmp:
        tmp = Path(tmp)
        sides = {name: checkout(rev, tmp / name) for name, rev in (("before", args.before), ("after", args.after))}
        try:
            seconds = {name: {"extract": [], "classify": []} for name in sides}
            for repeat in range(args.repeats):
                for cwd in sides.values():  # from empty stores, every time
                    for folder in ("features", "results"):
                        shutil.rmtree(cwd / folder, ignore_errors=True)
                for stage, command in (("extract", ["-m", "extract", "features", "--dataset", data, "--no-progress"]),
                                       ("classify", ["-m", "classify", "probe", "--dataset", data, "--no-progress"])):
                    for name, cwd in sides.items():
                        seconds[name][stage].append(timed(command, cwd, tmp / f"{name}.log"))
                        print(f"repeat {repeat + 1}: {name:6s} {stage:8s} {seconds[name][stage][-1]:7.1f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
            median = {name: {stage: statistics.median(t) for stage, t in s.items()} for name, s in seconds.items()}
            total = {name: sum(s.values()) for name, s in median.items()}
            print(f"\nmedians of {args.repeats}: extract + classify before {total['before']:.1f} s, after {total['after']:.1f} s, "
                  f"after/before = {total['after'] / total['before']:.2f} "
                  f"(extract {median['before']['extract']:.1f} -> {median['after']['extract']:.1f} s = "
                  f"{median['after']['extract'] / median['before']['extract']:.2f}, classify {median['before']['classify']:.1f} -> "
                  f"{median['after']['classify']:.1f} s = {median['after']['classify'] / median['before']['classify']:.2f})")
            name = Path(data.split(":", 1)[-1]).name if data.startswith("folder:") else data
            # the features of each side, probed by today's classify (so only the features differ)
            rechecked = tmp / "before-features-after-probes"
            timed(["-m", "classify", "probe", "--dataset", data, "--no-progress", "--features-dir", str(sides["before"] / "features"),
                   "--results-dir", str(rechecked)], sides["after"], tmp / "after.log")
            after = rows(sides["after"] / "results" / name / "results.csv")
            compare("features before vs after, both probed by the after code", rows(rechecked / name / "results.csv"), after)
            compare("everything before vs after (features and probe code)", rows(sides["before"] / "results" / name / "results.csv"), after)
        finally:
            for cwd in sides.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(cwd)], capture_output=True)


if __name__ == "__main__":
    main()
