"""Images to feature store: decode in worker threads, featurize in batches, write resumable shards.

Any featurizer works: CNN taps (``extract.extractor.CNNFeaturizer``) or hand-crafted
baselines. A featurizer provides ``name``, ``taps`` (layer names, low to high),
``min_side`` (decode hint, or None), ``batch_size``, ``fingerprint()``, a per-image
``prepare(rgb)`` and a batched ``__call__(list of prepared) -> {tap: (n, D)}``.
Optionally ``stats``: names of per-image numbers it also returns, stored under /stats.
``prepare`` runs in a thread pool: decoding, OpenCV, NumPy and scikit-image release the
GIL. (Forked worker processes were tried for the baselines and hung: a child forked
after the parent used OpenMP, as scikit-learn's k-means does, can wait forever.)
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from extract.datasets import ImageDataset
from extract.images import ImageDecodeError
from extract.store import StoreWriter
from extract.errors import UserError

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
CHECKPOINT_SECONDS = 20.0  # at most this much work is redone after a kill
PREFETCH_BATCHES = 2


def store_path(features_dir: str | Path, dataset: ImageDataset, featurizer) -> Path:
    return Path(features_dir) / dataset.name / f"{featurizer.name}.h5"


def _load_one(dataset: ImageDataset, featurizer, row: int):
    try:
        return featurizer.prepare(dataset.read(row, min_side=featurizer.min_side))
    except ImageDecodeError as error:
        return error


def decode_pool(workers: int | None = None) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers or min(8, (os.cpu_count() or 2) + 2), thread_name_prefix="decode")


def extract_to_store(
    dataset: ImageDataset,
    featurizer,
    path: str | Path,
    *,
    on_error: str = "raise",
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> Path:
    """Write ``featurizer``'s features of every image of ``dataset`` to the store at ``path``.

    Finished batches are saved as a shard at least every ``checkpoint_seconds``.
    Resumes an interrupted run, refuses to mix settings (``StoreMismatchError``), and on a
    bad image raises ``ImageDecodeError`` naming it, or with ``on_error="skip"`` records it.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"on_error={on_error!r} is not one of {ON_ERROR}")
    stats = list(getattr(featurizer, "stats", []))
    with StoreWriter(path, dataset=dataset, extractor=featurizer.name, fingerprint=featurizer.fingerprint(),
                     taps=featurizer.taps, stats=stats, overwrite=overwrite) as writer:
        if writer.up_to_date:
            log.info("%s is up to date", path)
            return writer.path
        pending = writer.pending_rows()
        batches = [pending[i : i + featurizer.batch_size] for i in range(0, len(pending), featurizer.batch_size)]
        buffer_rows: list[np.ndarray] = []
        buffer_features: dict[str, list[np.ndarray]] = {name: [] for name in (*featurizer.taps, *stats)}
        buffer_skipped: list[tuple[int, str]] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal last_flush
            if buffer_rows or buffer_skipped:
                rows = np.concatenate(buffer_rows) if buffer_rows else np.zeros(0, np.int64)
                features = {
                    name: np.concatenate(parts) if parts else np.zeros((0, 0) if name in featurizer.taps else 0, np.float32)
                    for name, parts in buffer_features.items()
                }
                writer.write_shard(rows, features, buffer_skipped)
            buffer_rows.clear()
            buffer_skipped.clear()
            for parts in buffer_features.values():
                parts.clear()
            last_flush = time.monotonic()

        started, resumed_from = time.monotonic(), writer.rows_done
        bar = tqdm(total=len(dataset), initial=writer.rows_done, desc=f"{dataset.name}/{featurizer.name}", unit="img", disable=not progress)
        try:
            with decode_pool(workers) as pool:
                queue: deque = deque()
                batch_iter = iter(batches)

                def submit_next() -> None:
                    rows = next(batch_iter, None)
                    if rows is not None:
                        queue.append((rows, [pool.submit(_load_one, dataset, featurizer, int(r)) for r in rows]))

                for _ in range(PREFETCH_BATCHES):
                    submit_next()
                while queue:
                    rows, futures = queue.popleft()
                    submit_next()
                    good_rows, images = [], []
                    for row, future in zip(rows, futures):
                        result = future.result()
                        if isinstance(result, ImageDecodeError):
                            if on_error == "raise":
                                raise result
                            log.warning("skipping %s", result)
                            buffer_skipped.append((int(row), result.reason))
                        else:
                            good_rows.append(row)
                            images.append(result)
                    if images:
                        features = featurizer(images)
                        buffer_rows.append(np.asarray(good_rows, dtype=np.int64))
                        for name, parts in buffer_features.items():
                            parts.append(features[name])
                    bar.update(len(rows))
                    if time.monotonic() - last_flush >= checkpoint_seconds:
                        flush()
        except KeyboardInterrupt:
            flush()  # keep every finished batch, then stop
            bar.close()
            log.warning("interrupted: %d of %d images are saved in %s; rerun to resume", writer.rows_done, len(dataset), writer.partial)
            raise
        flush()
        bar.close()
        seconds = time.monotonic() - started
        return writer.finalize(run={"seconds": round(seconds, 2), "images": len(pending), "resumed_from": resumed_from,
                                    "images_per_second": round(len(pending) / seconds, 2) if seconds > 0 else None})
