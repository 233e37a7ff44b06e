"""Tensors of an unpickled torch checkpoint: validated, budgeted, then built as NumPy arrays.

While unpickling, each ``torch._utils._rebuild_*`` call only records its
arguments in a :class:`TensorRef`: legacy files store the storage bytes after
the pickle, and checking a tensor is clearer once its place in the saved object
(its state-dict key) is known.  :func:`resolve_tensors` then walks the object
twice.  The first walk checks every distinct tensor's size, strides and offset
against its storage and adds up what building all of them would cost, so an
over-budget file is refused before any storage is read; the second swaps each
TensorRef for its array.

Both walks resolve every container once, whatever the number of references to
it: a pickle can reuse one memo entry at every level of a nested tuple, so
t_{k+1} = (t_k, t_k) reaches 2**40 leaves in 40 levels of a 1.7 KB file.  A
tensor referenced many times (the memo again) becomes one shared array, as
torch itself returns one tensor object.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from jax_corrdiff.interop.errors import (
    EXPANSION_SLACK,
    CheckpointFormatError,
    CheckpointLimitError,
    ReadLimits,
    short_repr,
)

__all__ = ["STORAGE_DTYPES", "StorageRef", "TensorRef", "rebuild_functions", "resolve_tensors"]

STORAGE_DTYPES: dict[str, np.dtype] = {
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

# torch's own bounds: at most 64 dimensions, sizes and strides are int64.
_MAX_DIMS = 64
_INT64 = 1 << 63


@dataclasses.dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: np.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class TensorRef:
    """A ``_rebuild_*`` call's arguments, unchecked (they come from the file).

    Unhashable, so it cannot become a dict key or set member, where it could
    not be swapped for its array afterwards.
    """

    storage: StorageRef
    offset: Any
    size: Any
    stride: Any
    metadata: Any

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:  # the raw fields may be huge or deeply nested
        return "<tensor>"


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A checked TensorRef."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    negate: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.storage.dtype.itemsize


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, metadata: Any = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise ValueError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    return TensorRef(storage, offset, size, stride, metadata)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, metadata: Any = None
) -> TensorRef:
    return _tensor(storage, offset, size, stride, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise ValueError(f"parameter wraps {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> TensorRef:
    # The state holds Python attributes set on the Parameter, which a plain
    # array cannot carry.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


rebuild_functions: dict[str, Callable[..., TensorRef]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}


def _path_text(path: tuple) -> str:
    return "".join(f"[{short_repr(p, 60)}]" for p in path[:8]) + ("..." if len(path) > 8 else "")


def _where(path: tuple) -> str:
    if len(path) == 1:
        return f"tensor {short_repr(path[0])}"
    return f"tensor {_path_text(path)}" if path else "tensor (the whole file)"


def _check(ref: TensorRef, path: tuple, label: str, limits: ReadLimits) -> _Spec:
    def bad(reason: str) -> CheckpointFormatError:
        return CheckpointFormatError(label, reason, _where(path))

    def ints(value: Any, what: str) -> tuple[int, ...]:
        if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
            raise bad(f"{what} must be a tuple of at most {_MAX_DIMS} ints, got {short_repr(value)}")
        if not all(type(v) is int and 0 <= v < _INT64 for v in value):
            raise bad(f"{what} must hold non-negative int64 values, got {short_repr(value)}")
        return tuple(value)

    storage = ref.storage
    offset = ref.offset
    if type(offset) is not int or not 0 <= offset < _INT64:
        raise bad(f"storage offset must be a non-negative int64, got {short_repr(offset)}")
    shape, strides = ints(ref.size, "size"), ints(ref.stride, "stride")
    if len(shape) != len(strides):
        raise bad(f"size {shape} and stride {strides} differ in rank")
    nbytes = math.prod(shape) * storage.dtype.itemsize
    if nbytes > limits.max_bytes:
        raise CheckpointLimitError(
            label, f"size {shape} needs {nbytes} bytes, more than max_bytes={limits.max_bytes}", _where(path)
        )
    # as_strided would otherwise read whatever memory lies past the storage.
    if nbytes:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        if last >= storage.numel:
            raise bad(
                f"view (offset {offset}, size {shape}, stride {strides}) runs past storage "
                f"{storage.key!r} of {storage.numel} elements"
            )
    flags = {} if ref.metadata is None else ref.metadata
    if not isinstance(flags, dict) or not set(flags) <= {"conj", "neg"}:
        raise bad(f"unsupported tensor metadata {short_repr(ref.metadata)}")
    # conj is a no-op on the real dtypes supported here; neg is a lazy negation.
    negate = bool(flags.get("neg", False))
    if negate and storage.dtype == np.bool_:
        raise bad("negative-view bit set on a bool tensor")
    return _Spec(storage, offset, shape, strides, negate)


class _Walk:
    """Replaces every TensorRef in an object graph, visiting each container once.

    Lists, dicts and an OrderedDict's attributes are updated in place; a tuple
    holding a tensor is rebuilt, once, and the rebuilt tuple is reused
    wherever the original was referenced.
    """

    def __init__(self, replace: Callable[[TensorRef, tuple], Any], label: str, limits: ReadLimits) -> None:
        self.replace, self.label, self.limits = replace, label, limits
        # id -> (original, result); holding the original keeps its id from
        # being reused by an object created later in the walk.
        self.done: dict[int, tuple[Any, Any]] = {}
        self.nodes = 0

    def __call__(self, obj: Any, path: tuple = ()) -> Any:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise CheckpointLimitError(self.label, f"holds more than max_nodes={self.limits.max_nodes} objects")
        if isinstance(obj, TensorRef):
            return self.replace(obj, path)
        if not isinstance(obj, (tuple, list, dict)):
            return obj
        if id(obj) in self.done:
            return self.done[id(obj)][1]
        if len(path) >= self.limits.max_depth:
            raise CheckpointLimitError(
                self.label, f"nested deeper than max_depth={self.limits.max_depth}", f"value {_path_text(path)}"
            )
        if isinstance(obj, tuple):
            items = [self(item, (*path, i)) for i, item in enumerate(obj)]
            result = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
        else:
            result = obj
            self.done[id(obj)] = (obj, obj)  # before the items: lists and dicts may contain themselves
            if isinstance(obj, list):
                obj[:] = [self(item, (*path, i)) for i, item in enumerate(obj)]
            else:
                for key in list(obj):
                    obj[key] = self(obj[key], (*path, key))
                if isinstance(obj, collections.OrderedDict):
                    self(vars(obj), path)
        self.done[id(obj)] = (obj, result)
        return result


def resolve_tensors(
    obj: Any, storage_bytes: Callable[[StorageRef], bytes], big_endian: bool, label: str, limits: ReadLimits
) -> Any:
    """Swap every TensorRef in ``obj`` for a C-contiguous array owning its data.

    ``storage_bytes`` is called once per storage used, only after every tensor
    has been checked and the total found within ``limits``.
    """
    # id(ref) -> (checked ref, where it was first found, ref: kept so its id stays unique)
    specs: dict[int, tuple[_Spec, tuple, TensorRef]] = {}

    def plan(ref: TensorRef, path: tuple) -> TensorRef:
        if id(ref) not in specs:
            specs[id(ref)] = (_check(ref, path, label, limits), path, ref)
        return ref

    _walk(obj, plan, label, limits)
    storages = {spec.storage.key: spec.storage for spec, _, _ in specs.values()}
    stored = sum(s.nbytes for s in storages.values())
    built = sum(spec.nbytes for spec, _, _ in specs.values())
    if specs:
        largest, largest_path, _ = max(specs.values(), key=lambda item: item[0].nbytes)
        tensors = f"{len(specs)} tensors of {built} bytes (this one the largest, {largest.nbytes} bytes)"
        if stored + built > limits.max_bytes:
            raise CheckpointLimitError(
                label,
                f"{tensors} and their {len(storages)} storages of {stored} bytes exceed max_bytes={limits.max_bytes}",
                _where(largest_path),
            )
        if built > limits.max_expansion * stored + EXPANSION_SLACK:
            raise CheckpointLimitError(
                label,
                f"{tensors} would be expanded from storages of only {stored} bytes "
                f"(more than max_expansion={limits.max_expansion} times, plus {EXPANSION_SLACK} bytes)",
                _where(largest_path),
            )

    data = {key: _storage_array(storage_bytes(ref), ref, big_endian, label) for key, ref in storages.items()}
    arrays = {key: _array(spec, data[spec.storage.key]) for key, (spec, _, _) in specs.items()}
    return _walk(obj, lambda ref, path: arrays[id(ref)], label, limits)


def _walk(obj: Any, replace: Callable[[TensorRef, tuple], Any], label: str, limits: ReadLimits) -> Any:
    try:
        return _Walk(replace, label, limits)(obj)
    except RecursionError as exc:  # max_depth set beyond Python's recursion limit
        raise CheckpointLimitError(label, "object nested too deep for Python's recursion limit") from exc


def _storage_array(raw: bytes, ref: StorageRef, big_endian: bool, label: str) -> np.ndarray:
    if len(raw) != ref.nbytes:
        raise CheckpointFormatError(
            label, f"holds {len(raw)} bytes, expected {ref.numel} x {ref.dtype.itemsize}", f"storage {ref.key!r}"
        )
    data = np.frombuffer(raw, dtype=np.uint8)
    if ref.dtype == np.bool_:
        # Bytes other than 0/1 would make NumPy bools that compare oddly.
        return data != 0
    if big_endian and ref.dtype.itemsize > 1:
        # Swapping raw bytes works for ml_dtypes too, which cannot carry a
        # non-native byte order themselves.
        data = data.reshape(-1, ref.dtype.itemsize)[:, ::-1].copy()
    return data.view(ref.dtype).reshape(-1)


def _array(spec: _Spec, data: np.ndarray) -> np.ndarray:
    if math.prod(spec.shape) == 0:
        return np.zeros(spec.shape, dtype=spec.storage.dtype)
    view = np.lib.stride_tricks.as_strided(
        data[spec.offset :],
        shape=spec.shape,
        strides=tuple(s * data.itemsize for s in spec.strides),
        writeable=False,
    )
    out = np.array(view, order="C", copy=True)
    return np.negative(out, out=out) if spec.negate else out
