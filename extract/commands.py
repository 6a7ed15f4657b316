"""What every command line of offshelf shares (``python -m extract``, ``baselines``, ``classify``,
``transfer``): the dataset and scaling options, and ``run_command``, which turns an expected
failure into one line and an exit status. Importing it imports no model, pipeline or Ray."""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from extract.arguments import POSITIVE, SEEDS, number, option
from extract.datasets import CROPS, DATASETS, load_dataset
from extract.errors import UserError
from extract.fileio import DISK_ERRNOS
from extract.images import RESIZES
from extract.store import CHECKPOINT_SECONDS


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", help=f"{', '.join(DATASETS)}, folder:PATH or csv:FILE")
    parser.add_argument("--data-dir", default=None, help="where an existing copy of the dataset lives")
    parser.add_argument("--crop", default=None, choices=CROPS, help="birds: crop to the bounding box enlarged 1.5x")
    parser.add_argument("--resize", default=None, choices=RESIZES,
                        help="non-square images to square inputs: centre square, warp the whole image, or pad it "
                             "(default: warp for bounding-box crops, else centre)")
    parser.add_argument("--limit", type=option(POSITIVE), default=None, help="class-balanced subset: N train and N//2 per other split")
    parser.add_argument("--full", action="store_true", help="use every image (no default subset)")
    parser.add_argument("--seed", type=option(SEEDS), default=0, help="seed for subsets, splits and random weights")
    parser.add_argument("--features-dir", default="features", help="root folder of the feature stores")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="on an unreadable image: stop, or record it as skipped")
    parser.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--checkpoint-seconds", type=option(number(0)), default=CHECKPOINT_SECONDS, help="save finished batches at least this often")


def add_cluster_arguments(parser: argparse.ArgumentParser, *, per_gpu: bool = True) -> None:
    """``--workers`` / ``--ray-address``: the work runs on Ray (``extract.distributed.connect``)."""
    parser.add_argument("--workers", type=option(POSITIVE), default=None,
                        help="Ray workers: a local Ray cluster of this machine's CPUs with N workers, or N workers of --ray-address")
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="an existing Ray cluster (auto: the one this machine belongs to; default: $RAY_ADDRESS)"
                             + ("; one worker per GPU where it has GPUs" if per_gpu else ""))


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the images are decoded and featurized: here, or on Ray workers (``extract.distributed``)."""
    parser.add_argument("--threads", type=option(POSITIVE), default=None, help="image decoding threads of this process")
    add_cluster_arguments(parser)
    parser.add_argument("--ship-bytes", action="store_true",
                        help="send each image's encoded bytes from here to the Ray workers (when they cannot read the image paths)")


def scaling_options(args) -> dict:
    return {"threads": args.threads, "workers": args.workers, "ray_address": args.ray_address, "ship_bytes": args.ship_bytes}


def dataset_from(args):
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit, full=args.full, seed=args.seed, crop=args.crop)
    return replace(dataset, info={**dataset.info, "resize": args.resize}) if args.resize else dataset


def run_command(func, args) -> int:
    """Run a command with logging set up; expected failures print one clear line and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        func(args)
    except (UserError, FileNotFoundError) as error:  # a bug elsewhere keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in DISK_ERRNOS:
            raise
        print(f"error: {disk_error_message(error, output_option(args, error.filename))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def exit_process(code: int) -> NoReturn:
    """``sys.exit(code)`` at the end of a command's process (``python -m ...``), without the
    interpreter's last garbage collections over every object still alive: after TensorFlow's
    import they took 1.3 s of each command's wall time (0.13 s frozen), 0.4 s after scikit-learn's.
    Atexit handlers, stream flushes and the freeing of each module's objects still happen."""
    gc.freeze()
    sys.exit(code)


# The options that say where a command writes, most specific first (a results folder may lie inside the features folder).
OUTPUT_OPTIONS = {"out": "--out", "reports_dir": "--reports-dir", "results_dir": "--results-dir", "models_dir": "--models-dir",
                  "features_dir": "--features-dir"}


def output_option(args, filename) -> str:
    """The option naming the folder (or file) that holds ``filename``; else ``--out`` where the command has one."""
    if filename:
        path = Path(os.fspath(filename)).resolve()
        for attribute, flag in OUTPUT_OPTIONS.items():
            folder = getattr(args, attribute, None)
            if folder is not None and (path == Path(folder).resolve() or Path(folder).resolve() in path.parents):
                return flag
    return "--out" if hasattr(args, "out") else "--features-dir"


def disk_error_message(error: OSError, option: str = "--features-dir") -> str:
    """One line for a full disk, a file-size limit or a read-only folder: the file and the fix
    (``option``: the command-line option that moves the file elsewhere)."""
    name = error.filename or "a file"
    if error.errno in (errno.EACCES, errno.EPERM):  # reading or writing
        return f"{name}: {error.strerror}; give this user access to it, or write elsewhere with {option}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space there, or write elsewhere with {option}, then rerun the same command (finished work is kept)"
    elif error.errno == errno.EFBIG:
        fix = "the file is larger than this process may write (ulimit -f): raise the limit, then rerun the same command (finished work is kept)"
    else:
        fix = f"the folder is on a read-only file system: write elsewhere with {option}"
    return f"cannot write {name}: {error.strerror}; {fix}"
