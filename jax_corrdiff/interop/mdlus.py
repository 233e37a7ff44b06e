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
folder.  The container is recognised by content, tar first: a tar whose last
member is the zip-format ``model.pt`` also passes ``zipfile.is_zipfile``.
Members are read into memory; nothing is extracted to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from jax_corrdiff.interop.torch_pickle import load_torch_checkpoint

__all__ = ["MdlusArchive", "read_mdlus"]

_MODEL = "model.pt"
_ARGS = "args.json"
_METADATA = "metadata.json"


@dataclasses.dataclass(frozen=True)
class MdlusArchive:
    """The contents of a ``.mdlus`` checkpoint."""

    state_dict: dict[str, np.ndarray]
    args: dict
    metadata: dict
    path: str


@contextlib.contextmanager
def _open_members(path: str) -> Iterator[tuple[list[str], Callable[[str], bytes]]]:
    """Yield the archive's file names and a reader returning a member's bytes."""
    if tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}

            def read_tar(name: str) -> bytes:
                handle = tar.extractfile(members[name])
                assert handle is not None  # isfile() members always have data
                return handle.read()

            yield list(members), read_tar
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if not n.endswith("/")]
            yield names, archive.read
    else:
        raise ValueError(f"{path}: not a .mdlus checkpoint (neither a tar nor a zip archive)")


def _member_prefix(names: list[str], path: str) -> str:
    """Return '' or '<folder>/', wherever model.pt sits."""
    candidates = sorted(
        n[: -len(_MODEL)] for n in names if n == _MODEL or (n.endswith("/" + _MODEL) and n.count("/") == 1)
    )
    if not candidates:
        raise ValueError(f"{path}: missing member '{_MODEL}' (members: {sorted(names)})")
    if len(candidates) > 1 and "" not in candidates:
        raise ValueError(f"{path}: ambiguous '{_MODEL}' members under {candidates}")
    return candidates[0]


def _json_object(raw: bytes, path: str, member: str) -> dict:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: member '{member}' is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: member '{member}' holds {type(value).__name__}, not an object")
    return value


def _flat_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: '{_MODEL}' holds {type(obj).__name__}, not a state dict")
    for nested in ("state_dict", "model"):
        if isinstance(obj.get(nested), dict):
            raise ValueError(
                f"{path}: '{_MODEL}' holds a training checkpoint with a nested "
                f"'{nested}' entry, not a flat state dict of tensors"
            )
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key] = value
    return state


def read_mdlus(path: str | os.PathLike[str]) -> MdlusArchive:
    """Read a ``.mdlus`` checkpoint (zip or legacy tar) into NumPy arrays.

    Raises:
        ValueError: the file is not a tar/zip archive, lacks ``model.pt`` or
            ``args.json``, or holds something other than a flat state dict.
        UnsafePickleError: ``model.pt`` references code beyond plain tensors.
    """
    label = os.fspath(path)
    try:
        with _open_members(label) as (names, read):
            prefix = _member_prefix(names, label)
            if prefix + _ARGS not in names:
                raise ValueError(f"{label}: missing member '{_ARGS}' (members: {sorted(names)})")
            model = read(prefix + _MODEL)
            args = _json_object(read(prefix + _ARGS), label, _ARGS)
            metadata = _json_object(read(prefix + _METADATA), label, _METADATA) if prefix + _METADATA in names else {}
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{label}: corrupt archive: {exc}") from exc
    member = io.BytesIO(model)
    member.name = f"{label}:{prefix}{_MODEL}"  # so loader errors name the member
    state = load_torch_checkpoint(member)
    return MdlusArchive(state_dict=_flat_state_dict(state, label), args=args, metadata=metadata, path=label)
