"""Kill ``make extract`` at random moments, then finish it, and compare with an uninterrupted run.

    .venv/bin/python benchmarks/kill_campaign.py [--kills 20] [--images 200] [--seed 0] [--model efficientnet_lite0]

On a folder of ``--images`` photo-sized JPEGs (written into a temporary folder named
``kill-campaign``), it first runs ``make extract`` once without interruption (the
reference), then starts it again and again, SIGKILLing the whole process group (make,
the shell and Python) at a seeded random moment of each run: one kill in five anywhere in
start-up (make, imports, building the model), the others anywhere after the store's lock
appears, uniform over the time the rows still to do take (measured on the reference run:
graph tracing to the first shard, then the time per image up to the process's exit), so
that they land in extraction, between and during shard writes, in the final assembly and
after it. A run that finishes before its moment has its store checked against the
reference and removed, so that every kill interrupts a real extraction. After ``--kills``
kills it runs ``make extract`` to completion and prints: kills, rows lost, rows duplicated,
row order, the largest feature difference against the reference, and any file left
beside the store (over every store completed). ``CHECKPOINT_SECONDS`` (default 1) makes runs save shards often
enough that kills interrupt real progress.

It writes ``features/kill-campaign/`` in the repository (removed at the start and the end)
and needs ``make setup`` done.
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


def make_extract(folder: Path, model: str, checkpoint_seconds: float) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.Popen(
        ["make", "--no-print-directory", "extract", f"DATASET=folder:{folder}", f"MODEL={model}",
         f"CHECKPOINT_SECONDS={checkpoint_seconds}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: the kill takes make, sh and python at once
    )


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--checkpoint-seconds", type=float, default=1.0)
    args = parser.parse_args()
    if shutil.which("make") is None or subprocess.run(["make", "-q", "-C", str(ROOT), ".venv/.installed"]).returncode != 0:
        print("needs GNU make and an installed .venv: run `make setup` first", file=sys.stderr)
        return 2

    rng = np.random.default_rng(args.seed)
    out = ROOT / "features" / NAME
    store = out / f"{args.model}.h5"
    partial = store.with_name(store.name + ".partial")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photos(Path(tmp) / NAME, args.images, args.seed)
        shutil.rmtree(out, ignore_errors=True)
        print(f"kill campaign: make extract DATASET=folder:{folder} MODEL={args.model} "
              f"CHECKPOINT_SECONDS={args.checkpoint_seconds}; {args.images} images, {args.kills} kills, seed {args.seed}")

        lock = store.with_name(store.name + ".lock")
        started = time.monotonic()
        reference_run = make_extract(folder, args.model, args.checkpoint_seconds)
        opened = wait_for(lambda: holds_lock(lock, reference_run), reference_run)
        first_shard = wait_for(lambda: any(partial.glob("shard-*.npz")), reference_run)
        _, err = reference_run.communicate()
        ended = time.monotonic()
        if reference_run.returncode != 0:
            print(f"the uninterrupted run failed:\n{err}", file=sys.stderr)
            return 1
        reference_path = Path(tmp) / "reference.h5"
        shutil.move(store, reference_path)
        startup, first_batch, per_row = opened - started, first_shard - opened, (ended - first_shard) / args.images
        print(f"uninterrupted run: {ended - started:.1f} s: {startup:.1f} s start-up (make, imports, model) before the store "
              f"is opened, {first_batch:.1f} s to the first shard (graph tracing), then {per_row * 1000:.0f} ms per image "
              "(extraction, assembly and exit)")

        def compare() -> tuple[int, int, bool, float, list[str]]:
            """rows lost, rows duplicated, same order, max feature difference, files beside the store."""
            with FeatureStore(store) as done, FeatureStore(reference_path) as reference:
                paths, expected_paths = list(done.paths), list(reference.paths)
                same_order = paths == expected_paths
                difference = max(float(np.abs(done.features(t) - reference.features(t)).max()) for t in reference.taps) if same_order else float("inf")
            return (len(set(expected_paths) - set(paths)), len(paths) - len(set(paths)), same_order, difference,
                    sorted(p.name for p in out.iterdir() if p != store))

        results = []
        kills = runs = late = 0
        while kills < args.kills and runs < 3 * args.kills:
            runs += 1
            before = 0 if store.exists() else rows_saved(partial)
            in_startup, fraction = rng.random() < STARTUP_SHARE, float(rng.random())
            run = make_extract(folder, args.model, args.checkpoint_seconds)
            if in_startup:  # anywhere before the store is opened
                phase, window = "start-up", startup
                begun = time.monotonic()
            else:  # anywhere in the extraction of the rows still to do, shard writes and assembly
                begun = wait_for(lambda: holds_lock(lock, run), run)
                phase, window = "extraction", first_batch + (args.images - before) * per_row
            moment = fraction * window
            try:
                run.wait(timeout=max(moment - (time.monotonic() - begun), 0.001))
                outcome = f"finished first (rc {run.returncode})"
            except subprocess.TimeoutExpired:
                published = store.exists()
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
                kills += 1
                late += published
                outcome = f"kill {kills:2d}" + (" (store already published, process exiting)" if published else "")
            run.stderr.close()
            after = args.images if store.exists() else rows_saved(partial)
            print(f"run {runs:2d}: {outcome} {moment:5.2f} s into {phase} (of ~{window:4.1f} s); rows saved {before:3d} -> {after:3d}"
                  + ("; store complete: checked, then removed to start over" if store.exists() else ""))
            if store.exists():  # every kill should interrupt a real extraction: check this store and start over
                results.append(compare())
                store.unlink()

        started = time.monotonic()
        final = make_extract(folder, args.model, args.checkpoint_seconds)
        _, err = final.communicate()
        print(f"final run: rc {final.returncode}, {time.monotonic() - started:.1f} s")
        if final.returncode != 0:
            print(err, file=sys.stderr)
            return 1
        results.append(compare())
        lost, duplicated = max(r[0] for r in results), max(r[1] for r in results)
        same_order, difference = all(r[2] for r in results), max(r[3] for r in results)
        leftovers = sorted({name for r in results for name in r[4]})
        print(f"kills: {kills} in {runs} runs ({kills - late} during extraction or assembly, {late} after publication); "
              f"stores completed and checked: {len(results)}")
        print(f"rows lost: {lost}")
        print(f"rows duplicated: {duplicated}")
        print(f"row order as uninterrupted: {'yes' if same_order else 'NO'}")
        print(f"max feature difference vs uninterrupted run: {difference:.3g} (over every tap of every completed store)")
        print(f"files left beside the store: {', '.join(leftovers) or 'none'}")
        shutil.rmtree(out, ignore_errors=True)
    return 0 if lost == duplicated == 0 and same_order and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
