"""Images to feature store: decode in worker threads, featurize in batches, write resumable shards.

Any featurizer works: CNN taps (``extract.extractor.CNNFeaturizer``) or hand-crafted
baselines. A featurizer provides ``name``, ``taps`` (layer names, low to high),
``min_side`` (decode hint, or None), ``batch_size``, ``fingerprint()``, a per-image
``prepare(rgb)`` and a batched ``__call__(list of prepared) -> {tap: (n, D)}``.
Optionally ``stats``: names of per-image numbers it also returns, stored under /stats.
``prepare`` runs in a thread pool: decoding, OpenCV, NumPy and scikit-image release the
GIL. Where the GIL binds (mahotas SURF, Python-level encoders), ``processes=N`` runs
``prepare`` in N *spawned* worker processes with single-threaded BLAS, while decoding
stays in the threads. (Forked workers hung: a child forked after the parent used
OpenMP, as scikit-learn's k-means does, can wait forever. Spawned ones start clean.)

``extract_group`` writes several stores in one pass over the images: one decode per
image, and one shared ``prepare`` (e.g. local descriptors computed once, then every
encoder that uses them) returning each store's prepared item. Each store keeps its own
resume state and fingerprint; a store that is already up to date is left out.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import tempfile
import time
from collections import deque
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from extract.datasets import ImageDataset
from extract.environment import machine_environment
from extract.images import ImageDecodeError
from extract.parallel import decode_pool, process_pool, run_pickled_job
from extract.store import CHECKPOINT_SECONDS, StoreWriter
from extract.errors import UserError

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
FLUSH_BYTES = 256 << 20  # and at most this much is held in memory (40,960-dim Fisher vectors add up)
PREFETCH_BATCHES = 2


def store_path(features_dir: str | Path, dataset: ImageDataset, featurizer) -> Path:
    return Path(features_dir) / dataset.name / f"{featurizer.name}.h5"


class ImageMapper:
    """``submit(row)`` -> future of ``job(dataset.read(row, min_side))``, or of the ``ImageDecodeError``.

    Decoding runs in threads; ``job`` runs in the same thread, or with ``processes`` in a
    pool of spawned processes (pass ``pool`` to share one across jobs). ``job`` must then be
    picklable; it is pickled once to a temporary file that each worker reads once. A context manager.
    """

    def __init__(self, dataset: ImageDataset, job, *, min_side, threads: int | None = None, processes: int = 0, pool=None):
        self.dataset, self.job, self.min_side = dataset, job, min_side
        self._stack = ExitStack()
        self.threads = self._stack.enter_context(decode_pool(threads))
        self.pool = pool
        if pool is None and processes:
            self.pool = self._stack.enter_context(process_pool(processes))
        if self.pool is not None:  # the job (e.g. fitted codebooks) travels once per worker, by file
            handle = self._stack.enter_context(tempfile.NamedTemporaryFile(prefix="offshelf-job-", suffix=".pkl"))
            pickle.dump(job, handle)
            handle.flush()
            self._job_file = handle.name

    def _one(self, row: int):
        try:
            image = self.dataset.read(row, min_side=self.min_side)
        except ImageDecodeError as error:
            return error
        if self.pool is None:
            return self.job(image)
        return self.pool.submit(run_pickled_job, self._job_file, image).result()

    def submit(self, row: int):
        return self.threads.submit(self._one, int(row))

    def __enter__(self) -> ImageMapper:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)
        self._stack.close()


class _Each:
    """The default shared prepare: each featurizer's own ``prepare``."""

    def __init__(self, featurizers):
        self.featurizers = featurizers

    def __call__(self, image):
        return [f.prepare(image) for f in self.featurizers]


