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
C-contiguous NumPy arrays that own their memory, one per tensor however often
the pickle refers to it; parameters become plain arrays.

Why the unpickler is restricted: unpickling is a program -- ``GLOBAL`` imports
any callable and ``REDUCE`` calls it -- so ``pickle.load`` (and ``torch.load``
without ``weights_only``) on a downloaded checkpoint runs whatever the file
asks for.  Here every global is looked up in a short allow-list that maps torch
names to small local functions, nothing is ever imported, and the opcodes that
could reach anything else (object instantiation, ``BUILD`` on arbitrary
objects, the process-wide copyreg extension cache) are refused.  A hostile
file therefore raises :class:`UnsafePickleError` before any of its code runs.

Why sizes are checked first: a few bytes of pickle can ask for gigabytes (an
expanded view, a length prefix, a hash or repr of a memo-built DAG), so every
length is compared with the bytes really present and with
:class:`~jax_corrdiff.interop.errors.ReadLimits` before anything is allocated
(:mod:`~jax_corrdiff.interop.torch_tensors`, :mod:`~jax_corrdiff.interop.archives`).
Every problem is raised as a :class:`~jax_corrdiff.interop.errors.CheckpointFormatError`
naming the file and the record or tensor.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, ClassVar

import numpy as np

from jax_corrdiff.interop.archives import ZipMembers
from jax_corrdiff.interop.errors import (
    CheckpointFormatError,
    CheckpointLimitError,
    ReadLimits,
    UnsafePickleError,
    short_repr,
)
from jax_corrdiff.interop.torch_tensors import STORAGE_DTYPES, StorageRef, rebuild_functions, resolve_tensors

__all__ = ["load_torch_checkpoint"]

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch writes storage sizes as int64; a larger count can only be hostile.
_MAX_NUMEL = 1 << 62


