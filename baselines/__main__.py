"""Command line: ``python -m baselines --dataset ... [--baselines hog,sift_bow,...] [--preset paper|fast|full]``."""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack
from pathlib import Path

from baselines import DEFAULT_PRESET, PRESETS, WORDS, build_baseline, list_baselines
from extract.arguments import ArgumentParser, names, option, whole
from extract.commands import add_dataset_arguments, add_scaling_arguments, dataset_from, exit_process, run_command, scaling_options
from extract.parallel import host_cores, process_pool
from extract.pipeline import extract_group, store_path

log = logging.getLogger(__name__)
BASELINES = tuple(list_baselines())


def build(name: str, dataset, *, preset: str = DEFAULT_PRESET, dense: bool | None = None, words: int | None = None, seed: int = 0,
          codebook_split: str | None = None):
    """A featurizer for baseline ``name``; codebook baselines still need ``fit_codebooks``."""
    return build_baseline(name, dataset, preset=preset, seed=seed, dense=dense, words=words, codebook_split=codebook_split)


def codebook_path(store: Path) -> Path:
    return Path(str(store).removesuffix(".h5") + ".codebook.npz")


def run_baselines(dataset, names, *, features_dir, preset: str = DEFAULT_PRESET, dense: bool | None = None, words: int | None = None,
                  seed: int = 0, codebook_split: str | None = None, processes: int | None = None, threads: int | None = None,
                  workers: int | None = None, ray_address: str | None = None, ship_bytes: bool = False,
                  on_error: str = "raise", overwrite: bool = False, progress: bool = True, checkpoint_seconds: float | None = None) -> list[Path]:
    """Every baseline in ``names`` into its own store. Featurizers that decode images at the
    same size run in one pass (each image decoded once, each descriptor computed once);
    local-descriptor ones in ``processes`` spawned processes (default: one per core). Spawned
    workers re-import the main module: call this from under ``if __name__ == "__main__":``.
    ``workers`` / ``ray_address``: the stores are computed by Ray workers (``extract.distributed``),
    with the codebooks learned here once and sent to them."""
    from baselines.local import SharedDescriptors, fit_codebooks

    featurizers = [build(n, dataset, preset=preset, dense=dense, words=words, seed=seed, codebook_split=codebook_split) for n in names]
    paths = [store_path(features_dir, dataset, f) for f in featurizers]
    local = [i for i, f in enumerate(featurizers) if hasattr(f, "spec")]
    processes = host_cores() if processes is None else processes
    extra = {} if checkpoint_seconds is None else {"checkpoint_seconds": checkpoint_seconds}
    with ExitStack() as stack:
        pool = stack.enter_context(process_pool(processes)) if local and processes > 0 else None
        fit_codebooks(dataset, [featurizers[i] for i in local], [codebook_path(paths[i]) for i in local], pool=pool, threads=threads)
        groups: dict = {}
        for i, featurizer in enumerate(featurizers):
            groups.setdefault(featurizer.min_side, []).append(i)
        done = {}
        for members in groups.values():
            uses_pool = any(i in local for i in members)
            written = extract_group(dataset, [featurizers[i] for i in members], [paths[i] for i in members],
                                    prepare=SharedDescriptors([featurizers[i] for i in members]), pool=pool if uses_pool else None,
                                    on_error=on_error, overwrite=overwrite, threads=threads, workers=workers, ray_address=ray_address,
                                    ship_bytes=ship_bytes, progress=progress, **extra)
            done.update(zip(members, written))
    return [done[i] for i in range(len(featurizers))]


def cmd_baselines(args) -> None:
    dataset = dataset_from(args)
    for path in run_baselines(dataset, args.baselines, features_dir=args.features_dir, preset=args.preset, dense=args.dense or None,
                              words=args.words, seed=args.seed, codebook_split=args.codebook_split, processes=args.processes,
                              on_error=args.on_error, overwrite=args.overwrite, progress=not args.no_progress,
                              checkpoint_seconds=args.checkpoint_seconds, **scaling_options(args)):
        print(f"features: {path}")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m baselines", description="hand-crafted features into features/<dataset>/<baseline>.h5")
    add_dataset_arguments(parser)
    parser.add_argument("--baselines", type=names, default=BASELINES, help=f"comma-separated, from: {', '.join(BASELINES)}")
    parser.add_argument("--preset", default=os.environ.get("BASELINES_PRESET") or DEFAULT_PRESET, choices=list(PRESETS),
                        help="paper: the papers' settings (default); fast: detected keypoints and small codebooks; full: paper + 3 px step + 1x1/3x1 Fisher layout")
    parser.add_argument("--dense", action="store_true", help="SURF/SIFT on a dense grid even where the preset detects keypoints")
    parser.add_argument("--words", type=option(WORDS), default=None, help="codebook size of every chosen encoder (default: the preset's)")
    parser.add_argument("--codebook-split", default=None, help="the split codebooks are learned on (default: train, else amazon)")
    parser.add_argument("--processes", type=option(whole(0)), default=None, help="worker processes for local descriptors (default: one per core; 0: threads only)")
    add_scaling_arguments(parser)
    return run_command(cmd_baselines, parser.parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
