"""The torch-free reader of legacy (pre-zip) PyTorch checkpoints (pipeline/backbones/torch_legacy.py).

The fake checkpoints here are written with the standard-library pickle in torch's legacy
layout, so the reader is checked against a file whose exact contents the test controls
(strided views, shared storages, several dtypes) without needing torch installed.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.backbones.efficientnet_lite import LITE0_WEIGHTS_ID
from pipeline.backbones.torch_legacy import LEGACY_MAGIC_NUMBER, load_legacy_state_dict
from pipeline.backbones.weights import lite_weights_path

# ---------------------------------------------------------------------------------------
# A minimal writer of torch's legacy checkpoint format (the inverse of the reader).

def _torch_global(module: str, name: str):
    """Tag an object so the writer pickles it as the global ``module.name``."""
    def tag(obj):
        obj._torch_global = (module, name)
        return obj
    return tag


@_torch_global("torch._utils", "_rebuild_tensor_v2")
def _rebuild_tensor_v2(*args):  # never called: only its pickled name matters
    raise AssertionError("the writer's stand-in must not be executed")


@_torch_global("torch", "FloatStorage")
class FloatStorage:
    dtype = np.dtype("<f4")


@_torch_global("torch", "LongStorage")
class LongStorage:
    dtype = np.dtype("<i8")


class FakeStorage:
    """A flat storage: what torch writes after the pickle, referenced by a persistent id."""

    def __init__(self, key: str, storage_type: type, data: np.ndarray) -> None:
        self.key, self.storage_type = key, storage_type
        self.data = np.ascontiguousarray(data, dtype=storage_type.dtype).ravel()


class FakeTensor:
    """A tensor view (offset, size, stride in elements) that pickles like a torch tensor."""

    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                     collections.OrderedDict()))


class _LegacyPickler(pickle._Pickler):  # the pure-Python pickler lets save_global be overridden
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.data.size, None)
        return None

    def save_global(self, obj, name=None):
        tagged = getattr(obj, "_torch_global", None)
        if tagged is None:
            return super().save_global(obj, name)
        # Written by hand because the stock pickler would import torch to verify the name.
        self.write(pickle.GLOBAL + f"{tagged[0]}\n{tagged[1]}\n".encode())
        self.memoize(obj)

    # The dispatch table holds the base class's save_global for functions; route them here.
    dispatch = {**pickle._Pickler.dispatch, types.FunctionType: save_global}


def write_legacy_checkpoint(path: Path, state: dict, storages: list[FakeStorage],
                            magic: int = LEGACY_MAGIC_NUMBER) -> None:
    with open(path, "wb") as f:
        pickle.dump(magic, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        _LegacyPickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.tobytes())


def make_fake_checkpoint(directory: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Write a small legacy checkpoint; return its path and the arrays it must read back as."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6) * 0.5 - 3.0
    shared = FakeStorage("140001", FloatStorage, base)
    counter = FakeStorage("140002", LongStorage, np.array([7]))
    other = FakeStorage("140003", FloatStorage, np.linspace(-1, 1, 10))
    state = collections.OrderedDict()
    state["plain"] = FakeTensor(shared, 0, (4, 6), (6, 1))
    state["transposed"] = FakeTensor(shared, 0, (6, 4), (1, 6))        # same storage, .T
    state["offset_slice"] = FakeTensor(shared, 7, (2, 3), (6, 2))      # base[1:3, 1::2]
    state["broadcast"] = FakeTensor(other, 2, (3, 4), (0, 1))          # expand: stride 0
    state["a.num_batches_tracked"] = FakeTensor(counter, 0, (), ())
    state._metadata = {"": {"version": 1}}  # torch attaches this; the reader must tolerate it
    path = directory / "fake.pth"
    write_legacy_checkpoint(path, state, [shared, counter, other])
    expected = {
        "plain": base,
        "transposed": base.T,
        "offset_slice": base[1:3, 1::2],
        "broadcast": np.broadcast_to(other.data[2:6], (3, 4)),
        "a.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    return path, expected


@pytest.fixture()
def fake_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return make_fake_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------
# Reader

def test_reads_fake_checkpoint_views_and_shared_storage(fake_checkpoint) -> None:
    path, expected = fake_checkpoint
    got = load_legacy_state_dict(str(path))
    assert list(got) == list(expected)  # file order kept
    for key, want in expected.items():
        assert got[key].dtype == want.dtype, key
        assert got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    # Tensors sharing a storage come back as independent copies.
    assert not np.shares_memory(got["plain"], got["transposed"])
    assert got["transposed"].flags["C_CONTIGUOUS"]


def test_real_checkpoint_entries() -> None:
    path = lite_weights_path("efficientnet_lite0")
    assert os.path.basename(path) == LITE0_WEIGHTS_ID
    sd = load_legacy_state_dict(path)
    assert len(sd) == 296
    assert next(iter(sd)) == "_conv_stem.weight" and list(sd)[-1] == "_fc.bias"
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert sd["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn1.num_batches_tracked"].dtype == np.int64
    floats = [v for k, v in sd.items() if not k.endswith("num_batches_tracked")]
    assert len(floats) == 296 - 49  # 49 BatchNorms
    assert all(v.dtype == np.float32 for v in floats)
    assert all(np.isfinite(v).all() for v in floats)
    assert (sd["_bn1.running_var"] > 0).all()


def test_rejects_zip_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "new_style.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(ValueError, match="zip-format") as err:
        load_legacy_state_dict(str(path))
    assert str(path) in str(err.value)


def test_rejects_garbage_and_wrong_magic(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError) as err:
        load_legacy_state_dict(str(garbage))
    assert str(garbage) in str(err.value)

    wrong = tmp_path / "wrong_magic.pth"
    write_legacy_checkpoint(wrong, {}, [], magic=12345)
    with pytest.raises(ValueError, match="magic number") as err:
        load_legacy_state_dict(str(wrong))
    assert str(wrong) in str(err.value)


def test_rejects_truncated_checkpoint(tmp_path: Path, fake_checkpoint) -> None:
    path, _ = fake_checkpoint
    data = path.read_bytes()
    for cut in (len(data) - 4, len(data) // 2):
        short = tmp_path / f"short{cut}.pth"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated") as err:
            load_legacy_state_dict(str(short))
        assert str(short) in str(err.value)


def test_refuses_arbitrary_globals(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    write_legacy_checkpoint(path, {"x": Evil()}, [])
    with pytest.raises(ValueError, match="refusing to load global"):
        load_legacy_state_dict(str(path))
    assert not marker.exists()
