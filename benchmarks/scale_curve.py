"""How each stage of `make benchmark` grows with the number of Fashion-MNIST images.

For each of ``--sizes`` (images; default 2000,10000,30000,70000) it runs the stages of the
Makefile's ``benchmark`` target in its order (extract, baselines, classify, tsne, report), with
the commands and defaults of the Makefile, on the seeded class-balanced subset of that many
images (``--limit`` of two thirds of them: that many training images and half as many test
images; 70000, all of them, is ``--full``), each size in its own features/results/reports folders
under ``--out``, each stage in a fresh process. Per stage it records the wall time, the CPU time
(user + system) and the peak resident set size of the stage's process (``os.wait4``: its largest
process, workers it waited for included, not their sum; this process is their subreaper, so
workers left behind are reaped and counted too), the seconds the stage's process spent stopped
(SIGSTOP, as when the machine is shared with benchmarks that pause other jobs: sampled every
0.2 s, and the gaps when this process was stopped as well; left out of the fit), and the bytes the stage added under the size's folder (for extract
and baselines: its stores). Rows go to ``--out``/scale_curve.csv as each
stage ends; a (size, stage) with a row that succeeded is not run again, so a run can be resumed
and a large size run later on its own (``--sizes 70000``): the table, the fit and the plot always
cover every row in the CSV. Then it fits, per stage, the exponent k of wall time (less the time
stopped) ~ images^k and that of CPU time (least squares on log-log over the sizes done), flags
any above 1.2 (worse than linear), and writes
scale_curve.md (the table and the exponents) and scale_curve.png (log-log).

    .venv/bin/python benchmarks/scale_curve.py [--sizes 2000,10000,30000,70000] [--out /tmp/scale-curve] [--memory-budget 8G]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATASET = "fashion-mnist"
FULL_SIZE = 70_000  # every image: 60,000 training and 10,000 test
MODEL, SEED, RECIPE = "efficientnet_lite0", "0", "plain"
BASELINES, BASELINES_PRESET = "hog,surf_bow,sift_bow,vlad,fisher,color,raw", "paper"
STAGES = ("extract", "baselines", "classify", "tsne", "report")
STEEP = 1.2  # an exponent above this grows worse than linearly: flagged
COLUMNS = ["size", "stage", "images", "wall_s", "paused_s", "cpu_s", "peak_rss_mib", "disk_mib", "returncode", "finished"]
NUMBERS = ("wall_s", "paused_s", "cpu_s", "peak_rss_mib", "disk_mib")
POLL_S = 0.2
PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphaned descendants are reparented to this process


def subset_arguments(size: int) -> list[str]:
    """``--limit``/``--full`` for ``size`` images: a limit of N takes N training and N // 2 test images."""
    return ["--full"] if size >= FULL_SIZE else ["--limit", str(size * 2 // 3)]


def stage_command(stage: str, size: int, folder: Path, memory_budget: str | None) -> list[str]:
    """The Makefile's command for ``stage`` (its defaults), on ``size`` images, in ``folder``."""
    dirs = ["--features-dir", str(folder / "features")]
    results = ["--results-dir", str(folder / "results"), "--reports-dir", str(folder / "reports")]
    data = ["--dataset", DATASET, *dirs, "--seed", SEED, *subset_arguments(size)]
    python = [sys.executable, "-m"]
    if stage == "extract":
        return [*python, "extract", "features", *data, "--model", MODEL]
    if stage == "baselines":
        return [*python, "baselines", *data, "--baselines", BASELINES, "--preset", BASELINES_PRESET]
    if stage == "classify":
        budget = ["--memory-budget", memory_budget] if memory_budget else []
        return [*python, "classify", "probe", "--dataset", DATASET, *dirs, *results, "--recipe", RECIPE, "--seed", SEED, *budget]
    if stage == "tsne":
        return [*python, "classify", "tsne", "--dataset", DATASET, *dirs, *results, "--seed", SEED, "--model", MODEL]
    if stage == "report":
        return [*python, "classify", "report", "--dataset", DATASET, *dirs, *results]
    raise ValueError(f"stage {stage!r} is not one of {STAGES}")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0


def store_images(folder: Path) -> int:
    """Images in the size's CNN store (the extract stage's), or 0 before it exists."""
    from extract.store import FeatureStore

    path = folder / "features" / DATASET / f"{MODEL}.h5"
    if not path.exists():
        return 0
    with FeatureStore(path) as store:
        return len(store)


def become_subreaper() -> None:
    """Workers a stage leaves behind become this process's children, to be reaped and counted."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def run_stage(command: list[str], log: Path) -> dict:
    """Run ``command`` in a fresh process (output to ``log``); its wall, stopped and CPU seconds and peak RSS."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        start, paused = time.perf_counter(), 0.0
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        polled = time.perf_counter()
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # this child's own usage, with the children it waited for
            if pid:
                break
            time.sleep(POLL_S)
            now = time.perf_counter()
            gap, polled = now - polled, now
            # the child stopped, or this process too (a sleep of 0.2 s that took over a second)
            paused += gap - POLL_S if gap > 5 * POLL_S else POLL_S if stopped(process.pid) else 0.0
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    cpu, peak = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    for left in reap_left_behind():
        cpu, peak = cpu + left.ru_utime + left.ru_stime, max(peak, left.ru_maxrss)
    return {"wall_s": round(wall, 2), "paused_s": round(paused, 1), "cpu_s": round(cpu, 2), "peak_rss_mib": round(peak / 1024, 1),
            "returncode": process.returncode}


def reap_left_behind(wait_s: float = 30.0):
    """The usage of each descendant the stage left running, once it exits (up to ``wait_s`` for all)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:  # none left
            return
        if pid:
            yield usage
        else:
            time.sleep(POLL_S)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        # a number missing from a row (a column added since it was written) reads as NaN
        return [{**row, "size": int(row["size"]), "images": int(row["images"]), "returncode": int(row["returncode"]),
                 **{k: float(row.get(k) or "nan") for k in NUMBERS}} for row in csv.DictReader(f)]


def append_row(path: Path, row: dict) -> None:
    """Add ``row`` to the CSV (rewritten under the current columns when it has others)."""
    rows = read_rows(path)
    with open(path.with_suffix(".tmp"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([*rows, row])
    path.with_suffix(".tmp").replace(path)


def exponent(images, seconds) -> float:
    """k of seconds ~ images^k: the least-squares slope on log-log (NaN below two distinct sizes)."""
    images, seconds = np.asarray(images, float), np.asarray(seconds, float)
    if len(np.unique(images)) < 2:
        return float("nan")
    return float(np.polyfit(np.log(images), np.log(seconds), 1)[0])


def done_rows(rows: list[dict]) -> dict:
    """The latest successful row of each (size, stage)."""
    return {(row["size"], row["stage"]): row for row in rows if row["returncode"] == 0}


def running_s(row: dict) -> float:
    """The stage's wall time less the time it was stopped (none counted where not recorded)."""
    return row["wall_s"] - (row["paused_s"] if np.isfinite(row["paused_s"]) else 0.0)


def write_summary(out: Path, rows: list[dict]) -> str:
    done = done_rows(rows)
    lines = ["| images | stage | wall (s) | of it stopped (s) | CPU (s) | CPU / running | peak RSS (MiB) | added on disk (MiB) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for (size, stage), row in sorted(done.items(), key=lambda item: (item[0][0], STAGES.index(item[0][1]))):
        lines.append(f"| {row['images']:,} | {stage} | {row['wall_s']:.1f} | {row['paused_s']:.1f} | {row['cpu_s']:.1f} | "
                     f"{row['cpu_s'] / max(running_s(row), 1e-9):.2f} | {row['peak_rss_mib']:.0f} | {row['disk_mib']:.1f} |")
    lines += ["", f"Exponents k of time ~ images^k (least squares on log-log; flagged above {STEEP}):", "",
              "| stage | sizes | k (wall, less stopped) | k (CPU) | |", "|---|---:|---:|---:|---|"]
    for stage in STAGES:
        points = [row for (size, name), row in done.items() if name == stage]
        images = [row["images"] for row in points]
        k_wall, k_cpu = exponent(images, [running_s(row) for row in points]), exponent(images, [row["cpu_s"] for row in points])
        flag = f"**above {STEEP}**" if max(k_wall, k_cpu) > STEEP else ""
        lines.append(f"| {stage} | {len(points)} | {k_wall:.2f} | {k_cpu:.2f} | {flag} |")
    failed = [row for row in rows if row["returncode"] != 0 and (row["size"], row["stage"]) not in done]
    if failed:
        lines += ["", "Failed (see logs/): " + ", ".join(f"{row['stage']} at {row['size']:,} (exit {row['returncode']})" for row in failed)]
    text = "\n".join(lines) + "\n"
    (out / "scale_curve.md").write_text(text)
    plot(out / "scale_curve.png", done)
    return text


def plot(path: Path, done: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for stage in STAGES:
        points = sorted((row["images"], running_s(row)) for (size, name), row in done.items() if name == stage)
        if points:
            k = exponent(*zip(*points))
            ax.plot(*zip(*points), marker="o", label=f"{stage} (k = {k:.2f})" if np.isfinite(k) else stage)
    ax.set(xscale="log", yscale="log", xlabel="images", ylabel="wall time, less stopped (s)", title="make benchmark stages on Fashion-MNIST")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,10000,30000,70000", help=f"images per run, comma-separated; {FULL_SIZE} is --full")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scale-curve"), help="one folder per size, the CSV, table and plot")
    parser.add_argument("--memory-budget", default=None, help="classify's --memory-budget (default: its own, 8G)")
    args = parser.parse_args(argv)
    sizes = [min(int(size), FULL_SIZE) for size in args.sizes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    table = args.out / "scale_curve.csv"
    become_subreaper()
    for size in sizes:
        folder = args.out / f"n{size}"
        for stage in STAGES:
            if (size, stage) in done_rows(read_rows(table)):
                print(f"[{size:,} images] {stage}: done before, skipped", flush=True)
                continue
            print(f"[{size:,} images] {stage} ...", flush=True)
            before = folder_bytes(folder)
            measured = run_stage(stage_command(stage, size, folder, args.memory_budget), folder / "logs" / f"{stage}.log")
            row = {"size": size, "stage": stage, "images": store_images(folder) or size, **measured,
                   "disk_mib": round((folder_bytes(folder) - before) / 2**20, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            append_row(table, row)
            print(f"[{size:,} images] {stage}: {row['wall_s']:.1f} s wall ({row['paused_s']:.0f} s stopped), {row['cpu_s']:.1f} s CPU, {row['peak_rss_mib']:.0f} MiB peak, "
                  f"+{row['disk_mib']:.1f} MiB" + ("" if row["returncode"] == 0 else f", FAILED (exit {row['returncode']}, see {folder / 'logs'})"),
                  flush=True)
            if row["returncode"] != 0:
                break  # the later stages need this one's output
    text = write_summary(args.out, read_rows(table))
    print(text)
    return text


if __name__ == "__main__":
    main()
