"""The HDF5 feature store: the one contract between ``extract/``, ``baselines/`` and ``classify/``.

Schema version 1. One file per dataset and extractor: ``features/<dataset>/<extractor>.h5``.

==================  ==========  =============================================================
path                shape/type  meaning
==================  ==========  =============================================================
/index/path         (N,) utf-8  stable identifier of each image: its path relative to the
                                dataset root, or ``file#row`` for array datasets
/index/label        (N,) int64  class index into /classes
/index/split        (N,) utf-8  split name: "train", "test", "val", a domain name...
/index/multilabel   (N, C) i8   multi-label datasets only (VOC): 1 present, 0 absent,
                                -1 difficult (ignored when scoring); /index/label then
                                holds one present class per image
/classes            (C,) utf-8  class names in label order
/layers/<tap>       (N, D) f32  one feature matrix per tapped layer (or baseline variant),
                                chunked by rows, gzip-compressed with byte shuffle
/stats/<name>       (N,) f32    optional per-image diagnostics of an extractor, e.g.
                                ``n_descriptors`` of a bag of words (0: all-zero features)
/skipped/path       (K,) utf-8  images left out under ``--on-error skip`` (K may be 0)
/skipped/reason     (K,) utf-8  why each one was left out
==================  ==========  =============================================================

Root attributes:

* ``schema_version``: 1
* ``dataset``: the dataset's folder name; ``extractor``: the backbone or baseline name
* ``fingerprint``: JSON of everything that determined the features: model, weights
  SHA-256, input size, preprocessing, pooling, taps, package versions
* ``taps``: JSON list of the layer names in /layers, from low to high
* ``dataset_digest``: SHA-256 of the ordered (path, label, split) list the store was made for
* ``index_digest``: the same digest of the index the store holds (``dataset_digest`` less the
  skipped images); the reader checks it against the index it reads (a store written before it
  existed: ``dataset_digest``, when no image was skipped)
* ``dataset_info``: JSON: where the images came from, subset size and seed
* ``complete``: true; a store is only ever published complete (see below)
* ``created``: ISO-8601 UTC time of publication
* ``run`` (optional): JSON of the run that finished the store: ``seconds`` of wall time,
  ``images`` computed in it, ``resumed_from`` (rows already done), ``images_per_second``

Crash safety. HDF5 files can be left unreadable when a writer dies mid-write, so no
HDF5 file is ever written in place. Rows are computed into shards in
``<store>.partial/``; each shard is written to a temporary file, fsync'ed and renamed,
so a kill at any moment leaves only whole shards, and a rerun computes only the rows
that no shard holds. When every row is done, the shards are assembled into a temporary
HDF5 file that is fsync'ed and renamed over the store path. The file at the store path
is therefore always a complete store, old or new.

One writer at a time. A writer holds an exclusive ``fcntl.flock`` on ``<store>.lock``
(which holds its PID) from opening to publishing; a second writer of the same store is
refused with ``StoreLockedError`` naming that PID. The kernel drops the lock when its
process dies, so a killed writer's lock is taken over by the next run, which also
removes the temporary files (``.<store>.tmp-*``) a kill during assembly left behind.
A ``.partial/`` shard that repeats rows of another is discarded (its other rows are
redone); ``overwrite`` discards the whole ``.partial/`` folder. A ``.partial/`` of other settings
that holds no shard (its run stopped before a row was stored) is discarded without asking.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import io
import json
import logging
import os
import shutil
import uuid
import zipfile
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from extract import host_cores
from extract.datasets.base import index_digest
from extract.errors import UserError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STRING = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20
GZIP_LEVEL = 4
MANIFEST = "manifest.json"
PLAIN_FILTERS = frozenset({h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32})


class StoreError(UserError):
    """A feature store is unreadable, incomplete or of another schema. Names the file."""


class StoreMismatchError(StoreError):
    """Features would be mixed with features made under other settings or for other images."""


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _shuffle_deflate(chunk: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """One chunk through HDF5's shuffle filter, then its deflate filter (zlib at ``level``): the bytes
    h5py would store for it (``shuffle=True, compression="gzip"``)."""
    raw = np.ascontiguousarray(chunk).view(np.uint8).reshape(-1, chunk.dtype.itemsize)
    return zlib.compress(np.ascontiguousarray(raw.T).tobytes(), level)


class _ChunkWriter:
    """Rows of a new (n, D) dataset chunked by whole rows, shuffled and gzipped, arriving in blocks.

    While blocks come in row order from row 0, whole chunks are compressed in ``pool``'s threads
    (zlib lets go of the GIL) and stored as they are (``write_direct_chunk``); h5py alone compresses
    on one thread, which at GPU extraction rates took longer than the extraction. Rows out of that
    order (a resumed run's shards) go through h5py from then on. ``close()`` writes what is left."""

    def __init__(self, dataset, pool: ThreadPoolExecutor):
        self.dataset, self.pool = dataset, pool
        self.chunk_rows = dataset.chunks[0]
        self.direct = dataset.chunks[1] == dataset.shape[1]
        self.next_row = 0  # rows before it are written or being compressed; always a chunk boundary
        self.carry: list[np.ndarray] = []  # rows from next_row on: less than a chunk
        self.carried = 0
        self.in_flight: deque = deque()
        self.max_in_flight = 2 * pool._max_workers + 2  # compressed chunks waiting: a few MB at most

    def write(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + len(block)``."""
        if not (self.direct and start == self.next_row + self.carried):
            self._leave_direct()
            self.dataset[start : start + len(block)] = block
            return
        self.carry.append(block)
        self.carried += len(block)
        if self.carried < self.chunk_rows:
            return
        rows = np.concatenate(self.carry)
        whole = len(rows) - len(rows) % self.chunk_rows
        for offset in range(0, whole, self.chunk_rows):
            self._submit(self.next_row + offset, rows[offset : offset + self.chunk_rows])
        self.next_row += whole
        self.carry = [rows[whole:]] if whole < len(rows) else []
        self.carried = len(rows) - whole

    def write_rows(self, where: np.ndarray, block: np.ndarray) -> None:
        """Rows at the increasing positions ``where``, not contiguous."""
        self._leave_direct()
        self.dataset[where] = block

    def _submit(self, row: int, chunk: np.ndarray) -> None:
        self.in_flight.append((row, self.pool.submit(_shuffle_deflate, chunk)))
        while len(self.in_flight) > self.max_in_flight:
            self._store_one()

    def _store_one(self) -> None:
        row, future = self.in_flight.popleft()
        self.dataset.id.write_direct_chunk((row, 0), future.result())

    def _leave_direct(self) -> None:
        while self.in_flight:
            self._store_one()
        if self.carried:
            self.dataset[self.next_row : self.next_row + self.carried] = np.concatenate(self.carry)
            self.next_row += self.carried
            self.carry, self.carried = [], 0
        self.direct = False

    def close(self) -> None:
        if self.direct and self.carried and self.next_row + self.carried == self.dataset.shape[0]:
            rows = np.concatenate(self.carry)  # the edge chunk: stored whole, zero beyond the last row
            padded = np.zeros((self.chunk_rows, *rows.shape[1:]), rows.dtype)
            padded[: len(rows)] = rows
            self._submit(self.next_row, padded)
            self.next_row += self.carried
            self.carry, self.carried = [], 0
        self._leave_direct()


def fingerprint_differences(expected: dict, found: dict) -> list[str]:
    keys = sorted(set(expected) | set(found))
    return [f"{k}: {found.get(k)!r} in the store, {expected.get(k)!r} now" for k in keys if expected.get(k) != found.get(k)]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A full disk, a file-size limit, a read-only or foreign folder: the user's to fix, not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def _atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``target``.

    A disk error (``DISK_ERRNOS``) is raised as an ``OSError`` naming ``target``; the
    temporary file is removed whatever happens."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as error:
        if error.errno in DISK_ERRNOS:
            raise OSError(error.errno, os.strerror(error.errno), str(target)) from None
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    _fsync_dir(target.parent)


class ArrayFileError(UserError):
    """An ``.npz`` of arrays (a codebook, a saved probe) that is not what it claims to be. Names the file."""


# Deflate expands at most about 1,032-fold: a member declaring more than this per stored byte lies.
DEFLATE_RATIO = 1100


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``, nothing executable (no pickles), each member's header checked
    against the bytes the member holds before anything is allocated: a forged header that declares
    terabytes is refused, not read. Any fault is one ``ArrayFileError`` naming the file."""
    path = Path(path)
    arrays = {}
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name == info.filename:
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                if info.compress_size > size or info.file_size > DEFLATE_RATIO * info.compress_size + (1 << 20):
                    raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes in {info.compress_size}")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"member {info.filename!r} has .npy format version {version}")
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                    if dtype.hasobject:
                        raise ValueError(f"member {info.filename!r} holds Python objects")
                    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize + member.tell()
                    if declared > info.file_size:
                        raise ValueError(f"{name!r} declares shape {shape} of {dtype} ({declared} bytes) in a member of {info.file_size}")
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, zlib.error) as error:
        raise ArrayFileError(f"{path} is not a readable array file ({type(error).__name__}: {error})") from None
    return arrays


class _GuardedFile(io.RawIOBase):
    """A file for ``h5py.File(fileobj)`` that keeps the first write error instead of handing
    it to HDF5. HDF5 cannot close a file whose writes failed, and the process then dies in
    the library's exit handler (a segfault on a full disk); this way the file closes, and
    ``check()`` raises the error afterwards."""

    def __init__(self, path: Path):
        self._file = open(path, "w+b", buffering=0)
        self.path = path
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._file.readinto(buffer)

    def write(self, data) -> int:
        if self.error is None:
            try:
                return self._file.write(data)
            except OSError as error:
                self.error = error
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._file.truncate(size)
            except OSError as error:
                self.error = error
        return self.tell() if size is None else size

    def close(self) -> None:
        self._file.close()
        super().close()

    def check(self) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(self.path))