def _refusal(label: str, field: str, what: str) -> UnsafePickleError:
    return UnsafePickleError(
        label,
        f"refused {what}; only the tensor-rebuild functions, storage types and OrderedDict "
        "that a torch checkpoint needs are allowed. Loading stopped here and no code from the file was run.",
        field,
    )


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for a ``torch.<X>Storage`` class; only its dtype matters."""

    name: str
    dtype: np.dtype


_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    **{("torch._utils", name): func for name, func in rebuild_functions.items()},
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    **_CALLABLES,
    **{("torch", n): _StorageType(n, dt) for n, dt in STORAGE_DTYPES.items()},
    # Legacy files saved from a GPU name the CUDA storage classes.
    **{("torch.cuda", n): _StorageType(n, dt) for n, dt in STORAGE_DTYPES.items()},
}
_CALLABLE_IDS = frozenset(id(f) for f in _CALLABLES.values())
# Dict keys and set members are hashed on insertion, and hashing a tuple walks
# all of it: a memo-built tuple DAG of 2**40 leaves would never finish.  torch
# writes str keys (int ones in optimizer state).
_KEY_TYPES = (str, bytes, int, float, bool, type(None))


def _hash_safe(key: Any) -> bool:
    return isinstance(key, _KEY_TYPES) or (type(key) is tuple and all(isinstance(k, _KEY_TYPES) for k in key))


def _refuse_opcode(name: str) -> Callable[[_RestrictedUnpickler], None]:
    def refuse(self: _RestrictedUnpickler) -> None:
        raise _refusal(self.label, self.field, f"pickle opcode {name}, which torch.save never writes")

    return refuse


def _checking_keys(opcode: bytes, keys_of: Callable[[list], list]) -> Callable[[_RestrictedUnpickler], None]:
    original = pickle._Unpickler.dispatch[opcode[0]]  # type: ignore[attr-defined]

    def load(self: _RestrictedUnpickler) -> None:
        for key in keys_of(self.stack):
            if not _hash_safe(key):
                raise _refusal(self.label, self.field, f"a {type(key).__name__} as a dict key or set member")
        original(self)

    return load


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler so single opcodes can be overridden.

    The C unpickler only lets find_class/persistent_load be replaced; BUILD,
    the instantiation opcodes and the hashing ones need checks too.
    """

    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    stack: list[Any]  # created by pickle._Unpickler.load

    def __init__(self, file: BinaryIO, label: str, field: str) -> None:
        # torch.load decodes Python 2 byte strings as UTF-8 too.
        super().__init__(file, encoding="utf-8")
        self.label, self.field = label, field
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> object:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise _refusal(self.label, self.field, f"global '{module[:200]}.{name[:200]}'")
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
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
            and 0 <= pid[4] < _MAX_NUMEL
            and (len(pid) == 5 or pid[5] is None)
        ):
            raise _refusal(self.label, self.field, f"persistent id {short_repr(pid, 200)}")
        ref = StorageRef(key=pid[2], dtype=pid[1].dtype, numel=pid[4])
        known = self.storages.setdefault(ref.key, ref)
        if known != ref:
            raise CheckpointFormatError(self.label, "described inconsistently", f"storage {short_repr(ref.key)}")
        return ref

    def _load_reduce(self) -> None:
        func, args = self.stack[-2], self.stack[-1]
        if id(func) not in _CALLABLE_IDS:
            raise _refusal(self.label, self.field, f"call of {type(func).__name__} object")
        # torch pickles an OrderedDict as OrderedDict() plus SETITEMS; items
        # passed here would be hashed before the key check.
        if func is collections.OrderedDict and args != ():
            raise _refusal(self.label, self.field, "OrderedDict called with arguments")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def _load_build(self) -> None:
        # state_dict() tags its OrderedDict with a `_metadata` attribute, which
        # BUILD restores; any other attribute could shadow a method (a fake
        # `items` hiding the real entries) or reach a __setstate__.
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not collections.OrderedDict:
            raise _refusal(self.label, self.field, f"BUILD on a {type(inst).__name__} object")
        if type(state) is not dict or list(state) != ["_metadata"] or not isinstance(state["_metadata"], dict):
            raise _refusal(
                self.label,
                self.field,
                f"BUILD on a OrderedDict setting {short_repr(state)}; torch only restores a '_metadata' dict",
            )
        inst._metadata = state["_metadata"]

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _checking_keys(pickle.SETITEM, lambda stack: [stack[-2]])
    # SETITEMS / DICT / ADDITEMS / FROZENSET take the items above the last
    # MARK, which the pure-Python unpickler holds as self.stack.
    dispatch[pickle.SETITEMS[0]] = _checking_keys(pickle.SETITEMS, lambda stack: stack[::2])
    dispatch[pickle.DICT[0]] = _checking_keys(pickle.DICT, lambda stack: stack[::2])
    dispatch[pickle.ADDITEMS[0]] = _checking_keys(pickle.ADDITEMS, lambda stack: stack)
    dispatch[pickle.FROZENSET[0]] = _checking_keys(pickle.FROZENSET, lambda stack: stack)
    # INST/OBJ/NEWOBJ* instantiate classes without REDUCE's check, and EXT*
    # can return objects that another unpickler in this process cached in
    # the copyreg extension cache, bypassing find_class.  BYTEARRAY8
    # allocates its declared length before reading it, and the out-of-band
    # buffer opcodes need buffers torch never passes.
    for _op in (
        "INST",
        "OBJ",
        "NEWOBJ",
        "NEWOBJ_EX",
        "EXT1",
        "EXT2",
        "EXT4",
        "BYTEARRAY8",
        "NEXT_BUFFER",
        "READONLY_BUFFER",
    ):
        dispatch[getattr(pickle, _op)[0]] = _refuse_opcode(_op)
    del _op


class _BoundedReader:
    """Reads no more than the file holds.

    Pickle opcodes carry lengths (a FRAME, a BINBYTES8...) that the unpickler
    passes to read(); a buffered file allocates that many bytes up front.
    """

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        here = file.tell()
        self._end = file.seek(0, os.SEEK_END)
        file.seek(here)

    def read(self, size: int = -1) -> bytes:
        left = self._end - self._file.tell()
        return self._file.read(left if size is None or size < 0 else min(size, left))

    def readline(self) -> bytes:
        return self._file.readline()


def _unpickle(file: BinaryIO, label: str, field: str) -> tuple[Any, dict[str, StorageRef]]:
    unpickler = _RestrictedUnpickler(_BoundedReader(file), label, field)  # type: ignore[arg-type]
    try:
        obj = unpickler.load()
    except CheckpointFormatError:
        raise
    except Exception as exc:  # any error of the pickle machinery on hostile input
        raise CheckpointFormatError(label, f"corrupt pickle ({type(exc).__name__}: {exc})", field) from exc
    return obj, unpickler.storages


