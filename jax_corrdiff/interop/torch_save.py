"""Write a state dict in PyTorch's zip checkpoint format without importing torch.

The inverse of :mod:`jax_corrdiff.interop.torch_pickle`'s zip reader, laid out as
``torch.save`` (torch >= 1.6) writes it, so that ``torch.load(..., weights_only=True)``
accepts it:

* ``archive/data.pkl`` -- a protocol-2 pickle of ``collections.OrderedDict`` whose values
  are calls ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())``;
  each storage is the persistent id ``('storage', torch.<T>Storage, key, 'cpu', numel)``;
* ``archive/data/<key>`` -- one record of raw little-endian bytes per tensor;
* ``archive/.format_version``, ``archive/.storage_alignment``, ``archive/byteorder``,
  ``archive/version`` -- the bookkeeping records torch writes.

Every record is stored uncompressed and its data starts on a 64-byte boundary (as torch
aligns it, padding the local header's extra field), so torch can memory-map it.

The pickle is emitted opcode by opcode: Python's pickler would import ``torch._utils`` to
check the global it names.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile

import numpy as np

from jax_corrdiff.interop.torch_tensors import STORAGE_DTYPES

__all__ = ["save_state_dict", "state_dict_bytes"]

_ROOT = "archive"
_ALIGNMENT = 64
# torch pads the local header's extra field with a record of this id to align data.
_PAD_HEADER_ID = 0x4246
_STORAGE_OF_DTYPE = {dtype: name for name, dtype in STORAGE_DTYPES.items()}


def _int(value: int) -> bytes:
    if 0 <= value < 1 << 8:
        return pickle.BININT1 + bytes([value])
    if -(1 << 31) <= value < 1 << 31:
        return pickle.BININT + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _str(value: str) -> bytes:
    raw = value.encode("utf-8")
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")


def _tuple(items: list[bytes]) -> bytes:
    return pickle.EMPTY_TUPLE if not items else pickle.MARK + b"".join(items) + pickle.TUPLE


_ORDERED_DICT = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE


def _tensor_call(key: str, array: np.ndarray) -> bytes:
    """``_rebuild_tensor_v2(storage, 0, size, contiguous stride, False, OrderedDict())``."""
    storage = _STORAGE_OF_DTYPE[array.dtype.newbyteorder("=")]
    pid = _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(array.size)])
    strides = [int(np.prod(array.shape[i + 1 :], dtype=np.int64)) for i in range(array.ndim)]
    args = [
        pid + pickle.BINPERSID,
        _int(0),
        _tuple([_int(int(n)) for n in array.shape]),
        _tuple([_int(s) for s in strides]),
        pickle.NEWFALSE,
        _ORDERED_DICT,
    ]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + pickle.REDUCE


def _pickle_state_dict(state: dict[str, np.ndarray]) -> bytes:
    items = b"".join(_str(name) + _tensor_call(str(i), array) for i, (name, array) in enumerate(state.items()))
    body = pickle.MARK + items + pickle.SETITEMS if state else b""
    return pickle.PROTO + bytes([2]) + _ORDERED_DICT + body + pickle.STOP


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    """A stored record whose data starts on a multiple of ``_ALIGNMENT`` bytes."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = archive.fp.tell() + 30 + len(name.encode("utf-8"))  # 30: the fixed local header
    pad = -(start + 4) % _ALIGNMENT  # 4: the extra record's own header
    info.extra = struct.pack("<HH", _PAD_HEADER_ID, pad) + b"Z" * pad
    archive.writestr(info, data)


def _checked(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in state.items():
        array = np.asarray(value)
        if not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is not a str")
        if array.dtype.newbyteorder("=") not in _STORAGE_OF_DTYPE:
            raise TypeError(f"state dict entry {name!r}: dtype {array.dtype} has no torch storage type")
        # Little-endian, C-contiguous: the layout the strides written above describe.
        out[name] = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    return out


def state_dict_bytes(state: dict[str, np.ndarray]) -> bytes:
    """The bytes ``torch.save(state)`` would write for a flat dict of NumPy arrays."""
    state = _checked(state)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        _write_aligned(archive, f"{_ROOT}/data.pkl", _pickle_state_dict(state))
        _write_aligned(archive, f"{_ROOT}/.format_version", b"1")
        _write_aligned(archive, f"{_ROOT}/.storage_alignment", str(_ALIGNMENT).encode())
        _write_aligned(archive, f"{_ROOT}/byteorder", b"little")
        for i, array in enumerate(state.values()):
            _write_aligned(archive, f"{_ROOT}/data/{i}", array.tobytes())
        _write_aligned(archive, f"{_ROOT}/version", b"3\n")
    return buffer.getvalue()


def save_state_dict(path: str, state: dict[str, np.ndarray]) -> None:
    """Write ``state`` (name -> array) to ``path`` as ``torch.save`` would."""
    with open(path, "wb") as f:
        f.write(state_dict_bytes(state))
