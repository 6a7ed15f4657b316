"""Read PyTorch ``.pth`` state dicts into NumPy arrays without importing torch.

Both on-disk formats are handled:

* the legacy format (torch < 1.6): a stream of pickles followed by raw storages;
* the zip format (torch >= 1.6): ``*/data.pkl`` plus one file per storage.

Unpickling is restricted to an explicit allow-list of globals, and every allowed
global is replaced by a NumPy stand-in, so a checkpoint can never run code. The numbers
a checkpoint gives (storage sizes, tensor offsets, sizes and strides) are checked against
the bytes actually present before any array is built, and tensors are gathered with
bounds-checked indexing, never ``as_strided``: whatever a file holds, reading it ends in
arrays or in one ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import errno
import io
import lzma
import math
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extract.errors import UserError

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


# The pickle of a zip checkpoint may not unpack to more than this.
MAX_PICKLE_BYTES = 1 << 28


class CheckpointError(UserError, pickle.UnpicklingError):
    """A ``.pth`` file is not a usable PyTorch checkpoint: truncated, malformed or crafted.
    The message names the file."""


class UnsafeCheckpointError(CheckpointError):
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
        """The tensor's elements, gathered from its storage after checking every index is inside it."""
        flat = self.storage.data
        if flat is None:
            raise CheckpointError(f"storage {self.storage.key!r} has no data in the checkpoint")
        if len(self.size) != len(self.stride):
            raise CheckpointError(f"a tensor has {len(self.size)} sizes but {len(self.stride)} strides")
        if any(n < 0 for n in self.size) or any(s < 0 for s in self.stride) or self.offset < 0:
            raise CheckpointError(f"a tensor has a negative size, stride or offset: size {self.size}, stride {self.stride}, offset {self.offset}")
        if not self.size:
            if self.offset >= len(flat):
                raise CheckpointError(f"a scalar at offset {self.offset} of storage {self.storage.key!r}, which holds {len(flat)}")
            return flat[self.offset].copy()
        count = math.prod(self.size)
        if count == 0:
            return np.zeros(self.size, dtype=flat.dtype)
        if count > len(flat):  # only an expanded (stride 0) view could; state dicts hold none
            raise CheckpointError(f"a tensor of size {self.size} has {count} elements, more than its storage {self.storage.key!r} holds ({len(flat)})")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= len(flat):
            raise CheckpointError(
                f"a tensor of size {self.size}, stride {self.stride} at offset {self.offset} reaches element {last} "
                f"of storage {self.storage.key!r}, which holds {len(flat)}"
            )
        contiguous = tuple(math.prod(self.size[axis + 1 :]) for axis in range(len(self.size)))
        if all(n == 1 or s == c for n, s, c in zip(self.size, self.stride, contiguous)):
            return flat[self.offset : self.offset + count].reshape(self.size).copy()
        index = np.full((1,) * len(self.size), self.offset, dtype=np.int64)
        for axis, (n, s) in enumerate(zip(self.size, self.stride)):
            shape = [1] * len(self.size)
            shape[axis] = n
            index = index + (np.arange(n, dtype=np.int64) * s).reshape(shape)
        return flat[index]  # fancy indexing copies, and checks the bounds once more


