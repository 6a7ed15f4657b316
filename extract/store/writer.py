"""``StoreWriter``: rows into resumable shards, then one complete store published atomically."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from extract.datasets.base import index_digest
from extract.errors import UserError
from extract.fileio import GuardedFile, atomic_write, atomic_write_text, remove_temporaries, save_arrays
from extract.parallel import host_cores
from extract.store.chunks import ChunkWriter
from extract.store.lock import StoreLock
from extract.store.reader import FeatureStore
from extract.store.schema import (
    CHUNK_BYTES, GZIP_LEVEL, MANIFEST, SCHEMA_VERSION, STRING, StoreError, StoreMismatchError, canonical_json, check_same_settings,
)

log = logging.getLogger(__name__)


class StoreWriter:
    """Resumable, crash-safe writer for one store. Use as a context manager.

    >>> with StoreWriter(path, dataset=ds, extractor="hog", fingerprint=fp, taps=["hog"]) as writer:
    ...     for rows in batches(writer.pending_rows()):
    ...         writer.write_shard(rows, features, skipped=[])
    ...     writer.finalize()
    """

    def __init__(self, path: str | Path, *, dataset, extractor: str, fingerprint: dict, taps: list[str], stats=(), overwrite: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.dataset = dataset
        self.extractor = extractor
        self.fingerprint = fingerprint
        self.taps = list(taps)
        self.stats = list(stats)
        self.overwrite = overwrite
        self.digest = dataset.digest()
        self._done = np.zeros(len(dataset), dtype=bool)
        self.up_to_date = False
        self._lock = StoreLock(self.path)

    # -- opening -------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            remove_temporaries(self.path)  # under the lock: leftovers of a killed assembly
            if self.path.exists() and not self.overwrite:
                self.up_to_date = self._check_existing_store()
                if self.up_to_date:
                    shutil.rmtree(self.partial, ignore_errors=True)
                    return self
            self._open_partial()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _manifest(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.dataset.name,
            "extractor": self.extractor,
            "fingerprint": self.fingerprint,
            "taps": self.taps,
            "stats": self.stats,
            "dataset_digest": self.digest,
            "rows": len(self.dataset),
        }

    def _check_existing_store(self) -> bool:
        with FeatureStore(self.path, expect=self.fingerprint,
                          fix="Refusing to mix them. Use --overwrite to replace the store, or write to another path.") as store:
            digest, n = store.dataset_digest, len(store) + len(store.skipped)
        if digest != self.digest:
            raise StoreMismatchError(
                f"{self.path} was made for another list of images ({n} rows, now {len(self.dataset)}): "
                "LIMIT, FULL, the seed or the dataset files changed. Use --overwrite to replace it."
            )
        return True

    def _open_partial(self) -> None:
        if self.overwrite and self.partial.exists():
            log.info("overwrite: discarding %s", self.partial)
            shutil.rmtree(self.partial)
        manifest_path = self.partial / MANIFEST
        manifest = self._manifest()
        if manifest_path.is_file():
            found = json.loads(manifest_path.read_text())
            if canonical_json(found) != canonical_json(manifest):
                if not any(self.partial.glob("shard-*.npz")):  # it stopped before storing a row: nothing to keep
                    log.info("discarding %s: an interrupted extraction with other settings that stored no row", self.partial)
                elif not self.overwrite:
                    # The images and the layout are settings of a partial store too.
                    def settings(record: dict) -> dict:
                        return {**record.get("fingerprint", {}), "list of images": record.get("dataset_digest"),
                                "store layout": canonical_json({k: v for k, v in record.items() if k not in ("fingerprint", "dataset_digest")})}

                    check_same_settings(settings(manifest), settings(found), subject=f"{self.partial} holds an interrupted extraction with other settings",
                                        fix="Use --overwrite to discard it, or restore the old settings to resume it.")
                shutil.rmtree(self.partial)
        if not manifest_path.is_file():
            self.partial.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
        for leftover in self.partial.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)
        for shard in self._shards():
            rows = np.concatenate([shard["rows"], shard["skipped_rows"]])
            if self._done[rows].any() or len(np.unique(rows)) != len(rows):
                # Only two writers at once (before stores were locked) leave such a shard.
                log.warning("discarding %s: it repeats rows stored in another shard; its rows will be redone", shard["path"])
                shard["path"].unlink(missing_ok=True)
                continue
            self._done[rows] = True
        if self._done.any():
            log.info("resuming %s: %d of %d rows already done", self.path, int(self._done.sum()), len(self._done))

    def _shards(self):
        """Yield the readable shards; an unreadable one is removed so its rows are redone."""
        for shard_path in sorted(self.partial.glob("shard-*.npz")):
            try:
                with np.load(shard_path) as shard:
                    yield {"path": shard_path, "rows": shard["rows"], "skipped_rows": shard["skipped_rows"]}
            except (OSError, ValueError, KeyError) as error:
                log.warning("discarding unreadable shard %s (%s); its rows will be redone", shard_path, error)
                shard_path.unlink(missing_ok=True)

    # -- writing -------------------------------------------------------------------------
    def pending_rows(self) -> np.ndarray:
        return np.flatnonzero(~self._done)

    @property
    def rows_done(self) -> int:
        return int(self._done.sum())

    def write_shard(self, rows, features: dict[str, np.ndarray], skipped: list[tuple[int, str]] = ()) -> None:
        """Persist the features of ``rows`` (dataset indices) and the rows skipped with reasons."""
        rows = np.asarray(rows, dtype=np.int64)
        if set(features) != set(self.taps) | set(self.stats):
            raise UserError(f"shard has {sorted(features)}, the store expects layers {self.taps} and stats {self.stats}")
        for name, array in features.items():
            if len(array) != len(rows):
                raise UserError(f"layer {name!r}: {len(array)} feature rows for {len(rows)} images")
        skipped_rows = np.asarray([r for r, _ in skipped], dtype=np.int64)
        if len(rows) + len(skipped_rows) == 0:
            return
        if self._done[rows].any() or self._done[skipped_rows].any():
            raise UserError("a shard would write rows that are already stored")
        first = int(min(rows.min(initial=len(self._done)), skipped_rows.min(initial=len(self._done))))
        payload = {f"{'stat' if name in self.stats else 'layer'}/{name}": np.asarray(array, dtype=np.float32) for name, array in features.items()}
        payload.update(rows=rows, skipped_rows=skipped_rows, skipped_reasons=np.asarray([r for _, r in skipped], dtype=str))
        target = self.partial / f"shard-{first:09d}-{uuid.uuid4().hex[:6]}.npz"
        save_arrays(target, **payload)
        self._done[rows] = True
        self._done[skipped_rows] = True

    # -- publishing ----------------------------------------------------------------------
    def finalize(self, run: dict | None = None) -> Path:
        """Assemble the shards into the store (atomically). All rows must be done.
        ``run`` describes the extraction run (time, throughput) for the report."""
        if self.up_to_date:
            return self.path
        if not self._done.all():
            raise StoreError(f"{self.path}: {int((~self._done).sum())} rows are not extracted yet")
        shards = list(self._shards())
        ok_rows = np.zeros(len(self._done), dtype=bool)
        for shard in shards:
            if ok_rows[shard["rows"]].any():
                raise StoreError(f"{self.partial}: a row is stored twice; delete the folder and extract again")
            ok_rows[shard["rows"]] = True
        position = np.cumsum(ok_rows) - 1  # row index -> position among stored rows
        n_ok = int(ok_rows.sum())
        skipped_rows, skipped_reasons = [], []
        ds = self.dataset

        def write(tmp: Path) -> None:
            guarded = GuardedFile(tmp)
            try:
                with h5py.File(guarded, "w") as f:
                    fill(f)
            except Exception:
                guarded.check()  # the disk error behind HDF5's, if any
                raise
            finally:
                guarded.close()
            guarded.check()

        def fill(f: h5py.File) -> None:
            keep = np.flatnonzero(ok_rows)
            f.create_dataset("index/path", data=np.asarray([ds.paths[i] for i in keep], dtype=object), dtype=STRING)
            f.create_dataset("index/label", data=ds.labels[keep].astype(np.int64))
            f.create_dataset("index/split", data=np.asarray([ds.splits[i] for i in keep], dtype=object), dtype=STRING)
            f.create_dataset("classes", data=np.asarray(ds.classes, dtype=object), dtype=STRING)
            if ds.targets is not None:
                f.create_dataset("index/multilabel", data=ds.targets[keep].astype(np.int8))
            layers = f.create_group("layers")
            writers: dict[str, ChunkWriter] = {}
            with ThreadPoolExecutor(host_cores(), thread_name_prefix="gzip") as pool:
                for shard in shards:
                    with np.load(shard["path"]) as data:
                        skipped_rows.extend(data["skipped_rows"].tolist())
                        skipped_reasons.extend(data["skipped_reasons"].tolist())
                        target = position[data["rows"]]
                        order = np.argsort(target)
                        for name in self.taps:
                            block = data[f"layer/{name}"][order]
                            if not len(block):
                                continue
                            if name not in layers:
                                chunk_rows = max(1, min(max(n_ok, 1), CHUNK_BYTES // (4 * block.shape[1])))
                                writers[name] = ChunkWriter(layers.create_dataset(
                                    name, shape=(n_ok, block.shape[1]), dtype=np.float32,
                                    chunks=(chunk_rows, block.shape[1]), compression="gzip",
                                    compression_opts=GZIP_LEVEL, shuffle=True,
                                ), pool)
                            where = target[order]
                            if where[-1] - where[0] + 1 == len(where):
                                writers[name].write(int(where[0]), block)
                            else:
                                writers[name].write_rows(where, block)
                for writer in writers.values():
                    writer.close()
            for name in self.taps:  # every row may have been skipped
                if name not in layers:
                    layers.create_dataset(name, shape=(0, 0), dtype=np.float32)
            for name in self.stats:
                values = np.zeros(n_ok, np.float32)
                for shard in shards:
                    with np.load(shard["path"]) as data:
                        values[position[data["rows"]]] = data[f"stat/{name}"]
                f.create_dataset(f"stats/{name}", data=values)
            order = np.argsort(skipped_rows)
            f.create_dataset("skipped/path", data=np.asarray([ds.paths[skipped_rows[i]] for i in order], dtype=object), dtype=STRING)
            f.create_dataset("skipped/reason", data=np.asarray([skipped_reasons[i] for i in order], dtype=object), dtype=STRING)
            f.attrs.update(
                schema_version=SCHEMA_VERSION,
                dataset=ds.name,
                extractor=self.extractor,
                fingerprint=canonical_json(self.fingerprint),
                taps=json.dumps(self.taps),
                dataset_digest=self.digest,
                index_digest=index_digest(f["index/path"].asstr()[()], f["index/label"][()], f["index/split"].asstr()[()],
                                          f["index/multilabel"][()] if "index/multilabel" in f else None),
                dataset_info=canonical_json(ds.info),
                complete=True,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                run=canonical_json(run or {}),
            )

        atomic_write(self.path, write)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.up_to_date = True
        return self.path
