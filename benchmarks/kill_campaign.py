"""Kill ``make extract`` and ``python -m classify probe`` at random moments, then finish each, and
compare with an uninterrupted run.

    .venv/bin/python benchmarks/kill_campaign.py [--phases extract,classify] [--kills 20] [--images 200] [--seed 0]
                                                 [--model efficientnet_lite0]

On a folder of ``--images`` photo-sized JPEGs (written into a temporary folder named
``kill-campaign``), each phase first runs its command once without interruption (the
reference), then starts it again and again, SIGKILLing the whole process group at a seeded
random moment of each run: one kill in five anywhere in start-up, the others anywhere in the
work still to do (timed on the reference run), so that they land in the work, between and
during the writes, and in the process's exit. A run that finishes before its moment has its
output checked against the reference and removed, so that every kill interrupts real work.
After ``--kills`` kills it runs the command to completion and prints the kills and what the
outputs hold against the reference, over every output completed.

``extract``: ``make extract`` (make, the shell and Python are killed at once; start-up is make,
imports and building the model, the work the rows still to do, from the store's lock on);
it prints rows lost, rows duplicated, row order, the largest feature difference and any file
left beside the store. ``CHECKPOINT_SECONDS`` (default 1) makes runs save shards often enough
that kills interrupt real progress. It writes ``features/kill-campaign/`` in the repository
(removed at the start and the end) and needs ``make setup`` done.

``classify``: ``python -m classify probe`` on a store of the same photos (every Lite0 tap,
extracted once with ``python -m extract features``), every tap under each normalisation
(``--normalization auto``): one results.csv row per probe job, merged as each job finishes.
Start-up is imports up to the first row merged in the reference, the work the jobs still to
do. It prints the rows missing, present twice or differing from the uninterrupted run (every
column but the timings), prediction files that differ, and any temporary file left
(``.results.csv.tmp-*``, ``*.partial``, a held ``results.csv.lock``). It needs no make, and
writes only into the temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.store import FeatureStore  # noqa: E402

NAME = "kill-campaign"
STARTUP_SHARE = 0.2  # of the kills land in start-up; the others once the store is open


def write_photos(root: Path, count: int, seed: int, size=(320, 240)) -> Path:
    """Two classes of photo-sized JPEGs (a bright disc or square on noise), 75% train, 25% test."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[1], : size[0]]
    for i in range(count):
        label = i % 2
        folder = root / ("test" if i % 4 == 3 else "train") / ("disc" if label == 0 else "square")
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 90, (size[1], size[0], 3), dtype=np.uint8)
        cy, cx, r = rng.integers(60, size[1] - 60), rng.integers(60, size[0] - 60), rng.integers(25, 55)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2 if label == 0 else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        image[mask] = rng.integers(140, 256, 3)
        Image.fromarray(image).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def start(argv: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the kill takes every process of it at once


def make_extract(folder: Path, model: str, checkpoint_seconds: float) -> subprocess.Popen:
    return start(["make", "--no-print-directory", "extract", f"DATASET=folder:{folder}", f"MODEL={model}",
                  f"CHECKPOINT_SECONDS={checkpoint_seconds}"])


def rows_saved(partial: Path) -> int:
    total = 0
    for shard in partial.glob("shard-*.npz"):
        try:
            with np.load(shard) as data:
                total += len(data["rows"]) + len(data["skipped_rows"])
        except (OSError, ValueError, KeyError):
            pass
    return total


def wait_for(ready, process: subprocess.Popen, timeout: float = 300.0) -> float:
    """The time at which ``ready()`` became true (or ``process`` ended)."""
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return time.monotonic()


def holds_lock(lock: Path, run: subprocess.Popen) -> bool:
    """Whether a process of ``run``'s group holds the store's lock (a killed run leaves a stale file)."""
    try:
        return os.getpgid(int(lock.read_text().strip())) == run.pid
    except (OSError, ValueError):
        return False


class ExtractPhase:
    """``make extract`` into ``features/kill-campaign/``; a run's work begins once it holds the store's lock."""

    name, work, finished = "extract", "extraction or assembly", "after publication"

    def __init__(self, folder: Path, tmp: Path, args):
        self.folder, self.model, self.checkpoint_seconds, self.total = folder, args.model, args.checkpoint_seconds, args.images
        self.out = ROOT / "features" / NAME
        self.store = self.out / f"{args.model}.h5"
        self.partial, self.lock = self.store.with_name(self.store.name + ".partial"), self.store.with_name(self.store.name + ".lock")
        self.reference_path = tmp / "reference.h5"
        shutil.rmtree(self.out, ignore_errors=True)

    def describe(self) -> str:
        return f"make extract DATASET=folder:{self.folder} MODEL={self.model} CHECKPOINT_SECONDS={self.checkpoint_seconds}"

    def start(self) -> subprocess.Popen:
        return make_extract(self.folder, self.model, self.checkpoint_seconds)

    def reference(self) -> str | None:
        """Run once uninterrupted, time it, and keep its store; the error text if it failed."""
        started = time.monotonic()
        run = self.start()
        opened = wait_for(lambda: holds_lock(self.lock, run), run)
        first_shard = wait_for(lambda: any(self.partial.glob("shard-*.npz")), run)
        _, err = run.communicate()
        ended = time.monotonic()
        if run.returncode != 0:
            return err
        shutil.move(self.store, self.reference_path)
        self.startup, self.first_batch, self.per_row = opened - started, first_shard - opened, (ended - first_shard) / self.total
        print(f"uninterrupted run: {ended - started:.1f} s: {self.startup:.1f} s start-up (make, imports, model) before the store "
              f"is opened, {self.first_batch:.1f} s to the first shard (graph tracing), then {self.per_row * 1000:.0f} ms per image "
              "(extraction, assembly and exit)")
        return None

    def work_window(self, run: subprocess.Popen, before: int) -> tuple[float, float]:
        """(when the work began, how long the rest of it takes)."""
        return wait_for(lambda: holds_lock(self.lock, run), run), self.first_batch + (self.total - before) * self.per_row

    def saved(self) -> int:
        return self.total if self.done() else rows_saved(self.partial)

    def done(self) -> bool:
        return self.store.exists()

    def check(self) -> dict:
        with FeatureStore(self.store) as done, FeatureStore(self.reference_path) as reference:
            paths, expected_paths = list(done.paths), list(reference.paths)
            same_order = paths == expected_paths
            difference = max(float(np.abs(done.features(t) - reference.features(t)).max()) for t in reference.taps) if same_order else float("inf")
        return {"lost": len(set(expected_paths) - set(paths)), "duplicated": len(paths) - len(set(paths)), "same_order": same_order,
                "difference": difference, "left": sorted(p.name for p in self.out.iterdir() if p != self.store)}

    def reset(self) -> None:
        self.store.unlink()

    def report(self, worst: dict) -> tuple[str, bool]:
        shutil.rmtree(self.out, ignore_errors=True)
        return (f"rows lost: {worst['lost']}\nrows duplicated: {worst['duplicated']}\n"
                f"row order as uninterrupted: {'yes' if worst['same_order'] else 'NO'}\n"
                f"max feature difference vs uninterrupted run: {worst['difference']:.3g} (over every tap of every completed store)\n"
                f"files left beside the store: {', '.join(worst['left']) or 'none'}",
                worst["lost"] == worst["duplicated"] == 0 and worst["same_order"] and not worst["left"])


TIMINGS = ("created", "fit_seconds")  # the only columns that may differ between two runs of the same probes


class ClassifyPhase:
    """``python -m classify probe`` on a real store of the photos; a run's work is its probe jobs, one row each."""

    name, work, finished = "classify", "probing", "after the last row was merged"

    def __init__(self, folder: Path, tmp: Path, args):
        from classify.results import RESULT_KEY

        self.key = RESULT_KEY
        self.folder, self.features = folder, tmp / "features"
        self.reference_dir, self.results_dir = tmp / "results-reference", tmp / "results"
        extract = [sys.executable, "-m", "extract", "features", "--dataset", f"folder:{folder}", "--features-dir", str(self.features),
                   "--model", args.model, "--no-progress"]
        started = time.monotonic()
        made = subprocess.run(extract, cwd=ROOT, capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"could not extract the store to probe:\n{made.stderr[-3000:]}")
        print(f"store to probe: {made.stdout.split()[-1]} ({time.monotonic() - started:.1f} s)")

    def command(self, results_dir: Path) -> list[str]:
        return [sys.executable, "-m", "classify", "probe", "--dataset", f"folder:{self.folder}", "--features-dir", str(self.features),
                "--results-dir", str(results_dir), "--normalization", "auto", "--no-progress"]

    def describe(self) -> str:
        return " ".join(self.command(self.results_dir)[1:])

    def start(self) -> subprocess.Popen:
        return start(self.command(self.results_dir))

    def csv(self, results_dir: Path) -> Path:
        return results_dir / NAME / "results.csv"

    def rows(self, results_dir: Path):
        from classify.results import read_results

        return read_results(self.csv(results_dir)) if self.csv(results_dir).is_file() else None

    def reference(self) -> str | None:
        started = time.monotonic()
        run = start(self.command(self.reference_dir))
        first_row = wait_for(lambda: self.csv(self.reference_dir).is_file(), run)
        _, err = run.communicate()
        ended = time.monotonic()
        if run.returncode != 0:
            return err
        self.expected = self.rows(self.reference_dir)
        self.total = len(self.expected)
        self.startup, self.per_row = first_row - started, (ended - first_row) / max(self.total - 1, 1)
        print(f"uninterrupted run: {ended - started:.1f} s, {self.total} probe jobs (one row each): {self.startup:.1f} s to the "
              f"first row merged (imports, reading the store, the first fit), then {self.per_row * 1000:.0f} ms per job "
              "(fit, predictions, merge; the last one with the exit)")
        return None

    def work_window(self, run: subprocess.Popen, before: int) -> tuple[float, float]:
        return time.monotonic(), self.startup + (self.total - before) * self.per_row

    def saved(self) -> int:
        found = self.rows(self.results_dir)
        return 0 if found is None else len(found)

    def done(self) -> bool:
        return self.saved() == self.total

    def check(self) -> dict:
        """Rows missing, present twice and differing (a cell of any column but the timings); prediction
        files that differ or are missing; temporary files left."""
        import fcntl

        found, expected = self.rows(self.results_dir), self.expected
        found_keys, expected_keys = self.keys(found), self.keys(expected)
        columns = [c for c in expected.columns if c not in TIMINGS]
        by_key = dict(zip(found_keys, found[columns].astype(str).itertuples(index=False)))
        differing = sum(by_key[k] != row for k, row in zip(expected_keys, expected[columns].astype(str).itertuples(index=False))
                        if k in by_key)
        ours, theirs = self.results_dir / NAME / "predictions", self.reference_dir / NAME / "predictions"
        predictions = sorted(p.relative_to(theirs) for p in theirs.rglob("*.csv"))
        changed = sum(not (ours / p).is_file() or (ours / p).read_bytes() != (theirs / p).read_bytes() for p in predictions)
        folder = self.results_dir / NAME
        left = sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial"))
        with open(folder / "results.csv.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                left.append("results.csv.lock (held)")
        return {"missing": len(set(expected_keys) - set(found_keys)), "twice": len(found_keys) - len(set(found_keys)),
                "differing": differing, "predictions": len(predictions), "predictions_changed": changed, "left": left}

    def keys(self, frame) -> list[tuple]:
        return [tuple(map(str, row)) for row in frame[self.key].itertuples(index=False)]

    def reset(self) -> None:
        shutil.rmtree(self.results_dir)

    def report(self, worst: dict) -> tuple[str, bool]:
        return (f"rows missing: {worst['missing']} (of {self.total})\nrows present twice: {worst['twice']}\n"
                f"rows differing from the uninterrupted run (any column but {', '.join(TIMINGS)}): {worst['differing']}\n"
                f"prediction files differing or missing: {worst['predictions_changed']} (of {worst['predictions']})\n"
                f"temporary files left: {', '.join(worst['left']) or 'none'}",
                worst["missing"] == worst["twice"] == worst["differing"] == worst["predictions_changed"] == 0 and not worst["left"])


PHASES = {"extract": ExtractPhase, "classify": ClassifyPhase}


def worst(results: list[dict]) -> dict:
    """Over every checked output: each count's largest value, a flag true only where it is true in
    every one, and the union of the files left."""
    merged = {}
    for key, first in results[0].items():
        values = [result[key] for result in results]
        merged[key] = (all(values) if isinstance(first, bool) else sorted({v for found in values for v in found})
                       if isinstance(first, list) else max(values))
    return merged


def campaign(phase, kills: int, rng: np.random.Generator) -> bool:
    """``kills`` SIGKILLs of ``phase``'s command at random moments, then a run to completion; prints each
    run, the counts and the phase's report. True when every completed output matched the reference."""
    error = phase.reference()
    if error is not None:
        print(f"the uninterrupted run failed:\n{error}", file=sys.stderr)
        return False
    results = []
    killed = runs = late = 0
    phases = {"start-up": 0, phase.work: 0}
    while killed < kills and runs < 3 * kills:
        runs += 1
        before = phase.saved()
        in_startup, fraction = rng.random() < STARTUP_SHARE, float(rng.random())
        run = phase.start()
        if in_startup:  # anywhere before the work begins
            where, begun, window = "start-up", time.monotonic(), phase.startup
        else:  # anywhere in the work still to do, its writes and the exit
            where = phase.work
            begun, window = phase.work_window(run, before)
        moment = fraction * window
        try:
            run.wait(timeout=max(moment - (time.monotonic() - begun), 0.001))
            outcome = f"finished first (rc {run.returncode})"
        except subprocess.TimeoutExpired:
            published = phase.done()
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            killed += 1
            late += published
            phases[where] += not published
            outcome = f"kill {killed:2d}" + (" (all done already, process exiting)" if published else "")
        run.stderr.close()
        after = phase.saved()
        print(f"run {runs:2d}: {outcome} {moment:5.2f} s into {where} (of ~{window:4.1f} s); rows saved {before:3d} -> {after:3d}"
              + ("; complete: checked, then removed to start over" if phase.done() else ""))
        if phase.done():  # every kill should interrupt real work: check this output and start over
            results.append(phase.check())
            phase.reset()
    started = time.monotonic()
    final = phase.start()
    _, err = final.communicate()
    print(f"final run: rc {final.returncode}, {time.monotonic() - started:.1f} s")
    if final.returncode != 0:
        print(err, file=sys.stderr)
        return False
    results.append(phase.check())
    print(f"kills: {killed} in {runs} runs ({phases['start-up']} in start-up, {phases[phase.work]} in {phase.work}, "
          f"{late} {phase.finished}); outputs completed and checked: {len(results)}")
    text, passed = phase.report(worst(results))
    print(text)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="extract,classify", help=f"comma-separated, of: {', '.join(PHASES)}")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--checkpoint-seconds", type=float, default=1.0)
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases {args.phases!r}: give some of {', '.join(PHASES)}")
    if "extract" in phases and (shutil.which("make") is None
                                or subprocess.run(["make", "-q", "-C", str(ROOT), ".venv/.installed"]).returncode != 0):
        print("the extract phase needs GNU make and an installed .venv: run `make setup` first (or --phases classify)", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    passed = True
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photos(Path(tmp) / NAME, args.images, args.seed)
        for name in phases:
            phase = PHASES[name](folder, Path(tmp), args)
            print(f"kill campaign, {name}: {phase.describe()}; {args.images} images, {args.kills} kills, seed {args.seed}")
            passed &= campaign(phase, args.kills, rng)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
