"""Read a legacy (pre-1.6, non-zip) PyTorch checkpoint into NumPy arrays, without torch.

Only ``torch.save`` files in the old sequential format are supported. Their layout is::

    pickle(magic number) pickle(protocol version) pickle(sys info)
    pickle(state dict)            # tensors point at storages through persistent ids
    pickle(list of storage keys)
    for each key, in that order:  int64 LE element count, then the raw LE element bytes

The state-dict pickle is read with a restricted unpickler: the only globals it will resolve
are the handful torch writes for a plain state dict (``collections.OrderedDict``, the tensor
rebuild functions, the ``torch.*Storage`` types), and those resolve to harmless stand-ins
defined here. Any other global is refused, so a malicious file cannot execute code.
"""
from __future__ import annotations

import collections
import pickle
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage class name -> NumPy dtype of its elements (all stored little-endian).
# BFloat16 has no NumPy dtype and is deliberately absent: it is refused with a clear error.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.XStorage`` class: it only records the element dtype."""

    name: str
    dtype: np.dtype


@dataclass
class _StorageRef:
    """A storage named by the pickle; its bytes come after the pickle, so it starts empty."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None  # 1-D, filled in once the raw storage section is read


@dataclass(frozen=True)
class _StorageView:
    """``numel`` elements of ``root`` from ``start`` (how torch < 0.4 pickled storage views)."""

    root: _StorageRef
    start: int
    numel: int

    @property
    def data(self) -> np.ndarray | None:
        if self.root.data is None:
            return None
        return self.root.data[self.start:self.start + self.numel]


@dataclass(frozen=True)
class _TensorRef:
    """A tensor as (storage, offset, size, stride), all in elements; materialised later."""

    storage: _StorageRef | _StorageView
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: _StorageRef, storage_offset: int, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view, copies nothing."""
    if not isinstance(storage, (_StorageRef, _StorageView)):
        raise pickle.UnpicklingError("tensor does not reference a storage")
    size_t, stride_t = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size_t) != len(stride_t):
        raise pickle.UnpicklingError(f"tensor size {size_t} and stride {stride_t} differ in rank")
    return _TensorRef(storage, int(storage_offset), size_t, stride_t)


def _rebuild_parameter(data: _TensorRef, requires_grad: Any = False,
                       backward_hooks: Any = None) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its tensor here."""
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("parameter does not wrap a tensor")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the torch globals of a plain state dict (see module doc)."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        **{("torch", name): _StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    }

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            # Never fall back to importing: that is how pickles execute arbitrary code.
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> _StorageRef | _StorageView:
        if not isinstance(pid, tuple) or len(pid) < 5 or _as_str(pid[0]) != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r:.80}")
        key = _as_str(key)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _StorageRef(key, storage_type.dtype, int(numel))
        if view_metadata is None:
            return root
        # Very old files pickled storage *views* as (view_key, offset, size) of a root
        # storage; the view is a slice of the root's data once that has been read.
        view_key, start, view_numel = view_metadata
        start, view_numel = int(start), int(view_numel)
        if start < 0 or view_numel < 0 or start + view_numel > root.numel:
            raise pickle.UnpicklingError(f"storage view {view_metadata!r:.80} exceeds its root")
        return _StorageView(root, start, view_numel)


def _as_str(value: Any) -> str:
    """Python-2 era pickles may hold bytes where torch now writes str."""
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _materialise(tensor: _TensorRef, path: str, name: str) -> np.ndarray:
    """Copy the (offset, size, stride) view out of its storage as a C-contiguous array."""
    data = tensor.storage.data
    assert data is not None  # every referenced storage was read before this is called
    if any(s < 0 for s in tensor.size) or any(s < 0 for s in tensor.stride) or tensor.offset < 0:
        raise ValueError(f"{path}: tensor {name!r} has a negative size, stride or offset")
    if 0 in tensor.size:
        return np.zeros(tensor.size, dtype=data.dtype)
    # Last element touched by the view must lie inside the storage, else as_strided would
    # read out of bounds memory instead of failing.
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= data.size:
        raise ValueError(f"{path}: tensor {name!r} reaches element {last} of a storage "
                         f"of {data.size} elements")
    base = data[tensor.offset:]
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base, shape=tensor.size, strides=tuple(s * itemsize for s in tensor.stride),
        writeable=False)
    # np.array copies, so the result owns its memory and does not alias other tensors.
    return np.array(view, order="C").astype(data.dtype.newbyteorder("="), copy=False)


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise ValueError(f"{path}: truncated checkpoint: expected {n} bytes of {what}, "
                         f"got {len(buf)}")
    return buf


def load_legacy_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a legacy-format ``torch.save`` state dict as ``{name: ndarray}`` in file order.

    Arrays keep torch's shape and dtype (e.g. float32 weights, int64
    ``num_batches_tracked`` scalars with shape ``()``); each is an independent C-contiguous
    copy. Raises ``ValueError`` naming ``path`` for a zip (new-style) checkpoint, a wrong
    magic number, a truncated or corrupt file, or any global outside a plain state dict.
    """
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            raise ValueError(f"{path}: this is a zip-format (torch >= 1.6) checkpoint; only the "
                             "legacy format is supported (re-save with "
                             "_use_new_zipfile_serialization=False)")
        f.seek(0)
        try:
            return _load(f, path)
        except (pickle.UnpicklingError, EOFError, struct.error, TypeError, AttributeError,
                IndexError, KeyError, UnicodeDecodeError, OverflowError) as exc:
            # Corrupt pickles surface as many exception types; report them all alike.
            raise ValueError(f"{path}: not a readable legacy torch checkpoint (truncated or "
                             f"corrupt): {type(exc).__name__}: {exc}") from exc


def _load(f: BinaryIO, path: str) -> dict[str, np.ndarray]:
    magic = _RestrictedUnpickler(f).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise ValueError(f"{path}: not a legacy torch checkpoint (wrong magic number)")
    protocol = _RestrictedUnpickler(f).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported torch checkpoint protocol {protocol!r}")
    sys_info = _RestrictedUnpickler(f).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise ValueError(f"{path}: big-endian checkpoints are not supported")

    unpickler = _RestrictedUnpickler(f)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list):
        raise ValueError(f"{path}: storage key list is missing")

    # Storages follow in the order of the key list, each as an element count + raw bytes.
    for key in keys:
        key = _as_str(key)
        storage = unpickler.storages.get(key)
        if storage is None:
            raise ValueError(f"{path}: storage {key!r} is not referenced by the state dict")
        (numel,) = struct.unpack("<q", _read_exact(f, 8, path, f"storage {key} header"))
        if numel != storage.numel:
            raise ValueError(f"{path}: storage {key!r} holds {numel} elements, "
                             f"the state dict expects {storage.numel}")
        raw = _read_exact(f, numel * storage.dtype.itemsize, path, f"storage {key}")
        storage.data = np.frombuffer(raw, dtype=storage.dtype)
    missing = [k for k, s in unpickler.storages.items() if s.data is None]
    if missing:
        raise ValueError(f"{path}: truncated checkpoint: storages {missing[:3]} have no data")

    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise ValueError(f"{path}: state-dict entry {name!r} is not a tensor")
        out[str(name)] = _materialise(value, path, str(name))
    return out


__all__ = ["load_legacy_state_dict", "LEGACY_MAGIC_NUMBER", "STORAGE_DTYPES"]