def _checked_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CheckpointError(f"a tensor's {what} is {value!r}, not an integer")
    if not -(1 << 62) < int(value) < 1 << 62:
        raise CheckpointError(f"a tensor's {what} {value} is out of range")
    return int(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor is built on {type(storage).__name__}, not on a storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise CheckpointError(f"a tensor's size and stride must be sequences, found {type(size).__name__} and {type(stride).__name__}")
    return _TensorView(
        storage, _checked_int(storage_offset, "offset"),
        tuple(_checked_int(n, "size") for n in size), tuple(_checked_int(s, "stride") for s in stride),
    )


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
            raise CheckpointError(f"unsupported persistent id in checkpoint: {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type in checkpoint: {storage_type!r:.80}")
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise CheckpointError(f"a storage key is {key!r:.80}, not a name")
        numel = _checked_int(numel, "storage size")
        if numel < 0:
            raise CheckpointError(f"storage {key!r} has a negative size {numel}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, numel)
        elif self._storages[key].dtype != storage_type.dtype:
            raise CheckpointError(f"storage {key!r} is given two dtypes")
        return self._storages[key]


def _plain_load(file):
    """Load a pickle that must not name any global at all (headers, key lists)."""

    class _NoGlobals(pickle.Unpickler):
        def find_class(self, module, name):
            raise UnsafeCheckpointError(f"checkpoint header refers to the global {module}.{name}")

    return _NoGlobals(file).load()


def _storage_array(raw: bytes, storage: _Storage) -> np.ndarray:
    nbytes = storage.numel * np.dtype(storage.dtype).itemsize
    if len(raw) < nbytes:
        raise CheckpointError(f"checkpoint is truncated inside storage {storage.key!r}: {len(raw)} of {nbytes} bytes")
    return np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)


def _load_legacy(file, size: int) -> tuple[object, dict[str, _Storage]]:
    magic = _plain_load(file)
    if magic != LEGACY_MAGIC_NUMBER:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    protocol = _plain_load(file)
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"unsupported legacy protocol version {protocol!r:.40}")
    sys_info = _plain_load(file)
    if not isinstance(sys_info, dict):
        raise CheckpointError("malformed legacy header")
    if not sys_info.get("little_endian", True):
        raise CheckpointError("big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(file, storages).load()
    keys = _plain_load(file)
    if not isinstance(keys, (list, tuple)):
        raise CheckpointError("malformed list of storages")
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"the checkpoint holds data for storage {key!r:.40}, which no tensor uses")
        header = file.read(8)
        if len(header) != 8:
            raise CheckpointError(f"checkpoint is truncated before storage {storage.key!r}")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise CheckpointError(f"storage {storage.key!r} holds {numel} elements, its tensors say {storage.numel}")
        nbytes = numel * np.dtype(storage.dtype).itemsize
        if nbytes > size - file.tell():
            raise CheckpointError(f"checkpoint is truncated inside storage {storage.key!r}")
        storage.data = _storage_array(file.read(nbytes), storage)
    return obj, storages


def _load_zip(path: Path) -> tuple[object, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"expected one data.pkl in the zip checkpoint, found {pickles[:5]}")
        prefix = pickles[0][: -len("data.pkl")]
        if archive.getinfo(pickles[0]).file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{pickles[0]} unpacks to more than {MAX_PICKLE_BYTES} bytes")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, storage in storages.items():
            try:
                entry = archive.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointError(f"storage {key!r} has no data in the checkpoint") from None
            if entry.file_size > storage.numel * np.dtype(storage.dtype).itemsize:
                raise CheckpointError(f"storage {key!r} unpacks to {entry.file_size} bytes, more than its {storage.numel} elements")
            storage.data = _storage_array(archive.read(entry), storage)
    return obj, storages


def load_state_dict(path: str | Path) -> "OrderedDict[str, np.ndarray]":
    """Return the ``name -> array`` mapping stored in a PyTorch checkpoint.

    Raises ``UnsafeCheckpointError`` if the file names a global outside the allow-list,
    and ``CheckpointError`` (naming the file) for any other malformed, truncated or
    crafted content.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            obj, _ = _load_zip(path)
        else:
            with path.open("rb") as file:
                obj, _ = _load_legacy(file, path.stat().st_size)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"expected a state dict, found {type(obj).__name__}")
        return OrderedDict(
            (str(name), value.to_numpy()) for name, value in obj.items() if isinstance(value, _TensorView)
        )
    except CheckpointError as error:
        raise type(error)(f"{path}: {error}; {_FIX}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OverflowError,
            MemoryError, RecursionError, UnicodeDecodeError, zlib.error, lzma.LZMAError, OSError) as error:
        if isinstance(error, PermissionError) or (isinstance(error, OSError) and error.errno == errno.EIO):
            raise  # the file system, not the file's content: let the caller report it
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {reason}); {_FIX}") from None


_FIX = "pass a .pth saved by torch.save(model.state_dict()), or WEIGHTS=imagenet for the packaged weights"
