"""The errors and limits of the checkpoint readers.

Every problem with a checkpoint file -- hostile, corrupt, truncated, too large or
describing an architecture this package cannot build -- is raised as a
:class:`CheckpointFormatError` (a ``ValueError``) that names the file and, where
there is one, the field: the archive member, tensor, pickle opcode or JSON
argument at fault.  Callers that accept files from untrusted sources can catch
that one class; nothing from a library deeper down (``OverflowError``,
``RecursionError``, ``zipfile.BadZipFile``, ``KeyError``...) is let through.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = [
    "CheckpointFormatError",
    "CheckpointLimitError",
    "ReadLimits",
    "UnsafePickleError",
    "UnsupportedCheckpointError",
]


class CheckpointFormatError(ValueError):
    """A checkpoint is malformed, hostile or beyond the reader's limits.

    Attributes:
        path: the file (``archive.mdlus:model.pt`` for a member of a ``.mdlus``).
        field: what inside it is at fault, e.g. ``tensor 'enc.conv.weight'``,
            ``member 'model.pt'`` or ``args.json __args__.num_blocks``; None
            when the whole file is.
        reason: the problem, without the path and field.
    """

    def __init__(self, path: str, reason: str, field: str | None = None) -> None:
        super().__init__(path, reason, field)
        self.path, self.reason, self.field = path, reason, field

    def __str__(self) -> str:
        where = self.path if self.field is None else f"{self.path}: {self.field}"
        return f"{where}: {self.reason}"


class UnsafePickleError(CheckpointFormatError):
    """The pickle asked for something outside the tensor-loading allow-list.

    Raised before the offending global, persistent id or opcode takes effect,
    so no code from the file has been run.
    """


class CheckpointLimitError(CheckpointFormatError):
    """Reading the file would exceed a :class:`ReadLimits` bound (memory, nesting, size)."""


class UnsupportedCheckpointError(CheckpointFormatError):
    """The checkpoint uses an option or class this package does not implement,
    or its arguments do not describe the model its weights come from."""


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """Bounds on what reading one checkpoint may cost, checked before allocating.

    Attributes:
        max_bytes: tensor data one load may hold in memory: the storage records
            it reads plus the arrays it returns.  The default, 4 GiB, fits
            CorrDiff checkpoints (a few hundred MB) with a wide margin; raise it
            for larger trusted files.
        max_expansion: the returned arrays may hold at most this many times the
            bytes of the storages they view, plus 16 MiB.  torch saves a view
            with the storage it views, so an expanded (stride 0) tensor from a
            tiny storage would otherwise be written out in full: a 1.5 KB file
            asking for a (65536, 65536) float32 tensor.
        max_depth: nesting depth of the unpickled object (a state dict is 2-4 deep).
        max_nodes: containers, items and tensors visited while resolving tensors.
    """

    max_bytes: int = 4 << 30
    max_expansion: float = 4.0
    max_depth: int = 100
    max_nodes: int = 10_000_000

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_depth", "max_nodes"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ReadLimits.{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_expansion, (int, float)) or not self.max_expansion >= 1:
            raise ValueError(f"ReadLimits.max_expansion must be a number >= 1, got {self.max_expansion!r}")


EXPANSION_SLACK = 16 << 20

_SCALARS = (str, bytes, int, float, bool, type(None))
_BRACKETS = {tuple: ("(", ")"), list: ("[", "]"), dict: ("{", "}")}


def short_repr(obj: Any, limit: int = 120) -> str:
    """repr() for error messages that stays short and fast on hostile objects.

    A pickle can build, in a few bytes, a tuple DAG whose full repr has 2**40
    parts, a list nested a million deep, or an int whose decimal form Python
    refuses to print; builtins.repr (and reprlib, which calls it for anything
    but plain containers) would hang or raise on those.
    """
    parts: list[str] = []
    budget = [limit]

    def emit(text: str) -> None:
        parts.append(text[: max(budget[0], 0)])
        budget[0] -= len(text)

    def walk(value: Any, depth: int) -> None:
        if budget[0] <= 0:
            return
        if isinstance(value, _SCALARS):
            if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
                emit(f"<{value.bit_length()}-bit int>")
            else:
                emit(repr(value[:limit] if isinstance(value, (str, bytes)) else value))
        elif isinstance(value, (tuple, list, dict)) and depth < 4:
            opening, closing = _BRACKETS[
                tuple if isinstance(value, tuple) else list if isinstance(value, list) else dict
            ]
            emit(opening)
            items = value.items() if isinstance(value, dict) else value
            for i, item in enumerate(items):
                if i >= 8 or budget[0] <= 0:
                    emit(", ...")
                    break
                emit(", " if i else "")
                if isinstance(value, dict):
                    walk(item[0], depth + 1)
                    emit(": ")
                    item = item[1]
                walk(item, depth + 1)
            emit("," + closing if isinstance(value, tuple) and len(value) == 1 else closing)
        else:
            emit(f"<{type(value).__name__}>")

    walk(obj, 0)
    text = "".join(parts)
    return text if budget[0] >= 0 else text + "..."
