"""Read PyTorch checkpoints into NumPy without importing torch.

Two on-disk formats written by ``torch.save`` are understood:

* **zip** (the default since torch 1.6): a zip archive with one root folder of
  any name holding ``data.pkl`` (the pickled object), one ``data/<key>`` record
  of raw bytes per storage, and a ``byteorder`` record (``little``/``big``;
  files older than that record are little-endian).  Bookkeeping records such as
  ``version``, ``.data/version`` or ``.storage_alignment`` do not change how
  ``data.pkl`` or the storages read, so they are not consulted.
* **legacy** (``_use_new_zipfile_serialization=False``): a stream of pickles --
  a magic number, the protocol version, a sys-info dict, the object pickle and
  the list of storage keys -- followed, for each key in that order, by an
  8-byte little-endian element count and the storage's raw little-endian bytes.

In both, every tensor is pickled as a call to a ``torch._utils._rebuild_*``
function whose arguments name a storage through a persistent id
``('storage', <storage type>, key, location, numel)``.  Tensors come back as
C-contiguous NumPy arrays that own their memory; parameters become plain arrays.

Why the unpickler is restricted: unpickling is a program -- ``GLOBAL`` imports
any callable and ``REDUCE`` calls it -- so ``pickle.load`` (and ``torch.load``
without ``weights_only``) on a downloaded checkpoint runs whatever the file
asks for.  Here every global is looked up in a short allow-list that maps torch
names to small local functions, nothing is ever imported, and the opcodes that
could reach anything else (object instantiation, ``BUILD`` on arbitrary
objects, the process-wide copyreg extension cache) are refused.  A hostile
file therefore raises :class:`UnsafePickleError` before any of its code runs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, ClassVar

import ml_dtypes
import numpy as np

__all__ = ["UnsafePickleError", "load_torch_checkpoint"]

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafePickleError(Exception):
    """A checkpoint asked for something outside the tensor-loading allow-list.

    Raised before the offending global, persistent id or opcode takes effect,
    so no code from the file has been run.
    """


def _refusal(label: str, what: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{label}: refused {what}; only the tensor-rebuild functions, storage "
        "types and OrderedDict that a torch checkpoint needs are allowed. "
        "Loading stopped here and no code from the file was run."
    )


_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.<X>Storage`` class; only its dtype matters."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRef:
    """A tensor whose storage bytes are fetched after unpickling.

    Legacy files store the bytes after the pickle, so arrays cannot be built
    while unpickling.  Unhashable, so it cannot become a dict key or set
    member, where it could not be swapped for its array afterwards.
    """

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    negate: bool

    __hash__ = None  # type: ignore[assignment]


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"tensor {what} must be non-negative ints, got {value!r}")
    return tuple(value)


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, metadata: Any = None) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if type(offset) is not int or offset < 0:
        raise ValueError(f"bad storage offset {offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"size {shape} and stride {strides} differ in rank")
    # Bounds are checked here because as_strided would otherwise read
    # whatever memory lies past the storage.
    if math.prod(shape) > 0:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise ValueError(
                f"tensor (offset {offset}, size {shape}, stride {strides}) runs "
                f"past storage {storage.key!r} of {storage.numel} elements"
            )
    flags = {} if metadata is None else metadata
    if not isinstance(flags, dict) or not set(flags) <= {"conj", "neg"}:
        raise ValueError(f"unsupported tensor metadata {metadata!r}")
    # conj is a no-op on the real dtypes supported here; neg is a lazy negation.
    negate = bool(flags.get("neg", False))
    if negate and storage.dtype == np.bool_:
        raise ValueError("negative-view bit set on a bool tensor")
    return _TensorRef(storage, offset, shape, strides, negate)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> _TensorRef:
    return _tensor_ref(storage, offset, size, stride, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise ValueError(f"parameter wraps {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> _TensorRef:
    # The state holds Python attributes set on the Parameter, which a plain
    # array cannot carry.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    **_CALLABLES,
    **{("torch", n): _StorageType(n, dt) for n, dt in _STORAGE_DTYPES.items()},
    # Legacy files saved from a GPU name the CUDA storage classes.
    **{("torch.cuda", n): _StorageType(n, dt) for n, dt in _STORAGE_DTYPES.items()},
}
_CALLABLE_IDS = frozenset(id(f) for f in _CALLABLES.values())


def _refuse_opcode(name: str) -> Callable[[_RestrictedUnpickler], None]:
    def refuse(self: _RestrictedUnpickler) -> None:
        raise _refusal(self.label, f"pickle opcode {name}, which torch.save never writes")

    return refuse


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler so single opcodes can be overridden.

    The C unpickler only lets find_class/persistent_load be replaced; BUILD
    and the instantiation opcodes need to be refused too.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    stack: list[Any]  # created by pickle._Unpickler.load

    def __init__(self, file: BinaryIO, label: str) -> None:
        # torch.load decodes Python 2 byte strings as UTF-8 too.
        super().__init__(file, encoding="utf-8")
        self.label = label
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> object:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _refusal(self.label, f"global '{module}.{name}'")
        return found

    def persistent_load(self, pid: Any) -> _StorageRef:
        # Zip files use 5 fields; legacy files append view metadata, which
        # torch has written as None ever since storages stopped being views.
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[3], str)
            and type(pid[4]) is int
            and pid[4] >= 0
            and (len(pid) == 5 or pid[5] is None)
        ):
            raise _refusal(self.label, f"persistent id {pid!r:.200}")
        ref = _StorageRef(key=pid[2], dtype=pid[1].dtype, numel=pid[4])
        known = self.storages.setdefault(ref.key, ref)
        if known != ref:
            raise ValueError(f"storage {ref.key!r} is described inconsistently")
        return ref

    def _load_reduce(self) -> None:
        func = self.stack[-2]
        if id(func) not in _CALLABLE_IDS:
            raise _refusal(self.label, f"call of {type(func).__name__} object")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def _load_build(self) -> None:
        # state_dict() tags its OrderedDict with a `_metadata` attribute via
        # BUILD; anything else could reach a __setstate__ method.
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not collections.OrderedDict or not (
            isinstance(state, dict) and all(type(k) is str for k in state)
        ):
            raise _refusal(self.label, f"BUILD on a {type(inst).__name__} object")
        vars(inst).update(state)

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    # INST/OBJ/NEWOBJ* instantiate classes without REDUCE's check, and EXT*
    # can return objects that another unpickler in this process cached in
    # the copyreg extension cache, bypassing find_class.
    for _op in ("INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = _refuse_opcode(_op)
    del _op


def _unpickle(file: BinaryIO, label: str) -> tuple[Any, dict[str, _StorageRef]]:
    unpickler = _RestrictedUnpickler(file, label)
    try:
        obj = unpickler.load()
    except UnsafePickleError:
        raise
    except Exception as exc:
        raise ValueError(f"{label}: corrupt or unsupported pickle: {exc}") from exc
    return obj, unpickler.storages


def _resolve(obj: Any, array_of: Callable[[_TensorRef], np.ndarray], seen: set[int]) -> Any:
    """Swap every _TensorRef for its array, in place where containers allow."""
    if isinstance(obj, _TensorRef):
        return array_of(obj)
    if isinstance(obj, tuple):
        return tuple(_resolve(item, array_of, seen) for item in obj)
    if isinstance(obj, (list, dict)) and id(obj) not in seen:
        seen.add(id(obj))
        if isinstance(obj, list):
            obj[:] = [_resolve(item, array_of, seen) for item in obj]
        else:
            for key in list(obj):
                obj[key] = _resolve(obj[key], array_of, seen)
            if isinstance(obj, collections.OrderedDict):
                _resolve(vars(obj), array_of, seen)
    return obj


def _materialize(obj: Any, storage_data: Callable[[_StorageRef], np.ndarray], label: str) -> Any:
    cache: dict[str, np.ndarray] = {}

    def array_of(ref: _TensorRef) -> np.ndarray:
        data = cache.get(ref.storage.key)
        if data is None:
            data = cache[ref.storage.key] = storage_data(ref.storage)
        if math.prod(ref.shape) == 0:
            return np.zeros(ref.shape, dtype=ref.storage.dtype)
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[ref.offset :],
            shape=ref.shape,
            strides=tuple(s * item for s in ref.strides),
            writeable=False,
        )
        out = np.array(view, order="C", copy=True)
        return np.negative(out, out=out) if ref.negate else out

    try:
        return _resolve(obj, array_of, set())
    except RecursionError as exc:
        raise ValueError(f"{label}: object nesting too deep") from exc


def _storage_array(raw: bytes, ref: _StorageRef, big_endian: bool, what: str) -> np.ndarray:
    if len(raw) != ref.numel * ref.dtype.itemsize:
        raise ValueError(f"{what} holds {len(raw)} bytes, expected {ref.numel} x {ref.dtype.itemsize}")
    data = np.frombuffer(raw, dtype=np.uint8)
    if ref.dtype == np.bool_:
        # Bytes other than 0/1 would make NumPy bools that compare oddly.
        return data != 0
    if big_endian and ref.dtype.itemsize > 1:
        # Swapping raw bytes works for ml_dtypes too, which cannot carry a
        # non-native byte order themselves.
        data = data.reshape(-1, ref.dtype.itemsize)[:, ::-1].copy()
    return data.view(ref.dtype).reshape(-1)


def _load_zip(file: BinaryIO, label: str) -> Any:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{label}: unreadable zip archive (truncated?): {exc}") from exc
    with archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{label}: expected one '<root>/data.pkl' record, found {pickles or 'none'}")
        root = pickles[0][: -len("data.pkl")]

        def record(name: str) -> bytes:
            try:
                return archive.read(root + name)
            except KeyError:
                raise ValueError(f"{label}: missing record '{root + name}'") from None
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"{label}: corrupt record '{root + name}': {exc}") from exc

        byteorder = record("byteorder") if root + "byteorder" in archive.namelist() else b"little"
        if byteorder not in (b"little", b"big"):
            raise ValueError(f"{label}: unknown byteorder {byteorder!r}")
        obj, _ = _unpickle(io.BytesIO(record("data.pkl")), f"{label} ({root}data.pkl)")

        def storage_data(ref: _StorageRef) -> np.ndarray:
            name = f"data/{ref.key}"
            return _storage_array(record(name), ref, byteorder == b"big", f"{label}: '{root}{name}'")

        return _materialize(obj, storage_data, label)


def _read_exact(file: BinaryIO, size: int, what: str) -> bytes:
    # Checked against the remaining length first so a hostile element count
    # cannot trigger a huge allocation.
    here = file.tell()
    remaining = file.seek(0, os.SEEK_END) - here
    file.seek(here)
    if size > remaining:
        raise ValueError(f"{what}: needs {size} bytes, only {remaining} left (truncated?)")
    return file.read(size)


def _load_legacy(file: BinaryIO, label: str) -> Any:
    not_torch = f"{label}: not a torch checkpoint (no zip header, no legacy magic number)"
    try:
        magic, _ = _unpickle(file, label)
    except ValueError as exc:
        raise ValueError(not_torch) from exc
    if magic != _LEGACY_MAGIC:
        raise ValueError(not_torch)
    protocol, _ = _unpickle(file, label)
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{label}: unsupported legacy protocol version {protocol!r}")
    _unpickle(file, label)  # sys info: storages are little-endian regardless
    obj, storages = _unpickle(file, label)
    keys, _ = _unpickle(file, label)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{label}: malformed storage key list")
    loaded: dict[str, np.ndarray] = {}
    for key in keys:
        ref = storages.get(key)
        if ref is None:
            raise ValueError(f"{label}: storage {key!r} is listed but never used")
        what = f"{label}: storage record {key!r}"
        (numel,) = struct.unpack("<q", _read_exact(file, 8, what))
        if numel != ref.numel:
            raise ValueError(f"{what} has {numel} elements, expected {ref.numel}")
        raw = _read_exact(file, numel * ref.dtype.itemsize, what)
        loaded[key] = _storage_array(raw, ref, False, what)

    def storage_data(ref: _StorageRef) -> np.ndarray:
        if ref.key not in loaded:
            raise ValueError(f"{label}: missing storage record {ref.key!r}")
        return loaded[ref.key]

    return _materialize(obj, storage_data, label)


@contextlib.contextmanager
def _open_source(source: Source) -> Iterator[tuple[BinaryIO, str]]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield io.BytesIO(source), "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            yield file, os.fspath(source)
    elif hasattr(source, "read"):
        name = getattr(source, "name", None)
        label = name if isinstance(name, str) else "<file object>"
        seekable = getattr(source, "seekable", None)
        # zipfile and the legacy size checks both need to seek.
        yield (source if seekable is not None and seekable() else io.BytesIO(source.read())), label
    else:
        raise TypeError(f"expected a path, bytes or binary file, got {type(source).__name__}")


def load_torch_checkpoint(source: Source) -> Any:
    """Load a ``torch.save`` file with every tensor turned into a NumPy array.

    Args:
        source: a path, the file's bytes, or a binary file object.

    Returns:
        The saved structure (dicts, OrderedDicts, lists, tuples, scalars) with
        tensors and parameters replaced by C-contiguous arrays that own their
        data.  bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.

    Raises:
        UnsafePickleError: the file references anything beyond tensors and
            plain containers.  Nothing from the file has run at that point.
        ValueError: the file is truncated, corrupt, or misses a storage record.
    """
    with _open_source(source) as (file, label):
        start = file.tell()
        is_zip = file.read(4) == b"PK\x03\x04"
        file.seek(start)
        return _load_zip(file, label) if is_zip else _load_legacy(file, label)