class StoreLock:
    """An exclusive lock on ``<store>.lock`` for the one process that writes a store.

    ``fcntl.flock`` is dropped by the kernel when its holder dies, so a lock left by a
    killed process is simply taken over. The file holds the holder's PID, for the message
    another writer gets, and is removed on release (a writer that locked a file already
    unlinked from the folder notices and locks the new one).
    """

    def __init__(self, store: str | Path):
        self.store = Path(store)
        self.path = self.store.with_name(self.store.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise StoreLockedError(
                    f"{self.store} is being written by {who} (lock {self.path}); "
                    "wait for it to finish or stop it, then rerun: the store has one writer at a time"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it while we waited for it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _stored_item_size(data: h5py.Dataset) -> int:
    """Bytes per element in the file: variable-length text and sequences store a 16-byte heap reference."""
    text = h5py.check_string_dtype(data.dtype)
    variable = (text is not None and text.length is None) or h5py.check_vlen_dtype(data.dtype) is not None
    return 16 if variable else data.dtype.itemsize


class FeatureStore:
    """Read-only view of a complete store. Use as a context manager.

    Nothing in the file is taken on its word: on opening, every object must be plain data inside
    the file (no external or soft links, virtual datasets or external raw storage, which would read
    other files), every chunk of a chunked dataset must be stored and the storage must fit in the
    file (a forged header cannot ask for terabytes), the index, classes, layers and attributes must
    agree with the schema and with each other, and the recorded digest of the image list must be
    that of the index read. ``dataset``: the dataset the caller reads (the folder the store is in);
    a store made for another one (renamed or copied) is refused. Any fault is one ``StoreError``."""

    def __init__(self, path: str | Path, *, dataset: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature store not found: {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            raise StoreError(f"{self.path} is not a readable HDF5 file ({error}); delete it and extract again") from None
        try:
            self._validate()
            if dataset is not None and self.dataset != dataset:
                raise StoreMismatchError(f"{self.path} holds features of dataset {self.dataset!r}, not {dataset!r} (renamed or copied "
                                         f"from another dataset's folder?): move it back, or extract {dataset} into its own store")
        except Exception:
            self._file.close()
            raise

    def _refuse(self, what: str) -> StoreError:
        return StoreError(f"{self.path} {what}; it is not a store this code wrote: delete it and extract again (OVERWRITE=1)")

    def _validate(self) -> None:
        attrs = self._file.attrs
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema_version={version!r}; this code reads version {SCHEMA_VERSION}")
        if not attrs.get("complete", False):
            raise StoreError(f"{self.path} is marked incomplete; rerun the extraction to finish it")
        missing = [p for p in ("index/path", "index/label", "index/split", "classes", "layers") if p not in self._file]
        if missing:
            raise StoreError(f"{self.path} lacks {missing}; it is not a schema-1 feature store")
        self._check_storage()
        self._check_attributes()
        self._check_index()

    def _check_storage(self) -> None:
        """Only hard links to groups and datasets held in this file, each chunk stored, all within its size."""
        problems: list[str] = []
        datasets: list[h5py.Dataset] = []

        def visit(name: str, link) -> None:
            if not isinstance(link, h5py.HardLink):
                problems.append(f"has a {type(link).__name__} at /{name}, which reads outside the store")
                return
            item = self._file[name]
            if isinstance(item, h5py.Dataset):
                datasets.append(item)
            elif not isinstance(item, h5py.Group):
                problems.append(f"has a {type(item).__name__} at /{name}")

        self._file.visititems_links(visit)
        stored = 0
        for data in datasets:
            if problems:
                break
            plist = data.id.get_create_plist()
            layout = plist.get_layout()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
            declared = int(np.prod(data.shape, dtype=object)) * _stored_item_size(data)
            if data.is_virtual or layout not in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED):
                problems.append(f"has a virtual dataset at {data.name}, which reads other files")
            elif plist.get_external_count():
                problems.append(f"stores {data.name} in external files")
            elif filters - PLAIN_FILTERS:
                problems.append(f"filters {data.name} with {sorted(filters - PLAIN_FILTERS)} (only gzip, shuffle and fletcher32 are read)")
            elif layout == h5py.h5d.CHUNKED:
                chunks = int(np.prod([-(-n // c) for n, c in zip(data.shape, data.chunks)], dtype=object))
                if data.id.get_num_chunks() != chunks:
                    problems.append(f"declares {data.name} of shape {data.shape} ({declared:,} bytes) in {chunks:,} chunks but stores "
                                    f"{data.id.get_num_chunks():,} of them")
                elif declared > DEFLATE_RATIO * data.id.get_storage_size() + CHUNK_BYTES:
                    problems.append(f"declares {data.name} of {declared:,} bytes in {data.id.get_storage_size():,}")
            elif layout == h5py.h5d.CONTIGUOUS and data.id.get_storage_size() != declared:
                problems.append(f"declares {data.name} of {declared:,} bytes but stores {data.id.get_storage_size():,}")
            stored += data.id.get_storage_size()
        if not problems and stored > self.path.stat().st_size:
            problems.append(f"declares {stored:,} bytes of data in a file of {self.path.stat().st_size:,}")
        if problems:
            raise self._refuse(problems[0])

    def _check_attributes(self) -> None:
        attrs = self._file.attrs
        for name in ("dataset", "extractor", "dataset_digest", "fingerprint", "taps"):
            if not isinstance(attrs.get(name), str):
                raise self._refuse(f"has no text attribute {name!r}")
        for name, kind in (("fingerprint", dict), ("taps", list), ("dataset_info", dict), ("run", dict)):
            if name in attrs:
                try:
                    value = json.loads(attrs[name])
                except (TypeError, ValueError):
                    raise self._refuse(f"has a {name} attribute that is not JSON") from None
                if not isinstance(value, kind):
                    raise self._refuse(f"has a {name} attribute that is not a JSON {kind.__name__}")
        taps = json.loads(attrs["taps"])
        if not all(isinstance(t, str) for t in taps) or len(set(taps)) != len(taps):
            raise self._refuse(f"lists taps {taps!r}, not distinct names")

    def _check_index(self) -> None:
        f = self._file
        index = {name: f[f"index/{name}"] for name in ("path", "label", "split")}
        n = len(index["label"])
        for name, data in (*index.items(), ("classes", f["classes"])):
            if not isinstance(data, h5py.Dataset) or data.ndim != 1:
                raise self._refuse(f"has /{'index/' if name != 'classes' else ''}{name} that is not a 1-D dataset")
        for name in ("path", "split"):
            if h5py.check_string_dtype(index[name].dtype) is None:
                raise self._refuse(f"has index/{name} that is not text")
            if len(index[name]) != n:
                raise self._refuse(f"has {len(index[name])} rows in index/{name} and {n} in index/label")
        if index["label"].dtype.kind not in "iu" or h5py.check_string_dtype(f["classes"].dtype) is None:
            raise self._refuse("has labels that are not integers or classes that are not text")
        classes, labels = len(f["classes"]), index["label"][()]
        if classes == 0:
            raise self._refuse("has an empty class list")
        if n and (labels.min() < 0 or labels.max() >= classes):
            raise self._refuse(f"has labels from {labels.min()} to {labels.max()} for {classes} classes")
        if "index/multilabel" in f:
            targets = f["index/multilabel"]
            if targets.shape != (n, classes) or targets.dtype.kind not in "iu" or not np.isin(targets[()], (-1, 0, 1)).all():
                raise self._refuse(f"has index/multilabel of shape {targets.shape} and values outside -1, 0, 1 for {n} rows of {classes} classes")
        layers = f["layers"]
        for tap in json.loads(f.attrs["taps"]):
            if tap not in layers or not isinstance(layers[tap], h5py.Dataset):
                raise self._refuse(f"lists tap {tap!r}, which /layers does not hold")
            data = layers[tap]
            if data.ndim != 2 or data.dtype != np.float32 or (data.shape[0] != n and data.shape != (0, 0)) or (data.shape == (0, 0) and n):
                raise self._refuse(f"has layer {tap!r} of shape {data.shape} and dtype {data.dtype} for {n} images (float32 (n, D) expected)")
        for name, data in (f["stats"].items() if "stats" in f else ()):
            if not isinstance(data, h5py.Dataset) or data.shape != (n,) or data.dtype.kind != "f":
                raise self._refuse(f"has stat {name!r} that is not one number per image")
        if "skipped/path" in f and ("skipped/reason" not in f or f["skipped/path"].shape != f["skipped/reason"].shape):
            raise self._refuse("has skipped images without one reason each")
        recorded = f.attrs.get("index_digest") if "index_digest" in f.attrs else (f.attrs["dataset_digest"] if not self.skipped else None)
        if recorded is not None:
            found = index_digest(self.paths, labels, self.splits, f["index/multilabel"][()] if "index/multilabel" in f else None)
            if found != recorded:
                raise self._refuse(f"has an index (paths, labels, splits) whose digest {found[:12]} is not the recorded {str(recorded)[:12]}")

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def file_identity(self) -> tuple[int, int]:
        """(device, inode) of the open file: what a path pointed to when it was opened, even after the
        path is replaced (a rebuilt store is renamed over the old one)."""
        status = os.fstat(self._file.id.get_vfd_handle())
        return status.st_dev, status.st_ino

    @property
    def dataset(self) -> str:
        return str(self._file.attrs["dataset"])

    @property
    def extractor(self) -> str:
        return str(self._file.attrs["extractor"])

    @property
    def fingerprint(self) -> dict:
        return json.loads(self._file.attrs["fingerprint"])

    @property
    def dataset_info(self) -> dict:
        return json.loads(self._file.attrs.get("dataset_info", "{}"))

    @property
    def kind(self) -> str:
        """"baseline" for hand-crafted features (their fingerprint names the baseline), else "cnn"."""
        return "baseline" if "baseline" in self.fingerprint else "cnn"

    @property
    def run(self) -> dict:
        """The extraction run that finished the store (seconds, images, images_per_second); {} if unknown."""
        return json.loads(self._file.attrs.get("run", "{}"))

    @property
    def dataset_digest(self) -> str:
        return str(self._file.attrs["dataset_digest"])

    @property
    def taps(self) -> list[str]:
        return json.loads(self._file.attrs["taps"])

    @property
    def classes(self) -> list[str]:
        return [s.decode() if isinstance(s, bytes) else s for s in self._file["classes"][()]]

    @property
    def paths(self) -> np.ndarray:
        return self._file["index/path"].asstr()[()]

    @property
    def labels(self) -> np.ndarray:
        return self._file["index/label"][()]

    @property
    def splits(self) -> np.ndarray:
        return self._file["index/split"].asstr()[()]

    @property
    def multilabel(self) -> np.ndarray | None:
        """(N, C) int8 targets of a multi-label store, else None."""
        return self._file["index/multilabel"][()] if "index/multilabel" in self._file else None

    @property
    def skipped(self) -> list[tuple[str, str]]:
        if "skipped/path" not in self._file:
            return []
        return list(zip(self._file["skipped/path"].asstr()[()], self._file["skipped/reason"].asstr()[()]))

    def __len__(self) -> int:
        return len(self._file["index/label"])

    @property
    def stats(self) -> list[str]:
        return sorted(self._file["stats"]) if "stats" in self._file else []

    def stat(self, name: str) -> np.ndarray:
        if name not in self.stats:
            raise KeyError(f"{self.path} has no per-image stat {name!r}; it has {self.stats}")
        return self._file["stats"][name][()]

    def dim(self, layer: str) -> int:
        return int(self._dataset(layer).shape[1])

    def _dataset(self, layer: str) -> h5py.Dataset:
        if layer not in self._file["layers"]:
            raise KeyError(f"{self.path} has no layer {layer!r}; it has {self.taps}")
        return self._file["layers"][layer]

    def features(self, layer: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The (n, D) float32 features of ``layer``, for all rows or a boolean/index selection.
        Features that are not finite are refused (``StoreError`` naming the first image)."""
        data = self._dataset(layer)
        if rows is None:
            return self._finite(layer, np.arange(len(self)), data[()])
        rows = np.asarray(rows)
        index = np.flatnonzero(rows) if rows.dtype == bool else np.sort(rows)
        return self._finite(layer, index, data[index]) if len(index) else np.zeros((0, data.shape[1]), np.float32)

    def iter_chunks(self, layer: str, rows: np.ndarray, chunk_rows: int = 4096):
        """Yield (positions, features) over sorted row indices without loading the whole layer."""
        data = self._dataset(layer)
        rows = np.sort(np.asarray(rows))
        for start in range(0, len(rows), chunk_rows):
            block = rows[start : start + chunk_rows]
            lo, hi = int(block[0]), int(block[-1]) + 1
            yield block, self._finite(layer, block, data[lo:hi][block - lo])

    def _finite(self, layer: str, rows: np.ndarray, features: np.ndarray) -> np.ndarray:
        """``features`` of dataset ``rows``, if every value is finite; a NaN or infinity (a store
        written before extraction checked them) is one line naming the store, the layer and an image."""
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise StoreError(f"{self.path}: layer {layer!r} holds features that are not finite (NaN or infinity) for {len(bad)} of "
                             f"{len(rows)} images read, the first {self._file['index/path'].asstr()[int(rows[bad[0]])]}; "
                             "extract the store again (OVERWRITE=1): extraction now stops at such features, or skips them with ON_ERROR=skip")
        return features


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
            self._remove_stale_temporaries()
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

    def _remove_stale_temporaries(self) -> None:
        """Under the lock, a temporary file of this store is a leftover of a killed assembly."""
        for leftover in self.path.parent.glob(f".{glob.escape(self.path.name)}.tmp-*"):
            log.info("removing %s, left by an interrupted run", leftover)
            leftover.unlink(missing_ok=True)

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
        with FeatureStore(self.path) as store:
            found_fp, digest, n = store.fingerprint, store.dataset_digest, len(store) + len(store.skipped)
        differences = fingerprint_differences(self.fingerprint, found_fp)
        if differences:
            raise StoreMismatchError(
                f"{self.path} holds features made with other settings:\n  " + "\n  ".join(differences)
                + "\nRefusing to mix them. Use --overwrite to replace the store, or write to another path."
            )
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
                    differences = fingerprint_differences(manifest["fingerprint"], found.get("fingerprint", {}))
                    if found.get("dataset_digest") != self.digest:
                        differences.append("the list of images changed")
                    raise StoreMismatchError(
                        f"{self.partial} holds an interrupted extraction with other settings:\n  "
                        + "\n  ".join(differences or ["the store layout changed"])
                        + "\nUse --overwrite to discard it, or restore the old settings to resume it."
                    )
                shutil.rmtree(self.partial)
        if not manifest_path.is_file():
            self.partial.mkdir(parents=True, exist_ok=True)
            _atomic_write(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True)))
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

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **payload)

        _atomic_write(target, write)
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
            guarded = _GuardedFile(tmp)
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
            writers: dict[str, _ChunkWriter] = {}
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
                                writers[name] = _ChunkWriter(layers.create_dataset(
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

        _atomic_write(self.path, write)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.up_to_date = True
        return self.path
