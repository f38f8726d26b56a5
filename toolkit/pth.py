"""Read a PyTorch state dict saved in the legacy (pre-zip) .pth format, without torch.

The layout (torch.serialization's `_legacy_save`): three small pickles (magic number, protocol
version, system info), the pickled state dict whose tensors are `torch._utils._rebuild_tensor_v2`
calls on storages named by persistent ids `("storage", torch.FloatStorage, key, location, numel)`,
a pickled list of storage keys, then for each key an int64 element count and the raw little-endian
data. The unpickler below resolves only the globals such a state dict needs; anything else (os.system,
builtins.eval, ...) is refused, so reading a hostile file never runs its code. Every tensor's offset,
sizes and strides are checked to stay inside its storage before its memory is viewed, so a hostile file
cannot make the reader touch memory outside the bytes it read.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import CellfuseError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_requires_grad_and_hooks):
    return _TensorRef(storage, storage_offset, size, stride)  # checked by _check_layout/_check_tensor


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name.endswith("Storage"):
            raise CellfuseError(f"{self.path}: unsupported tensor type torch.{name}; "
                                f"known: {', '.join(sorted(STORAGE_DTYPES))}")
        raise CellfuseError(f"{self.path}: refused to load: its pickle asks for {module}.{name}, "
                            "which a PyTorch state dict never needs")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or (len(pid) > 5 and pid[5] is not None)):
            raise CellfuseError(f"{self.path}: unsupported storage reference {pid!r:.80}")
        return _Storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def load_state_dict(path: str | Path, sha256_prefix: str | None = None) -> dict[str, np.ndarray]:
    """{tensor name: array} from a legacy .pth; `sha256_prefix` (hex) is checked when given."""
    path = Path(path)
    if not path.is_file():
        raise CellfuseError(f"{path}: weights file not found")
    data = path.read_bytes()
    if sha256_prefix and not hashlib.sha256(data).hexdigest().startswith(sha256_prefix.lower()):
        raise CellfuseError(f"{path}: sha256 does not start with {sha256_prefix} (the prefix in its "
                            "name): the file is corrupt or was replaced; reinstall its package")
    if data[:2] == b"PK":
        raise CellfuseError(f"{path}: a zip-format .pth (torch >= 1.6); only the legacy format is read "
                            "here (save with torch.save(..., _use_new_zipfile_serialization=False))")
    try:
        return _parse(io.BytesIO(data), path)
    except CellfuseError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError,
            KeyError, struct.error, MemoryError) as e:
        raise CellfuseError(f"{path}: not a readable legacy PyTorch .pth ({type(e).__name__}: "
                            f"{str(e)[:120]}); truncated or another format?") from None


def _parse(f: io.BytesIO, path: Path) -> dict[str, np.ndarray]:
    header = [_RestrictedUnpickler(f, path).load() for _ in range(3)]
    if header[0] != MAGIC_NUMBER or header[1] != PROTOCOL_VERSION:
        raise CellfuseError(f"{path}: not a legacy PyTorch .pth (no magic number / protocol {PROTOCOL_VERSION})")
    state = _RestrictedUnpickler(f, path).load()
    if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
        raise CellfuseError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for name, ref in state.items():
        _check_layout(path, name, ref)
    keys = _RestrictedUnpickler(f, path).load()
    storages = {}
    wanted = {ref.storage.key: ref.storage for ref in state.values()}
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        if numel < 0:
            raise CellfuseError(f"{path}: storage {key} has a negative element count ({numel})")
        storage = wanted.get(key)
        itemsize = np.dtype(storage.dtype if storage else np.uint8).itemsize
        raw = f.read(numel * itemsize)
        if len(raw) != numel * itemsize:
            raise CellfuseError(f"{path}: truncated (storage {key} needs {numel * itemsize} bytes, "
                                f"{len(raw)} left)")
        if storage:
            storages[key] = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    missing = set(wanted) - set(storages)
    if missing:
        raise CellfuseError(f"{path}: storages {sorted(missing)[:3]} are listed by tensors but not stored")
    for name, ref in state.items():
        _check_tensor(path, name, ref, len(storages[ref.storage.key]))
    return {name: _materialise(ref, storages[ref.storage.key]) for name, ref in state.items()}


def _check_layout(path: Path, name: str, ref: _TensorRef) -> None:
    """Offset, sizes and strides are non-negative integers, one stride per dimension."""
    def ints(xs):
        return isinstance(xs, tuple) and all(type(x) is int for x in xs)

    where = f"{path}: tensor {name!r}"
    if not isinstance(ref.storage, _Storage):
        raise CellfuseError(f"{where} has no storage (got {type(ref.storage).__name__})")
    if type(ref.offset) is not int or not ints(ref.size) or not ints(ref.stride) or len(ref.size) != len(ref.stride):
        raise CellfuseError(f"{where} has a malformed layout (offset {ref.offset!r:.40}, size {ref.size!r:.80}, "
                            f"stride {ref.stride!r:.80})")
    if ref.offset < 0 or any(n < 0 for n in ref.size + ref.stride):
        raise CellfuseError(f"{where} has a negative offset, size or stride (offset {ref.offset}, size "
                            f"{ref.size}, stride {ref.stride})")


def _check_tensor(path: Path, name: str, ref: _TensorRef, storage_len: int) -> None:
    """Every element the tensor's view can reach lies inside its storage (checked before viewing memory)."""
    where = f"{path}: tensor {name!r} (offset {ref.offset}, size {ref.size}, stride {ref.stride})"
    count = math.prod(ref.size)  # Python ints: no overflow, however large the claimed size
    # A saved state dict never repeats elements (stride 0); refusing more elements than the storage holds
    # also bounds the memory a small file can make the reader allocate.
    if count > storage_len:
        raise CellfuseError(f"{where} has {count} elements, more than its storage's {storage_len}")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if ref.offset > storage_len or (count and last >= storage_len):
        raise CellfuseError(f"{where} reaches element {max(last, ref.offset)} of a storage of {storage_len}")


def _materialise(ref: _TensorRef, flat: np.ndarray) -> np.ndarray:
    dtype = flat.dtype.newbyteorder("=")
    if math.prod(ref.size) == 0:
        return np.empty(ref.size, dtype)
    # A dimension of size 1 never steps, so its stride (unchecked by the bounds, possibly huge) is unused.
    strides = [s * flat.itemsize if n > 1 else 0 for n, s in zip(ref.size, ref.stride, strict=True)]
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.size, strides=strides)
    return np.array(view, dtype=dtype)


def sha256_prefix_in_name(path: str | Path) -> str | None:
    """The hex digits after the last '-' of `efficientnet-lite0-57934424.pth`, if they are hex."""
    tail = Path(path).stem.rpartition("-")[2]
    return tail.lower() if len(tail) >= 8 and all(c in "0123456789abcdefABCDEF" for c in tail) else None