def extract_to_store(
    dataset: ImageDataset,
    featurizer,
    path: str | Path,
    *,
    on_error: str = "raise",
    overwrite: bool = False,
    threads: int | None = None,
    processes: int = 0,
    workers: int | None = None,
    ray_address: str | None = None,
    ship_bytes: bool = False,
    progress: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> Path:
    """Write ``featurizer``'s features of every image of ``dataset`` to the store at ``path``.

    Finished batches are saved as a shard at least every ``checkpoint_seconds``.
    Resumes an interrupted run, refuses to mix settings (``StoreMismatchError``), and on a
    bad image raises ``ImageDecodeError`` naming it, or with ``on_error="skip"`` records it.
    ``threads``: image decoding threads; ``processes=N`` runs ``prepare`` in N spawned
    processes (see the module docstring). ``workers`` and/or ``ray_address``: decode and
    featurize on a Ray cluster instead (``extract.distributed``); this process still writes the store.
    """
    return extract_group(dataset, [featurizer], [path], on_error=on_error, overwrite=overwrite, threads=threads,
                         processes=processes, workers=workers, ray_address=ray_address, ship_bytes=ship_bytes,
                         progress=progress, checkpoint_seconds=checkpoint_seconds)[0]


def extract_group(
    dataset: ImageDataset,
    featurizers: list,
    paths: list,
    *,
    prepare=None,
    on_error: str = "raise",
    overwrite: bool = False,
    threads: int | None = None,
    processes: int = 0,
    pool=None,
    workers: int | None = None,
    ray_address: str | None = None,
    ship_bytes: bool = False,
    progress: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> list[Path]:
    """``extract_to_store`` for several featurizers in one pass: each image is decoded once
    (at the largest ``min_side``) and ``prepare(rgb)`` returns one prepared item per
    featurizer (default: each featurizer's own ``prepare``). Returns the stores' paths.

    Where the featurized batches come from is the only difference between the local path
    (threads, optionally spawned processes, featurized here) and Ray (``workers`` actors
    that decode, prepare and featurize); the shards, resume and publication are the same code."""
    if on_error not in ON_ERROR:
        raise UserError(f"on_error={on_error!r} is not one of {ON_ERROR}")
    if len(featurizers) != len(paths) or not featurizers:
        raise UserError(f"one path per featurizer. Received {len(featurizers)} featurizers and {len(paths)} paths")
    sides = {f.min_side for f in featurizers}
    if len(sides) > 1:
        raise UserError(f"featurizers decoded together must share min_side. Received {sorted(sides, key=str)}")
    distributed = workers is not None or ray_address is not None
    if workers is not None and workers < 1:
        raise UserError(f"workers={workers} must be at least 1 (Ray workers), or left unset to extract in this process")
    if ship_bytes and not distributed:
        raise UserError("ship_bytes (--ship-bytes) sends images to Ray workers: give workers (WORKERS=N) or ray_address (RAY_ADDRESS=) too")
    prepare = prepare or _Each(featurizers)
    with ExitStack() as stack:
        writers = []
        for featurizer, path in zip(featurizers, paths):
            writer = stack.enter_context(StoreWriter(
                path, dataset=dataset, extractor=featurizer.name, fingerprint=featurizer.fingerprint(),
                taps=featurizer.taps, stats=list(getattr(featurizer, "stats", [])), overwrite=overwrite))
            if writer.up_to_date:
                log.info("%s is up to date", path)
            writers.append(writer)
        todo = [i for i, w in enumerate(writers) if not w.up_to_date]
        if not todo:
            return [w.path for w in writers]
        jobs = [_Job(featurizers[i], writers[i], on_error) for i in todo]
        pending = np.unique(np.concatenate([w.pending_rows() for w in (writers[i] for i in todo)]))
        batch_size = min(f.batch_size for f in featurizers)
        batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            for job in jobs:
                job.flush()
            last_flush = time.monotonic()

        started = time.monotonic()
        name = "+".join(featurizers[i].name for i in todo)
        bar = tqdm(total=len(pending), desc=f"{dataset.name}/{name}", unit="img", disable=not progress)
        try:
            if distributed:
                from extract.distributed import RayBatches

                source = RayBatches(dataset, featurizers, todo, prepare, batches, workers=workers, address=ray_address,
                                     ship_bytes=ship_bytes, on_error=on_error)
            else:
                source = _local_batches(dataset, featurizers, todo, prepare, batches, threads=threads, processes=processes, pool=pool)
            with contextlib.closing(source):
                # Each batch: its rows, the rows that decoded, one part per store (prepared items
                # to featurize here, or {layer: features} from a worker), and the decode errors.
                for rows, good_rows, parts, errors in source:
                    for error in errors:
                        if on_error == "raise":
                            raise error
                        log.warning("skipping %s", error)
                        for job in jobs:
                            job.skip(error.row, error.reason)
                    for job, part in zip(jobs, parts):
                        job.add(good_rows, part)
                    bar.update(len(rows))
                    if time.monotonic() - last_flush >= checkpoint_seconds or sum(job.nbytes for job in jobs) >= FLUSH_BYTES:
                        flush()
        except KeyboardInterrupt:
            flush()  # keep every finished batch, then stop
            bar.close()
            for job in jobs:
                log.warning("interrupted: %d of %d images are saved in %s; rerun to resume", job.writer.rows_done, len(dataset), job.writer.partial)
            raise
        flush()
        bar.close()
        seconds = time.monotonic() - started
        environment = machine_environment()  # once per run, after it: every framework the run loaded is imported
        for job in jobs:
            images = job.images
            job.writer.finalize(run={"seconds": round(seconds, 2), "images": images, "resumed_from": job.resumed_from,
                                     "images_per_second": round(images / seconds, 2) if seconds > 0 else None,
                                     "environment": environment,
                                     **({"shared_with": [f.name for f in featurizers if f is not job.featurizer]} if len(jobs) > 1 else {}),
                                     **({"ray_workers": source.workers} if distributed else {})})
        return [w.path for w in writers]


def _local_batches(dataset, featurizers, todo, prepare, batches, *, threads, processes, pool):
    """Batches decoded in threads and prepared in this process (or spawned ones), in order;
    featurized by the stores' jobs here."""
    with ImageMapper(dataset, prepare, min_side=featurizers[0].min_side, threads=threads, processes=processes, pool=pool) as mapper:
        queue: deque = deque()
        batch_iter = iter(batches)

        def submit_next() -> None:
            rows = next(batch_iter, None)
            if rows is not None:
                queue.append((rows, [mapper.submit(r) for r in rows]))

        for _ in range(PREFETCH_BATCHES):
            submit_next()
        while queue:
            rows, futures = queue.popleft()
            submit_next()
            good_rows, items, errors = [], [], []
            for row, future in zip(rows, futures):
                result = future.result()
                if isinstance(result, ImageDecodeError):
                    result.row = int(row)
                    errors.append(result)
                else:
                    good_rows.append(int(row))
                    items.append(result)
            yield rows, good_rows, [[item[position] for item in items] for position in todo], errors


class _Job:
    """One store's share of a group pass: the rows it still needs, buffered until a flush.
    Features that are not finite (NaN or infinity: a model whose activations overflow) never
    reach a store: ``on_error`` stops the run naming the first image and tap, or skips them."""

    def __init__(self, featurizer, writer: StoreWriter, on_error: str = "raise"):
        self.featurizer, self.writer, self.on_error = featurizer, writer, on_error
        self.names = [*featurizer.taps, *getattr(featurizer, "stats", [])]
        self.needed = np.zeros(len(writer.dataset), bool)
        self.needed[writer.pending_rows()] = True
        self.images = int(self.needed.sum())
        self.resumed_from = writer.rows_done
        self.rows: list[np.ndarray] = []
        self.features: dict[str, list[np.ndarray]] = {name: [] for name in self.names}
        self.skipped: list[tuple[int, str]] = []
        self.nbytes = 0

    def skip(self, row: int, reason: str) -> None:
        if self.needed[row]:
            self.skipped.append((row, reason))

    def add(self, rows: list[int], items) -> None:
        """``items``: prepared items to featurize, or the ``{layer: (len(rows), D)}`` a worker computed."""
        keep = [i for i, row in enumerate(rows) if self.needed[row]]
        if not keep:
            return
        if isinstance(items, dict):
            features = {name: np.asarray(items[name])[keep] for name in self.names}
        else:
            features = self.featurizer([items[i] for i in keep])
        kept = np.asarray([rows[i] for i in keep], dtype=np.int64)
        finite = self._finite_rows(kept, features)
        if not finite.all():
            kept, features = kept[finite], {name: np.asarray(array)[finite] for name, array in features.items()}
        self.rows.append(kept)
        for name, parts in self.features.items():
            parts.append(features[name])
            self.nbytes += features[name].nbytes

    def _finite_rows(self, rows: np.ndarray, features: dict) -> np.ndarray:
        """Which rows have finite features in every layer and stat; the others stop the run
        (``on_error="raise"``) or are skipped, each with the first tap that is not finite."""
        finite = np.ones(len(rows), bool)
        first_tap: dict[int, str] = {}
        for name in self.names:
            values = np.asarray(features[name]).reshape(len(rows), -1)
            bad = ~np.isfinite(values).all(axis=1)
            for position in np.flatnonzero(bad & finite):
                first_tap[int(position)] = name
            finite &= ~bad
        if finite.all():
            return finite
        positions = np.flatnonzero(~finite)
        first = int(positions[0])
        where = f"{self.writer.dataset.paths[rows[first]]} in tap {first_tap[first]!r}"
        if self.on_error == "raise":
            raise UserError(
                f"{self.featurizer.name}: {len(positions)} of {len(rows)} images of a batch have features that are not finite "
                f"(NaN or infinity), the first {where}: the model's activations overflow. Extract in float32 or from other "
                "layers, or pass --on-error skip (ON_ERROR=skip) to record such images as skipped")
        for position in positions:
            reason = f"features not finite (NaN or infinity) in tap {first_tap[int(position)]!r}"
            self.skipped.append((int(rows[position]), reason))
        log.warning("%s: skipping %d images with features that are not finite, the first %s", self.featurizer.name, len(positions), where)
        return finite

    def flush(self) -> None:
        if self.rows or self.skipped:
            rows = np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)
            features = {name: np.concatenate(parts) if parts else np.zeros((0, 0) if name in self.featurizer.taps else 0, np.float32)
                        for name, parts in self.features.items()}
            self.writer.write_shard(rows, features, self.skipped)
        self.rows.clear()
        self.skipped.clear()
        for parts in self.features.values():
            parts.clear()
        self.nbytes = 0
