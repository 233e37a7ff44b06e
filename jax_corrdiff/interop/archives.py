"""Zip and tar members read with bounded memory, for the checkpoint readers.

``torch.save`` writes its zip uncompressed (records are stored, aligned so that
they can be memory-mapped), and PhysicsNeMo writes ``.mdlus`` files as an
uncompressed zip or tar.  Compression therefore never appears in a real
checkpoint, while it is the cheapest way to make a small file expand into
gigabytes: zipfile decompresses bzip2 and lzma members without bounding the
output, tarfile a ``.tar.xz`` container, and deflate reaches a 1000:1 ratio.  So
compression is refused outright, and every member's declared size is checked
against the bytes really in the file before it is read, so reading a member costs no more memory than the file's
size.  Members are read into memory; nothing is extracted to disk.
"""

from __future__ import annotations

import os
import struct
import tarfile
import zipfile
import zlib
from typing import BinaryIO

from jax_corrdiff.interop.errors import CheckpointFormatError, CheckpointLimitError

__all__ = ["TarMembers", "ZipMembers", "compression_of", "is_tar"]

# Everything zipfile, tarfile and the codecs behind them raise on malformed input.
LIBRARY_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,  # includes UnicodeDecodeError of member names
    struct.error,
    zlib.error,
    NotImplementedError,  # e.g. multi-disk zips
    RuntimeError,  # e.g. encrypted members; includes RecursionError
)

_ZIP_METHODS = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard", 95: "xz", 99: "AES"}
# Leading bytes of the compressed containers tarfile would open transparently.
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstandard"}
_ZIP_LOCAL_HEADER = 30


def _size(file: BinaryIO) -> int:
    here = file.tell()
    end = file.seek(0, os.SEEK_END)
    file.seek(here)
    return end


def compression_of(file: BinaryIO) -> str | None:
    """The compressed container format the file starts with, if any."""
    here = file.tell()
    head = file.read(6)
    file.seek(here)
    return next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def is_tar(file: BinaryIO) -> bool:
    """Whether the file is an uncompressed tar (a valid first header)."""
    here = file.tell()
    try:
        with tarfile.open(fileobj=file, mode="r:"):
            return True
    except LIBRARY_ERRORS:
        return False
    finally:
        file.seek(here)


class ZipMembers:
    """The stored (uncompressed) members of a zip archive."""

    def __init__(self, file: BinaryIO, label: str, kind: str = "member") -> None:
        self.label, self.kind, self._file_size = label, kind, _size(file)
        try:
            self._zip = zipfile.ZipFile(file)
            infos = self._zip.infolist()
        except LIBRARY_ERRORS as exc:
            raise CheckpointFormatError(label, f"unreadable zip archive (truncated?): {exc}") from exc
        # Both writers start the first member at byte 0.  zipfile tolerates
        # leading data (self-extracting archives), which made a truncated .mdlus
        # whose tail still held the *inner* model.pt's directory open as that
        # inner archive.
        if infos and min(info.header_offset for info in infos) != 0:
            raise CheckpointFormatError(
                label,
                f"the zip directory found describes members starting at byte "
                f"{min(info.header_offset for info in infos)}, not 0: the file is truncated or "
                "a zip embedded in something else",
            )
        self.names = [info.filename for info in infos if not info.is_dir()]

    def close(self) -> None:
        self._zip.close()

    def read(self, name: str, max_size: int | None = None, size: int | None = None) -> bytes:
        """The member's bytes; ``size``: the exact size expected, ``max_size``: an upper bound."""
        field = f"{self.kind} '{name}'"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointFormatError(self.label, f"missing {field}") from None
        if info.flag_bits & 0x1:
            raise CheckpointFormatError(self.label, "is encrypted, which no checkpoint writer does", field)
        if info.compress_type != zipfile.ZIP_STORED:
            method = _ZIP_METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise CheckpointFormatError(
                self.label,
                f"is compressed ({method}); torch and PhysicsNeMo store members uncompressed, "
                "so this file was repacked -- re-save it uncompressed if it is trusted",
                field,
            )
        if info.compress_size != info.file_size:
            raise CheckpointFormatError(
                self.label, f"declares {info.file_size} bytes stored in {info.compress_size}", field
            )
        if info.header_offset + _ZIP_LOCAL_HEADER + info.file_size > self._file_size:
            raise CheckpointFormatError(
                self.label,
                f"declares {info.file_size} bytes at offset {info.header_offset}, past the end of the "
                f"{self._file_size}-byte file (truncated?)",
                field,
            )
        if size is not None and info.file_size != size:
            raise CheckpointFormatError(self.label, f"holds {info.file_size} bytes, expected {size}", field)
        if max_size is not None and info.file_size > max_size:
            raise CheckpointLimitError(
                self.label, f"holds {info.file_size} bytes, more than the {max_size} allowed", field
            )
        try:
            data = self._zip.read(info)
        except LIBRARY_ERRORS as exc:
            raise CheckpointFormatError(self.label, f"corrupt: {exc}", field) from exc
        if len(data) != info.file_size:
            raise CheckpointFormatError(self.label, f"holds {len(data)} bytes, declared {info.file_size}", field)
        return data


class TarMembers:
    """The regular-file members of an uncompressed tar archive; a leading './' is dropped."""

    def __init__(self, file: BinaryIO, label: str) -> None:
        self.label, file_size = label, _size(file)
        try:
            self._tar = tarfile.open(fileobj=file, mode="r:")  # noqa: SIM115 (closed by close())
            infos = self._tar.getmembers()
        except LIBRARY_ERRORS as exc:
            raise CheckpointFormatError(label, f"unreadable tar archive: {exc}") from exc
        self._members: dict[str, tarfile.TarInfo] = {}
        for info in infos:
            if not info.isfile():
                continue
            field = f"member '{info.name}'"
            # A sparse member is filled with zeros on reading: a few header
            # bytes can declare gigabytes.
            if info.issparse():
                raise CheckpointFormatError(label, "is a sparse file, which no checkpoint writer produces", field)
            # tarfile stops quietly at a truncated member's missing data.
            if info.offset_data + info.size > file_size:
                raise CheckpointFormatError(
                    label, f"declares {info.size} bytes, past the end of the {file_size}-byte file (truncated?)", field
                )
            self._members[info.name.removeprefix("./")] = info
        self.names = list(self._members)

    def close(self) -> None:
        self._tar.close()

    def read(self, name: str, max_size: int | None = None) -> bytes:
        """The member's bytes; ``max_size``: an upper bound."""
        field = f"member '{name}'"
        info = self._members.get(name)
        if info is None:
            raise CheckpointFormatError(self.label, f"missing {field}")
        if max_size is not None and info.size > max_size:
            raise CheckpointLimitError(self.label, f"holds {info.size} bytes, more than the {max_size} allowed", field)
        try:
            handle = self._tar.extractfile(info)
            data = b"" if handle is None else handle.read()
        except LIBRARY_ERRORS as exc:
            raise CheckpointFormatError(self.label, f"corrupt: {exc}", field) from exc
        if len(data) != info.size:
            raise CheckpointFormatError(self.label, f"holds {len(data)} bytes, declared {info.size}", field)
        return data
