"""``FeatureStore``: a complete store, read without trusting it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from extract.datasets.base import index_digest
from extract.fileio import DEFLATE_RATIO
from extract.store.schema import CHUNK_BYTES, PLAIN_FILTERS, SCHEMA_VERSION, StoreError, StoreMismatchError, check_same_settings


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
    a store made for another one (renamed or copied) is refused. ``expect``: the fingerprint the
    caller needs (its settings now, a saved probe's, another store's); a store made otherwise is
    refused with every setting that differs, ``expected_by`` naming whose they are (default: the caller's) and ``fix`` what
    to do. Any fault is one ``StoreError``."""

    def __init__(self, path: str | Path, *, dataset: str | None = None, expect: dict | None = None,
                 expected_by: str | None = None, fix: str = "Extract it again with the same settings, or pass OVERWRITE=1."):
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
            if expect is not None:
                check_same_settings(expect, self.fingerprint, subject=f"{self.path} holds features made with other settings" + (f" than {expected_by}" if expected_by else ""),
                                    fix=fix)
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
