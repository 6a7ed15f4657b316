"""Fuzz the restricted ``.pth`` reader; run as a child process by tests/test_reliability.py,
so that a crash (a segfault) fails the test instead of killing the test session.

``python tests/pth_fuzz.py OUT_DIR SEED`` writes crafted checkpoints into OUT_DIR, loads
each, and prints one JSON object: how many loaded, how many were refused with a
``CheckpointError`` naming the file, and every case that did anything else.

Every storage holds the numbers 0..n-1 (exact in each dtype used), so an array that
loaded with any other value was read from outside its storage.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from extract.torch_weights import LEGACY_MAGIC_NUMBER, CheckpointError, load_state_dict

# Module objects named like torch's, so pickle writes the globals torch.save writes; they
# are in sys.modules only while a checkpoint is written (see ``fake_torch``).
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


@contextlib.contextmanager
def fake_torch():
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, torch_utils
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")


_rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "HalfStorage": np.float16, "ByteStorage": np.uint8,
          "IntStorage": np.int32, "BoolStorage": np.bool_, "DoubleStorage": np.float64}
for _name in DTYPES:
    setattr(torch, _name, type(_name, (), {"__module__": "torch"}))


class Storage:
    def __init__(self, key, kind, numel, data_numel=None):
        self.key, self.kind, self.numel = key, kind, numel
        count = max(numel if data_numel is None else data_numel, 0)
        self.data = (np.arange(count) % (2 if kind in ("ByteStorage", "BoolStorage") else 64)).astype(DTYPES[kind])


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return _rebuild_tensor_v2, self.args


def _pickler(handle):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
            return None

    return Pickler(handle, protocol=2)


def legacy_bytes(tensors: dict, storages: list[Storage]) -> bytes:
    with fake_torch():
        return _legacy_bytes(tensors, storages)


def zip_bytes(tensors: dict, storages: list[Storage]) -> bytes:
    with fake_torch():
        return _zip_bytes(tensors, storages)


def _legacy_bytes(tensors: dict, storages: list[Storage]) -> bytes:
    handle = io.BytesIO()
    for header in (LEGACY_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, handle, protocol=2)
    _pickler(handle).dump(OrderedDict(tensors))
    pickle.dump([s.key for s in storages], handle, protocol=2)
    for storage in storages:
        handle.write(struct.pack("<q", len(storage.data)) + storage.data.tobytes())
    return handle.getvalue()


def _zip_bytes(tensors: dict, storages: list[Storage]) -> bytes:
    pkl = io.BytesIO()
    _pickler(pkl).dump(OrderedDict(tensors))
    handle = io.BytesIO()
    with zipfile.ZipFile(handle, "w") as archive:
        archive.writestr("w/data.pkl", pkl.getvalue())
        for storage in storages:
            archive.writestr(f"w/data/{storage.key}", storage.data.tobytes())
    return handle.getvalue()


BOUNDARY_SIZES = [(), (0,), (1,), (4,), (5,), (2, 2), (2, 3), (4, 1), (1, 4), (3, 0), (2, 2, 2), (1 << 31,), (1 << 62,), (-1,), (2, -2)]
BOUNDARY_STRIDES = [(), (0,), (1,), (2,), (3,), (4,), (-1,), (1 << 40,), (2, 1), (1, 2), (0, 0), (4, 1), (-1, 1), (1 << 61, 1), (2, 2, 1)]
BOUNDARY_OFFSETS = [0, 1, 3, 4, 5, -1, -4, 1 << 31, 1 << 62, (1 << 63) - 1]
WEIRD = [None, "3", 2.5, True, [1], {"a": 1}, b"\x00", 1 << 70, -(1 << 70)]


def cases(seed: int):
    """(name, bytes) of every crafted checkpoint."""
    rng = np.random.default_rng(seed)
    tiny = Storage("0", "FloatStorage", 4)
    for fmt, writer in (("legacy", legacy_bytes), ("zip", zip_bytes)):
        for size in BOUNDARY_SIZES:
            for stride in BOUNDARY_STRIDES:
                for offset in BOUNDARY_OFFSETS:
                    yield f"{fmt}-size{size}-stride{stride}-offset{offset}", writer({"w": Tensor(tiny, offset, size, stride)}, [tiny])
        for weird in WEIRD:
            yield f"{fmt}-weird-offset-{weird!r:.20}", writer({"w": Tensor(tiny, weird, (2,), (1,))}, [tiny])
            yield f"{fmt}-weird-size-{weird!r:.20}", writer({"w": Tensor(tiny, 0, (weird,), (1,))}, [tiny])
            yield f"{fmt}-weird-stride-{weird!r:.20}", writer({"w": Tensor(tiny, 0, (2,), weird)}, [tiny])
            odd = Storage("0", "FloatStorage", weird, data_numel=4)
            yield f"{fmt}-weird-numel-{weird!r:.20}", writer({"w": Tensor(odd, 0, (2,), (1,))}, [odd])
        # A storage whose declared size is not what the file holds: 1 KB claimed, 4 bytes present.
        liar = Storage("0", "FloatStorage", 256, data_numel=1)
        yield f"{fmt}-storage-claims-more-than-it-holds", writer({"w": Tensor(liar, 0, (16, 16), (16, 1))}, [liar])
        # One storage, several dtypes and tensors, random views.
        for n in range(150):
            kind = str(rng.choice(list(DTYPES)))
            numel = int(rng.integers(0, 40))
            storage = Storage("0", kind, numel)
            tensors = {}
            for t in range(int(rng.integers(1, 4))):
                ndim = int(rng.integers(0, 4))
                size = tuple(int(rng.choice([rng.integers(0, 6), rng.integers(-3, 3), 1 << int(rng.integers(20, 63))])) for _ in range(ndim))
                stride = tuple(int(rng.choice([rng.integers(0, 12), -int(rng.integers(1, 4)), 1 << int(rng.integers(20, 62))])) for _ in range(int(rng.choice([ndim, ndim, ndim + 1]))))
                offset = int(rng.choice([rng.integers(0, 45), -int(rng.integers(1, 5)), 1 << int(rng.integers(20, 63))]))
                tensors[f"t{t}"] = Tensor(storage, offset, size, stride)
            yield f"{fmt}-random-{n}", writer(tensors, [storage])
    # Truncated and bit-flipped real-looking checkpoints of both formats.
    storage = Storage("0", "FloatStorage", 24)
    good = {"conv.weight": Tensor(storage, 0, (2, 3, 2, 2), (12, 4, 2, 1)), "t": Tensor(storage, 2, (3, 2), (1, 3))}
    for fmt, data in (("legacy", legacy_bytes(good, [storage])), ("zip", zip_bytes(good, [storage]))):
        yield f"{fmt}-intact", data
        for cut in range(0, len(data), max(1, len(data) // 120)):
            yield f"{fmt}-truncated-at-{cut}", data[:cut]
        for n in range(150):
            flipped = bytearray(data)
            for position in rng.integers(0, len(data), int(rng.integers(1, 4))):
                flipped[position] = int(rng.integers(0, 256))
            yield f"{fmt}-flipped-{n}", bytes(flipped)
    for n in range(20):
        yield f"garbage-{n}", rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()
    yield "empty", b""


def main(out_dir: str, seed: int) -> None:
    out = Path(out_dir)
    loaded, refused, wrong = 0, 0, []
    for number, (name, data) in enumerate(cases(seed)):
        path = out / f"case-{number:05d}.pth"
        path.write_bytes(data)
        try:
            state = load_state_dict(path)
        except CheckpointError as error:
            message = str(error)
            if str(path) not in message or "\n" in message:
                wrong.append(f"{name}: message does not name the file on one line: {message[:200]}")
            refused += 1
        except Exception as error:  # noqa: BLE001 - the point: nothing but CheckpointError
            wrong.append(f"{name}: {type(error).__name__}: {str(error)[:200]}")
        else:
            loaded += 1
            for key, array in state.items() if "flipped" not in name else ():  # flips change the storage too
                values = np.asarray(array, dtype=np.float64).ravel()
                if values.size and (values.min() < 0 or values.max() >= 64 or not np.all(values == np.round(values))):
                    wrong.append(f"{name}: {key} holds values from outside its storage")
        path.unlink()
    print(json.dumps({"loaded": loaded, "refused": refused, "wrong": wrong}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