def _load_zip(file: BinaryIO, label: str, limits: ReadLimits) -> Any:
    members = ZipMembers(file, label, kind="record")
    try:
        pickles = [n for n in members.names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointFormatError(
                label, f"expected one '<root>/data.pkl' record, found {short_repr(pickles) if pickles else 'none'}"
            )
        root = pickles[0][: -len("data.pkl")]
        byteorder = members.read(root + "byteorder", 16) if root + "byteorder" in members.names else b"little"
        if byteorder not in (b"little", b"big"):
            raise CheckpointFormatError(
                label, f"unknown byteorder {short_repr(byteorder)}", f"member '{root}byteorder'"
            )
        pkl = root + "data.pkl"
        obj, _ = _unpickle(io.BytesIO(members.read(pkl)), label, f"record '{pkl}'")

        def storage_bytes(ref: StorageRef) -> bytes:
            return members.read(f"{root}data/{ref.key}", size=ref.nbytes)

        return resolve_tensors(obj, storage_bytes, byteorder == b"big", label, limits)
    finally:
        members.close()


def _read_exact(file: BinaryIO, size: int, label: str, field: str) -> bytes:
    # Checked against the remaining length first so a hostile element count
    # cannot trigger a huge allocation.
    here = file.tell()
    remaining = file.seek(0, os.SEEK_END) - here
    file.seek(here)
    if size > remaining:
        raise CheckpointFormatError(label, f"needs {size} bytes, only {remaining} left (truncated?)", field)
    return file.read(size)


def _load_legacy(file: BinaryIO, label: str, limits: ReadLimits) -> Any:
    try:
        magic, _ = _unpickle(file, label, "magic number")
    except UnsafePickleError:
        raise
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(label, "not a torch checkpoint (no zip header, no legacy magic number)") from exc
    if magic != _LEGACY_MAGIC:
        raise CheckpointFormatError(label, "not a torch checkpoint (no zip header, no legacy magic number)")
    protocol, _ = _unpickle(file, label, "protocol version")
    if protocol != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(label, f"unsupported legacy protocol version {short_repr(protocol)}")
    _unpickle(file, label, "system info")  # storages are little-endian regardless
    obj, storages = _unpickle(file, label, "pickled object")
    keys, _ = _unpickle(file, label, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise CheckpointFormatError(label, "malformed storage key list")
    unused = next((k for k in keys if k not in storages), None)
    if unused is not None:
        raise CheckpointFormatError(label, "is listed but never used", f"storage {short_repr(unused)}")
    listed = sum(storages[k].nbytes for k in keys)
    if listed > limits.max_bytes:
        raise CheckpointLimitError(label, f"storages of {listed} bytes exceed max_bytes={limits.max_bytes}")
    loaded: dict[str, bytes] = {}
    for key in keys:
        ref, field = storages[key], f"storage record {short_repr(key)}"
        (numel,) = struct.unpack("<q", _read_exact(file, 8, label, field))
        if numel != ref.numel:
            raise CheckpointFormatError(label, f"has {numel} elements, expected {ref.numel}", field)
        loaded[key] = _read_exact(file, ref.nbytes, label, field)

    def storage_bytes(ref: StorageRef) -> bytes:
        if ref.key not in loaded:
            raise CheckpointFormatError(label, "missing", f"storage record {short_repr(ref.key)}")
        return loaded[ref.key]

    return resolve_tensors(obj, storage_bytes, False, label, limits)


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


def load_torch_checkpoint(source: Source, *, limits: ReadLimits | None = None) -> Any:
    """Load a ``torch.save`` file with every tensor turned into a NumPy array.

    Args:
        source: a path, the file's bytes, or a binary file object.
        limits: bounds on memory, nesting and object count (default
            :class:`ReadLimits`\\ (): 4 GiB of tensor data).  Every tensor is
            checked against them, and against its storage, before anything
            is allocated.

    Returns:
        The saved structure (dicts, OrderedDicts, lists, tuples, scalars) with
        tensors and parameters replaced by C-contiguous arrays that own their
        data; a tensor referenced several times becomes one shared array, as
        in torch.  bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.

    Raises:
        UnsafePickleError: the file references anything beyond tensors and
            plain containers.  Nothing from the file has run at that point.
        CheckpointLimitError: the file would exceed ``limits``.
        CheckpointFormatError: (the base of both, a ValueError) the file is
            truncated, corrupt, compressed, or misses a storage record.
    """
    limits = ReadLimits() if limits is None else limits
    with _open_source(source) as (file, label):
        start = file.tell()
        is_zip = file.read(4) == b"PK\x03\x04"
        file.seek(start)
        return _load_zip(file, label, limits) if is_zip else _load_legacy(file, label, limits)
