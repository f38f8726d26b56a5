"""The legacy .pth reader refuses hostile tensor layouts before it views any memory.

The files are written here the way `torch.save(..., _use_new_zipfile_serialization=False)` writes them,
without torch: a stand-in `torch` module (only while the file is pickled) gives the pickle the globals
the reader expects.
"""

import collections
import io
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from toolkit.errors import CellfuseError
from toolkit.pth import MAGIC_NUMBER, PROTOCOL_VERSION, load_state_dict

STORAGE = np.arange(6, dtype=np.float32)  # every tensor below views this one storage, key "0"


def _global(module: types.ModuleType, obj):
    """Make `obj` picklable by reference as `module.<name>`."""
    obj.__module__, obj.__qualname__ = module.__name__, obj.__name__
    setattr(module, obj.__name__, obj)
    return obj


@pytest.fixture
def write_pth(monkeypatch):
    """write_pth(path, {name: (offset, size, stride)}, storage_type=...) -> path."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    storage_types = {name: _global(torch, type(name, (), {}))
                     for name in ("FloatStorage", "ComplexFloatStorage")}

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called: the reader resolves this name itself")

    rebuild = _global(utils, _rebuild_tensor_v2)

    class Tensor:
        def __init__(self, offset, size, stride):
            self.layout = (offset, size, stride)

        def __reduce__(self):
            return rebuild, ("storage-0", *self.layout, False, collections.OrderedDict())

    def write(path, tensors, storage_type="FloatStorage", numel=STORAGE.size):
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if obj == "storage-0":
                    return ("storage", storage_types[storage_type], "0", "cpu", numel)
                return None

        buf = io.BytesIO()
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(obj, buf, protocol=2)
        Pickler(buf, protocol=2).dump(collections.OrderedDict(
            (name, Tensor(*layout)) for name, layout in tensors.items()))
        pickle.dump(["0"], buf, protocol=2)
        buf.write(struct.pack("<q", numel) + STORAGE.astype("<f4").tobytes())
        path.write_bytes(buf.getvalue())
        return path

    return write


def test_strided_views_load_as_torch_would_give_them(tmp_path, write_pth):
    path = write_pth(tmp_path / "good.pth", {
        "whole": (0, (2, 3), (3, 1)),
        "transposed": (0, (3, 2), (1, 3)),
        "tail": (4, (2,), (1,)),
        "scalar": (5, (), ()),
        "empty": (6, (0, 4), (4, 1)),
        "unit_dim": (0, (1, 3), (2**70, 1)),  # a size-1 dimension never steps: its stride is unused
    })
    state = load_state_dict(path)
    np.testing.assert_array_equal(state["whole"], STORAGE.reshape(2, 3))
    np.testing.assert_array_equal(state["transposed"], STORAGE.reshape(2, 3).T)
    np.testing.assert_array_equal(state["tail"], [4, 5])
    assert state["scalar"] == 5 and state["scalar"].shape == ()
    assert state["empty"].shape == (0, 4)
    np.testing.assert_array_equal(state["unit_dim"], [[0, 1, 2]])


@pytest.mark.parametrize("layout, message", [
    ((0, (4,), (-1,)), "negative offset, size or stride"),  # would read 3 elements before the buffer
    ((0, (4_000_000,), (-1,)), "negative offset, size or stride"),  # the one that segfaulted
    ((-2, (2,), (1,)), "negative offset, size or stride"),
    ((0, (-1,), (1,)), "negative offset, size or stride"),
    ((5, (4,), (1,)), r"reaches element 8 of a storage of 6"),  # offset + size past the end
    ((9, (), ()), r"reaches element 9 of a storage of 6"),  # offset past the end
    ((0, (7,), (1,)), r"has 7 elements, more than its storage's 6"),  # size past the end
    ((0, (2, 3), (3, 2)), r"reaches element 7 of a storage of 6"),  # strides past the end
    ((0, (2**40,), (0,)), r"has 1099511627776 elements"),  # 4 TiB asked of a 24-byte storage
    ((0, (2**32, 2**32), (0, 0)), r"has 18446744073709551616 elements"),  # overflows int64
    ((0, (2, 3), (3,)), "malformed layout"),
    ((0.5, (2,), (1,)), "malformed layout"),
])
def test_a_tensor_outside_its_storage_is_refused_naming_it(tmp_path, write_pth, layout, message):
    path = write_pth(tmp_path / "hostile.pth", {"ok": (0, (6,), (1,)), "blocks.0.weight": layout})
    with pytest.raises(CellfuseError, match=message) as e:
        load_state_dict(path)
    assert str(e.value).startswith(f"{path}: tensor 'blocks.0.weight'") and "\n" not in str(e.value)


def test_an_unknown_tensor_type_is_refused(tmp_path, write_pth):
    path = write_pth(tmp_path / "complex.pth", {"w": (0, (3,), (1,))}, storage_type="ComplexFloatStorage")
    with pytest.raises(CellfuseError, match=r"complex.pth: unsupported tensor type torch.ComplexFloatStorage"):
        load_state_dict(path)


def test_a_negative_storage_length_is_refused(tmp_path, write_pth):
    path = write_pth(tmp_path / "negative.pth", {"w": (0, (3,), (1,))}, numel=-1)
    with pytest.raises(CellfuseError, match=r"negative.pth: storage 0 has a negative element count"):
        load_state_dict(path)


def test_a_real_weight_package_still_loads():
    from toolkit.backbones import lite_package_file

    try:
        path = lite_package_file("efficientnet-lite0")
    except CellfuseError as e:
        pytest.skip(str(e))
    state = load_state_dict(path)
    assert len(state) > 200 and state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype == np.float32)
