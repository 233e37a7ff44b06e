"""Read PhysicsNeMo / Modulus ``.mdlus`` checkpoints without torch.

A ``.mdlus`` file is an archive of three members:

* ``model.pt`` -- ``torch.save(model.state_dict())``, read with the restricted
  unpickler of :mod:`jax_corrdiff.interop.torch_pickle`, so a hostile file
  cannot run code;
* ``args.json`` -- the constructor arguments (``__name__``, ``__module__``,
  ``__args__``), returned unchanged;
* ``metadata.json`` -- version information; absent in old files.

Current PhysicsNeMo writes the archive as a zip; older Modulus/PhysicsNeMo
releases wrote a tar with the same members, sometimes under one leading
folder.  Both are written uncompressed, and compressed ones are refused (see
:mod:`jax_corrdiff.interop.archives`).  The container is recognised by content,
tar first: a tar whose last member is the zip-format ``model.pt`` also passes
``zipfile.is_zipfile``.  Members are read into memory; nothing is extracted to
disk.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np

from jax_corrdiff.interop.archives import TarMembers, ZipMembers, compression_of, is_tar
from jax_corrdiff.interop.errors import CheckpointFormatError, ReadLimits, short_repr
from jax_corrdiff.interop.torch_pickle import load_torch_checkpoint

__all__ = ["MdlusArchive", "read_mdlus"]

_MODEL = "model.pt"
_ARGS = "args.json"
_METADATA = "metadata.json"
# PhysicsNeMo's JSON members are a few hundred bytes.
_MAX_JSON_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class MdlusArchive:
    """The contents of a ``.mdlus`` checkpoint."""

    state_dict: dict[str, np.ndarray]
    args: dict
    metadata: dict
    path: str


def _member_prefix(names: list[str], path: str) -> str:
    """Return '' or '<folder>/', wherever model.pt sits."""
    candidates = sorted(
        n[: -len(_MODEL)] for n in names if n == _MODEL or (n.endswith("/" + _MODEL) and n.count("/") == 1)
    )
    if not candidates:
        raise CheckpointFormatError(path, f"missing member '{_MODEL}' (members: {short_repr(sorted(names), 300)})")
    if len(candidates) > 1 and "" not in candidates:
        raise CheckpointFormatError(path, f"ambiguous '{_MODEL}' members under {short_repr(candidates)}")
    return candidates[0]


def _json_object(raw: bytes, path: str, member: str) -> dict:
    try:
        value = json.loads(raw)
    # Besides malformed text: Python's parser recurses once per nesting level,
    # and refuses ints of more than 4300 digits.
    except (ValueError, RecursionError) as exc:
        raise CheckpointFormatError(path, f"not valid JSON: {type(exc).__name__}: {exc}", f"member '{member}'") from exc
    if not isinstance(value, dict):
        raise CheckpointFormatError(path, f"holds {type(value).__name__}, not an object", f"member '{member}'")
    return value


def _flat_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise CheckpointFormatError(path, f"holds {type(obj).__name__}, not a state dict", f"member '{_MODEL}'")
    for nested in ("state_dict", "model"):
        if isinstance(obj.get(nested), dict):
            raise CheckpointFormatError(
                path,
                f"holds a training checkpoint with a nested '{nested}' entry, not a flat state dict of tensors",
                f"member '{_MODEL}'",
            )
    state: dict[str, np.ndarray] = {}
    # dict.items, not obj.items: the unpickler only lets BUILD set
    # `_metadata`, and this does not depend on that.
    for key, value in dict.items(obj):
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointFormatError(
                path, f"state dict entry {short_repr(key)} is a {type(value).__name__}, not a tensor"
            )
        state[key] = value
    return state


def read_mdlus(path: str | os.PathLike[str], *, limits: ReadLimits | None = None) -> MdlusArchive:
    """Read a ``.mdlus`` checkpoint (zip or legacy tar) into NumPy arrays.

    Args:
        path: the file.
        limits: bounds on memory and nesting for reading ``model.pt`` (default
            :class:`ReadLimits`\\ (): 4 GiB of tensor data).

    Raises:
        CheckpointFormatError: (a ValueError) the file is not an uncompressed
            tar/zip archive, is truncated, lacks ``model.pt`` or ``args.json``,
            or holds something other than a flat state dict.
        CheckpointLimitError: a subclass: reading it would exceed ``limits``.
        UnsafePickleError: a subclass: ``model.pt`` references code beyond
            plain tensors.
    """
    label = os.fspath(path)
    limits = ReadLimits() if limits is None else limits
    with open(label, "rb") as file:
        members = _open_members(file, label)
        try:
            prefix, model, args, metadata = _read_members(members, label)
        finally:
            members.close()
    member = io.BytesIO(model)
    member.name = f"{label}:{prefix}{_MODEL}"  # so loader errors name the member
    state = load_torch_checkpoint(member, limits=limits)
    return MdlusArchive(state_dict=_flat_state_dict(state, label), args=args, metadata=metadata, path=label)


def _open_members(file, label: str) -> TarMembers | ZipMembers:
    """The members of an uncompressed tar or zip ``file``; anything else is refused."""
    compression = compression_of(file)
    if compression is not None:
        raise CheckpointFormatError(
            label,
            f"{compression}-compressed; PhysicsNeMo writes .mdlus files uncompressed, so this one was "
            "repacked -- decompress it first if it is trusted",
        )
    is_zip = file.read(4) == b"PK\x03\x04"
    file.seek(0)
    if is_tar(file):
        return TarMembers(file, label)
    if is_zip:
        return ZipMembers(file, label)
    raise CheckpointFormatError(label, "not a .mdlus checkpoint (neither a tar nor a zip archive)")


def _read_members(members: TarMembers | ZipMembers, label: str) -> tuple[str, bytes, dict, dict]:
    """(member prefix, ``model.pt`` bytes, ``args.json``, ``metadata.json`` or {}) of a checkpoint."""
    names = members.names
    prefix = _member_prefix(names, label)
    if prefix + _ARGS not in names:
        raise CheckpointFormatError(label, f"missing member '{_ARGS}' (members: {short_repr(sorted(names))})")
    model = members.read(prefix + _MODEL)
    args = _json_object(members.read(prefix + _ARGS, _MAX_JSON_BYTES), label, _ARGS)
    metadata = (
        _json_object(members.read(prefix + _METADATA, _MAX_JSON_BYTES), label, _METADATA)
        if prefix + _METADATA in names
        else {}
    )
    return prefix, model, args, metadata
