"""Read PyTorch ``.pth`` state dicts into NumPy arrays without importing torch.

Both on-disk formats are handled:

* the legacy format (torch < 1.6): a stream of pickles followed by raw storages;
* the zip format (torch >= 1.6): ``*/data.pkl`` plus one file per storage.

Unpickling is restricted to an explicit allow-list of globals, and every allowed
global is replaced by a NumPy stand-in, so a checkpoint can never run code.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint names a global outside the allow-list."""


@dataclass
class _StorageType:
    dtype: type


@dataclass
class _Storage:
    key: str
    dtype: type
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorView:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key!r} has no data in the checkpoint")
        if not self.size:
            return flat[self.offset].copy()
        itemsize = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride]
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _TensorView(storage, int(storage_offset), tuple(size), tuple(stride))


def _ordered_dict(*args):
    return OrderedDict(*args)


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(f"{m}.{n}" for m, n in ALLOWED_GLOBALS)
            raise UnsafeCheckpointError(
                f"checkpoint refers to the global {module}.{name}, which is not allowed; "
                f"only these are: {allowed}"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type in checkpoint: {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, int(numel))
        return self._storages[key]


def _plain_load(file):
    """Load a pickle that must not name any global at all (headers, key lists)."""

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise UnsafeCheckpointError(f"checkpoint header refers to the global {module}.{name}")

    return _NoGlobals(file).load()


def _load_legacy(file) -> tuple[object, dict[str, _Storage]]:
    magic = _plain_load(file)
    if magic != LEGACY_MAGIC_NUMBER:
        raise pickle.UnpicklingError("not a PyTorch checkpoint (bad magic number)")
    protocol = _plain_load(file)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise pickle.UnpicklingError(f"unsupported legacy protocol version {protocol}")
    sys_info = _plain_load(file)
    if not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(file, storages).load()
    for key in _plain_load(file):
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", file.read(8))
        nbytes = numel * np.dtype(storage.dtype).itemsize
        raw = file.read(nbytes)
        if len(raw) != nbytes:
            raise pickle.UnpicklingError(f"checkpoint is truncated inside storage {key!r}")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return obj, storages


def _load_zip(path: Path) -> tuple[object, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{path}: expected one data.pkl in the zip checkpoint, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            raw = archive.read(f"{prefix}data/{key}")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)[: storage.numel]
    return obj, storages


def load_state_dict(path: str | Path) -> "OrderedDict[str, np.ndarray]":
    """Return the ``name -> array`` mapping stored in a PyTorch checkpoint.

    Raises ``UnsafeCheckpointError`` if the file names a global outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if zipfile.is_zipfile(path):
        obj, _ = _load_zip(path)
    else:
        with path.open("rb") as file:
            obj, _ = _load_legacy(file)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return OrderedDict(
        (name, value.to_numpy()) for name, value in obj.items() if isinstance(value, _TensorView)
    )
