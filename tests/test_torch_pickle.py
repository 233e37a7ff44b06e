"""Tests for the torch-free checkpoint readers (that torch is never imported: test_physicsnemo_interop).

Real checkpoints come from tests/fixtures/torch_pickle (made by
make_torch_pickle_fixtures.py with torch); hostile and edge-case pickles are
assembled here from raw opcodes, since torch globals cannot be pickled
without torch.
"""

from __future__ import annotations

import bz2
import collections
import functools
import io
import json
import lzma
import os
import pathlib
import pickle
import shlex
import struct
import tarfile
import zipfile
import zlib

import ml_dtypes
import numpy as np
import pytest
from capped import run_capped

from jax_corrdiff.interop import CheckpointFormatError, CheckpointLimitError, ReadLimits
from jax_corrdiff.interop.mdlus import MdlusArchive, read_mdlus
from jax_corrdiff.interop.torch_pickle import UnsafePickleError, load_torch_checkpoint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch_pickle"
ZIP_PT = FIXTURES / "state_dict_zip.pt"
LEGACY_PT = FIXTURES / "state_dict_legacy.pt"

EXPECTED_DTYPES = {
    "f64_transposed": np.float64,
    "f16": np.float16,
    "bf16": ml_dtypes.bfloat16,
    "i64": np.int64,
    "i32_shared_a": np.int32,
    "i32_shared_b": np.int32,
    "i16": np.int16,
    "i8": np.int8,
    "u8": np.uint8,
    "mask": np.bool_,
    "lin.weight": np.float32,
    "lin.bias": np.float32,
    "param": np.float32,
    "param_with_state": np.float32,
}


def _expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "expected.npz") as npz:
        return {key: npz[key] for key in npz.files}


def _assert_matches_expected(state: dict) -> None:
    expected = _expected()
    assert list(state) == list(expected)
    for key, want in expected.items():
        got = state[key]
        assert got.dtype == np.dtype(EXPECTED_DTYPES[key]), key
        assert got.shape == want.shape, key
        bits = got.view(np.uint16) if got.dtype == ml_dtypes.bfloat16 else got
        assert bits.dtype == want.dtype, key
        np.testing.assert_array_equal(bits, want, err_msg=key)
        assert got.flags.c_contiguous and got.flags.owndata, key


# --- raw pickle assembly -----------------------------------------------------


def _frag(obj: object) -> bytes:
    """Opcodes that push `obj` (a protocol-2 pickle without PROTO and STOP)."""
    return pickle.dumps(obj, protocol=2)[2:-1]


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor_ops(
    key: str,
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage: str = "FloatStorage",
    metadata: dict | None = None,
) -> bytes:
    """Opcodes that push one tensor, laid out exactly as torch.save writes it."""
    pid = b"(" + _frag("storage") + _global("torch", storage) + _frag(key) + _frag("cpu") + _frag(numel) + b"tQ"
    args = (
        b"("
        + pid
        + _frag(offset)
        + _frag(size)
        + _frag(stride)
        + _frag(False)
        + _global("collections", "OrderedDict")
        + b")R"
        + (b"" if metadata is None else _frag(metadata))
        + b"t"
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _tensor_pickle(*args, **kwargs) -> bytes:
    """A data.pkl holding one tensor (arguments as _tensor_ops)."""
    return b"\x80\x02" + _tensor_ops(*args, **kwargs) + b"."


def _torch_zip(
    pkl: bytes,
    records: dict[str, bytes],
    root: str = "archive",
    byteorder: bytes = b"little",
) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(f"{root}/data.pkl", pkl)
        archive.writestr(f"{root}/byteorder", byteorder)
        for key, data in records.items():
            archive.writestr(f"{root}/data/{key}", data)
        archive.writestr(f"{root}/version", b"3\n")
    return buf.getvalue()


def _legacy_stream(pkl: bytes) -> bytes:
    header = [0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}]
    return b"".join(pickle.dumps(x, protocol=2) for x in header) + pkl


class _Payload:
    def __init__(self, func: object, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return self.func, (self.arg,)


def _payloads(marker: pathlib.Path) -> dict[str, _Payload]:
    return {
        "os.system": _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
        "builtins.eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
    }


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize("path", [ZIP_PT, LEGACY_PT], ids=["zip", "legacy"])
def test_fixture_round_trip(path: pathlib.Path) -> None:
    state = load_torch_checkpoint(path)
    assert type(state) is collections.OrderedDict
    _assert_matches_expected(state)
    # The `_metadata` attribute that state_dict() attaches survives BUILD.
    assert state._metadata["lin"] == {"version": 1}


@pytest.mark.parametrize("path", [ZIP_PT, LEGACY_PT], ids=["zip", "legacy"])
def test_views_honour_strides_and_offsets(path: pathlib.Path) -> None:
    state = load_torch_checkpoint(path)
    base = np.arange(12, dtype=np.float64).reshape(3, 4) / 8 - 0.75
    np.testing.assert_array_equal(state["f64_transposed"], base.T)
    shared = np.arange(10, dtype=np.int32) * 7 - 20
    np.testing.assert_array_equal(state["i32_shared_a"], shared[2:5])
    np.testing.assert_array_equal(state["i32_shared_b"], shared[4:].reshape(2, 3))
    assert not np.shares_memory(state["i32_shared_a"], state["i32_shared_b"])
    state["i32_shared_a"][:] = 0  # arrays are writable and independent
    assert state["i32_shared_b"][0, 0] == shared[4]


@pytest.mark.parametrize("path", [ZIP_PT, LEGACY_PT], ids=["zip", "legacy"])
def test_bytes_and_file_object_sources(path: pathlib.Path) -> None:
    raw = path.read_bytes()
    _assert_matches_expected(load_torch_checkpoint(raw))
    with open(path, "rb") as handle:
        _assert_matches_expected(load_torch_checkpoint(handle))


def test_any_archive_root_and_big_endian() -> None:
    values = np.array([1.5, -2.0, 3.25, 8.0], dtype=np.float32)
    pkl = _tensor_pickle("7", 4, 1, (2,), (2,))
    little = _torch_zip(pkl, {"7": values.tobytes()}, root="my-model")
    big = _torch_zip(pkl, {"7": values.astype(">f4").tobytes()}, root="x", byteorder=b"big")
    for data in (little, big):
        out = load_torch_checkpoint(data)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, [-2.0, 8.0])


def test_big_endian_bfloat16() -> None:
    values = np.array([1.5, -2.0, 0.15625], dtype=ml_dtypes.bfloat16)
    big_bytes = values.view(np.uint16).astype(">u2").tobytes()
    pkl = _tensor_pickle("0", 3, 0, (3,), (1,), storage="BFloat16Storage")
    out = load_torch_checkpoint(_torch_zip(pkl, {"0": big_bytes}, byteorder=b"big"))
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out.view(np.uint16), values.view(np.uint16))


def test_negative_view_metadata() -> None:
    values = np.array([1.0, -2.0], dtype=np.float32)
    pkl = _tensor_pickle("0", 2, 0, (2,), (1,), metadata={"neg": True})
    out = load_torch_checkpoint(_torch_zip(pkl, {"0": values.tobytes()}))
    np.testing.assert_array_equal(out, [-1.0, 2.0])


# --- hostile files -----------------------------------------------------------


@pytest.mark.parametrize("target", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_zip_refused_without_running(tmp_path: pathlib.Path, target: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_payloads(marker)[target], protocol=protocol)
    # The pickler writes os.system as posix.system, and builtins as
    # __builtin__ below protocol 3.
    refused = {
        "os.system": r"(posix|nt|os)\.system",
        "builtins.eval": r"(__builtin__|builtins)\.eval",
    }
    with pytest.raises(UnsafePickleError, match=rf"'{refused[target]}'.*no code from the file was run"):
        load_torch_checkpoint(_torch_zip(payload, {}))
    assert not marker.exists()
    pickle.loads(payload)  # control: the same bytes do run code under plain pickle
    assert marker.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval"])
@pytest.mark.parametrize("framed", [False, True], ids=["bare-pickle", "legacy-header"])
def test_malicious_legacy_refused_without_running(tmp_path: pathlib.Path, target: str, framed: bool) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_payloads(marker)[target], protocol=2)
    data = _legacy_stream(payload) if framed else payload
    with pytest.raises(UnsafePickleError, match="no code from the file was run"):
        load_torch_checkpoint(data)
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("functools", "partial"),
        ("subprocess", "Popen"),
        ("builtins", "getattr"),
        ("torch", "load"),
        ("torch", "Tensor"),
        ("torch._utils", "_rebuild_from_type_v2"),
        ("torch.storage", "UntypedStorage"),
        ("collections", "OrderedDict.fromkeys"),
    ],
)
def test_globals_outside_allow_list_refused(module: str, name: str) -> None:
    pkl = b"\x80\x02" + _global(module, name) + b")R."
    with pytest.raises(UnsafePickleError, match=rf"'{module}\.{name}'"):
        load_torch_checkpoint(_torch_zip(pkl, {}))


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02" + _frag(("module", "Net", "net.py", "source")) + b"Q.",
        b"\x80\x02" + _frag(("storage", "FloatStorage", "0", "cpu", 4)) + b"Q.",
        b"\x80\x02("
        + _frag("storage")
        + _global("torch", "FloatStorage")
        + _frag("0")
        + _frag("cpu")
        + _frag(4)
        + _frag(("0", 0, 4))
        + b"tQ.",
        b"P0\n.",
    ],
    ids=["module-record", "type-not-a-storage", "storage-view", "protocol-0-string"],
)
def test_unknown_persistent_ids_refused(pkl: bytes) -> None:
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_torch_checkpoint(_torch_zip(pkl, {}))


@pytest.mark.parametrize(
    "pkl, refused",
    [
        (b"\x80\x02]}b.", "BUILD on a list"),
        (
            b"\x80\x02" + _global("collections", "OrderedDict") + b")R" + _frag({1: 2}) + b"b.",
            "BUILD on a OrderedDict",
        ),
        (b"\x80\x02" + _global("collections", "OrderedDict") + b")\x81.", "NEWOBJ"),
        (b"\x80\x02" + _global("torch", "FloatStorage") + b")R.", "call of _StorageType"),
        (b"\x80\x02\x82\x01.", "EXT1"),
    ],
    ids=["build-list", "build-odict-int-keys", "newobj", "call-storage-type", "ext1"],
)
def test_unexpected_opcodes_refused(pkl: bytes, refused: str) -> None:
    with pytest.raises(UnsafePickleError, match=refused):
        load_torch_checkpoint(_torch_zip(pkl, {}))


# --- corrupt files -----------------------------------------------------------


def test_truncated_zip() -> None:
    raw = ZIP_PT.read_bytes()
    with pytest.raises(ValueError, match="truncated"):
        load_torch_checkpoint(raw[: len(raw) // 2])


def test_truncated_legacy() -> None:
    raw = LEGACY_PT.read_bytes()
    with pytest.raises(ValueError, match="truncated"):
        load_torch_checkpoint(raw[:-10])


def test_not_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_torch_checkpoint(b"hello, world")


def test_missing_storage_record() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(ZIP_PT) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            if info.filename != "state_dict_zip/data/0":
                dst.writestr(info, src.read(info))
    with pytest.raises(ValueError, match="missing record 'state_dict_zip/data/0'"):
        load_torch_checkpoint(buf.getvalue())


@pytest.mark.parametrize(
    "offset, size, stride, match",
    [
        (2, (3,), (1,), "runs past storage"),
        (0, (2, 2), (1, 3), "runs past storage"),
        (0, (2,), (-1,), "non-negative"),
    ],
)
def test_out_of_bounds_views_rejected(offset: int, size: tuple[int, ...], stride: tuple[int, ...], match: str) -> None:
    pkl = _tensor_pickle("0", 4, offset, size, stride)
    with pytest.raises(ValueError, match=match):
        load_torch_checkpoint(_torch_zip(pkl, {"0": bytes(16)}))


def test_storage_record_size_mismatch() -> None:
    pkl = _tensor_pickle("0", 4, 0, (4,), (1,))
    with pytest.raises(ValueError, match="holds 12 bytes"):
        load_torch_checkpoint(_torch_zip(pkl, {"0": bytes(12)}))


# --- .mdlus ------------------------------------------------------------------

ARGS = {
    "__name__": "SongUNet",
    "__module__": "physicsnemo.models",
    "__args__": {"img_channels": 4},
}
METADATA = {"physicsnemo_version": "1.0.0", "mdlus_file_version": "0.1.0"}


def _zip_mdlus(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tar_mdlus(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_read_mdlus_zip_and_tar_agree(tmp_path: pathlib.Path) -> None:
    model = ZIP_PT.read_bytes()
    args = json.dumps(ARGS).encode()
    # Deliberately misleading suffixes: the container is detected by content.
    zipped = _zip_mdlus(
        tmp_path / "new.tar",
        {"model.pt": model, "args.json": args, "metadata.json": json.dumps(METADATA).encode()},
    )
    tarred = _tar_mdlus(tmp_path / "old.mdlus", {"ckpt/model.pt": model, "ckpt/args.json": args})
    new, old = read_mdlus(zipped), read_mdlus(tarred)
    assert isinstance(new, MdlusArchive) and new.path == str(zipped)
    assert new.args == old.args == ARGS
    assert new.metadata == METADATA and old.metadata == {}
    assert type(new.state_dict) is dict
    _assert_matches_expected(new.state_dict)
    assert list(old.state_dict) == list(new.state_dict)
    for key, value in new.state_dict.items():
        assert old.state_dict[key].dtype == value.dtype
        np.testing.assert_array_equal(old.state_dict[key], value)


@pytest.mark.parametrize("writer", [_zip_mdlus, _tar_mdlus], ids=["zip", "tar"])
def test_read_mdlus_missing_members(tmp_path: pathlib.Path, writer) -> None:
    model, args = ZIP_PT.read_bytes(), json.dumps(ARGS).encode()
    no_args = writer(tmp_path / "a.mdlus", {"model.pt": model})
    with pytest.raises(ValueError, match=r"a\.mdlus: missing member 'args\.json'"):
        read_mdlus(no_args)
    no_model = writer(tmp_path / "b.mdlus", {"args.json": args})
    with pytest.raises(ValueError, match=r"b\.mdlus: missing member 'model\.pt'"):
        read_mdlus(no_model)


def test_read_mdlus_rejects_nested_checkpoint(tmp_path: pathlib.Path) -> None:
    nested = _torch_zip(pickle.dumps({"state_dict": {}, "epoch": 3}, protocol=2), {})
    path = _zip_mdlus(tmp_path / "c.mdlus", {"model.pt": nested, "args.json": b"{}"})
    with pytest.raises(ValueError, match="nested 'state_dict'"):
        read_mdlus(path)


def test_read_mdlus_refuses_malicious_model(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_payloads(marker)["builtins.eval"], protocol=2)
    path = _zip_mdlus(tmp_path / "d.mdlus", {"model.pt": _torch_zip(payload, {}), "args.json": b"{}"})
    with pytest.raises(UnsafePickleError, match=r"d\.mdlus:model\.pt"):
        read_mdlus(path)
    assert not marker.exists()


def test_read_mdlus_not_an_archive(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "e.mdlus"
    path.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="neither a tar nor a zip"):
        read_mdlus(path)


# --- bounded memory and time --------------------------------------------------
# Each file here once made the reader allocate gigabytes, hang, or fail with an
# exception from deep inside a library.  Those that cost memory or time are read
# in a child process under a memory cap and a time limit (tests/capped.py).

PHYSICSNEMO_MDLUS = FIXTURES.parent / "physicsnemo" / "edm_posembd_sin4_hrmean.mdlus"
# The child may use this much beyond its imports; the bomb payloads are several
# times larger, yet quick to compress.
HEADROOM_MIB = 64
PAYLOAD = 160 << 20


def _read_capped(path: pathlib.Path, reader: str = "read_mdlus", summary: str = "type(r).__name__") -> str:
    """The outcome line of ``reader(path)`` in a capped child (see tests/capped.py)."""
    outcomes = run_capped(
        f"case('read', lambda: (lambda r: {summary})({reader}(sys.argv[1])))",
        setup="from jax_corrdiff.interop import load_torch_checkpoint, read_mdlus",
        headroom_mib=HEADROOM_MIB,
        timeout_s=60,
        args=(str(path),),
    )
    return outcomes["read"]


def _state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    """A data.pkl of {key: value}, each value given as the opcodes that push it."""
    return b"\x80\x02}(" + b"".join(_frag(key) + ops for key, ops in entries.items()) + b"u."


def _put(index: int) -> bytes:  # LONG_BINPUT: memo indices far from those _frag uses
    return b"r" + struct.pack("<I", index)


def _get(index: int) -> bytes:  # LONG_BINGET
    return b"j" + struct.pack("<I", index)


def _tuple_dag(leaf: bytes, levels: int) -> bytes:
    """Opcodes pushing t_levels, where t_0 = leaf and t_{k+1} = (t_k, t_k) through the memo."""
    ops = leaf + _put(1000)
    for k in range(levels):
        ops += b"0" + _get(1000 + k) + _get(1000 + k) + b"\x86" + _put(1001 + k)  # POP, GET, GET, TUPLE2, PUT
    return ops


def _mdlus(path: pathlib.Path, pkl: bytes, records: dict[str, bytes]) -> pathlib.Path:
    return _zip_mdlus(path, {"model.pt": _torch_zip(pkl, records), "args.json": b"{}"})


def _raw_zip(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of (name, data as stored, declared size, method, flag bits), written by hand
    so compressed data can be produced quickly and flags set freely.  Compressed
    members are taken to hold zeros (see _zeros_compressed)."""
    out, directory = io.BytesIO(), b""
    for name, data, size, method, flags in members:
        if method == zipfile.ZIP_STORED:
            crc = zlib.crc32(data)
        else:
            crc, chunk = 0, bytes(1 << 20)
            for _ in range(size >> 20):
                crc = zlib.crc32(chunk, crc)
        offset, raw_name = out.tell(), name.encode()
        fields = (20, flags, method, 0, 0, crc, len(data), size, len(raw_name), 0)
        out.write(struct.pack("<4s5HL2L2H", b"PK\x03\x04", *fields) + raw_name + data)
        directory += struct.pack("<4sH5HL2L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, offset) + raw_name
    start = out.tell()
    count = len(members)
    out.write(directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(directory), start, 0))
    return out.getvalue()


@functools.cache
def _zeros_compressed(method: str, size: int) -> bytes:
    """``size`` zero bytes as a zip member's data under ``method``, built without holding them."""
    chunk = bytes(1 << 20)
    if method == "deflate":
        # After a full flush deflate starts afresh, so every 1 MiB segment is
        # the same bytes: a gigabyte costs a copy, not a compression.
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        segment = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
        return segment * (size >> 20) + comp.flush()
    if method == "bzip2":
        comp = bz2.BZ2Compressor()
        head = b""
    else:  # zip's lzma: version, properties size, LZMA1 properties, then a raw stream
        filters = [{"id": lzma.FILTER_LZMA1, "preset": 0}]
        props = lzma._encode_filter_properties(filters[0])
        comp = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=filters)
        head = struct.pack("<BBH", 9, 4, len(props)) + props
    return head + b"".join(comp.compress(chunk) for _ in range(size >> 20)) + comp.flush()


_METHODS = {"deflate": zipfile.ZIP_DEFLATED, "bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA}


class _Zeros(io.RawIOBase):
    """A readable stream of ``size`` zero bytes."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_capped_child_reads_real_checkpoints() -> None:
    """The cap leaves room for real files, so the refusals below are the reader's doing."""
    outcomes = run_capped(
        "case('mdlus', lambda: len(read_mdlus(sys.argv[1]).state_dict))\n"
        "case('pt', lambda: len(load_torch_checkpoint(sys.argv[2])))\n",
        setup="from jax_corrdiff.interop import load_torch_checkpoint, read_mdlus",
        headroom_mib=HEADROOM_MIB,
        timeout_s=60,
        args=(str(PHYSICSNEMO_MDLUS), str(ZIP_PT)),
    )
    assert outcomes == {"mdlus": "ok: 209", "pt": f"ok: {len(_expected())}"}


@pytest.mark.parametrize("side", [16384, 65536], ids=["1GiB", "16GiB"])
def test_expanded_view_refused_before_allocating(tmp_path: pathlib.Path, side: int) -> None:
    """A stride-0 view of a one-element storage, in a 1.5 KB .mdlus."""
    pkl = _state_dict_pickle({"w": _tensor_ops("0", 1, 0, (side, side), (0, 0))})
    path = _mdlus(tmp_path / "expanded.mdlus", pkl, {"0": bytes(4)})
    assert path.stat().st_size < 2048
    outcome = _read_capped(path)
    assert outcome.startswith("CheckpointLimitError: "), outcome
    assert f"{path}:model.pt: tensor 'w': " in outcome


def test_expanded_views_within_limits_load() -> None:
    pkl = _state_dict_pickle({"w": _tensor_ops("0", 2, 1, (3, 4), (0, 0))})
    data = _torch_zip(pkl, {"0": np.array([1.0, 7.0], np.float32).tobytes()})
    np.testing.assert_array_equal(load_torch_checkpoint(data)["w"], np.full((3, 4), 7.0, np.float32))
    with pytest.raises(CheckpointLimitError, match=r"tensor 'w': .*max_bytes=32"):
        load_torch_checkpoint(data, limits=ReadLimits(max_bytes=32))


def test_memo_shared_tensor_becomes_one_array(tmp_path: pathlib.Path) -> None:
    """One 4 MiB tensor referenced 256 times through the memo: one array, not 256 copies."""
    numel = 1 << 20
    entries = {"t0": _tensor_ops("0", numel, 0, (numel,), (1,)) + _put(1000)}
    entries |= {f"t{i}": _get(1000) for i in range(1, 256)}
    values = np.arange(numel, dtype=np.float32)
    path = _mdlus(tmp_path / "shared.mdlus", _state_dict_pickle(entries), {"0": values.tobytes()})
    state = read_mdlus(path).state_dict
    assert len(state) == 256 and all(value is state["t0"] for value in state.values())
    np.testing.assert_array_equal(state["t0"], values)
    summary = "len({id(v) for v in r.state_dict.values()})"
    assert _read_capped(path, summary=summary) == "ok: 1"


def test_memo_built_tuple_dag_resolves_once(tmp_path: pathlib.Path) -> None:
    """t_{k+1} = (t_k, t_k) for 40 levels: 2**40 paths to one tensor in a 1.7 KB file."""
    pkl = b"\x80\x02" + _tuple_dag(_tensor_ops("0", 1, 0, (1,), (1,)), 40) + b"."
    path = tmp_path / "dag.pt"
    path.write_bytes(_torch_zip(pkl, {"0": np.float32(3.0).tobytes()}))
    assert path.stat().st_size < 2048
    assert _read_capped(path, "load_torch_checkpoint") == "ok: tuple"
    node = load_torch_checkpoint(path)
    for _ in range(40):
        assert node[0] is node[1]
        node = node[0]
    np.testing.assert_array_equal(node, [3.0])


@pytest.mark.parametrize(
    "ops, refused",
    [
        (b"}" + _tuple_dag(_frag(1), 40) + _frag(0) + b"s", "a tuple as a dict key"),
        (_tuple_dag(_frag(1), 40) + b"Q", "persistent id"),
    ],
    ids=["dict-key", "persistent-id-in-message"],
)
def test_tuple_dag_is_never_hashed_or_printed(tmp_path: pathlib.Path, ops: bytes, refused: str) -> None:
    """Hashing a dict key, or printing a refused value, walks every path of the DAG."""
    path = tmp_path / "dag.pt"
    path.write_bytes(_torch_zip(b"\x80\x02" + ops + b".", {}))
    outcome = _read_capped(path, "load_torch_checkpoint")
    assert outcome.startswith("UnsafePickleError: ") and refused in outcome, outcome


def test_nesting_depth_and_object_count_are_bounded() -> None:
    deep = b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b"."  # a list nested 100000 deep
    with pytest.raises(CheckpointLimitError, match="max_depth=100"):
        load_torch_checkpoint(_torch_zip(deep, {}))
    wide = pickle.dumps(list(range(1000)), protocol=2)
    assert len(load_torch_checkpoint(_torch_zip(wide, {}))) == 1000
    with pytest.raises(CheckpointLimitError, match="max_nodes=100 "):
        load_torch_checkpoint(_torch_zip(wide, {}), limits=ReadLimits(max_nodes=100))


@pytest.mark.parametrize(
    "method, where",
    [("bzip2", "record"), ("lzma", "record"), ("deflate", "model.pt"), ("lzma", "model.pt")],
)
def test_compressed_zip_members_refused(tmp_path: pathlib.Path, method: str, where: str) -> None:
    """Zip bombs: torch and PhysicsNeMo store members uncompressed, so nothing is decompressed."""
    size = (1 << 30) if method == "deflate" else PAYLOAD
    bomb = _zeros_compressed(method, size)
    stored = lambda name, data: (name, data, len(data), zipfile.ZIP_STORED, 0)  # noqa: E731
    if where == "record":
        pkl = _state_dict_pickle({"w": _tensor_ops("0", size // 4, 0, (size // 4,), (1,))})
        inner = _raw_zip([stored("archive/data.pkl", pkl), ("archive/data/0", bomb, size, _METHODS[method], 0)])
        outer = _raw_zip([stored("model.pt", inner), stored("args.json", b"{}")])
        member = "record 'archive/data/0'"
    else:
        outer = _raw_zip([("model.pt", bomb, size, _METHODS[method], 0), stored("args.json", b"{}")])
        member = "member 'model.pt'"
    path = tmp_path / "bomb.mdlus"
    path.write_bytes(outer)
    assert path.stat().st_size < size // 100
    outcome = _read_capped(path)
    assert outcome.startswith("CheckpointFormatError: ") and f"{member}: is compressed ({method})" in outcome, outcome


@pytest.mark.parametrize("compression", ["xz", "gz"])
def test_compressed_tar_container_refused(tmp_path: pathlib.Path, compression: str) -> None:
    """A .tar.xz of a few hundred KB would decompress to gigabytes; old .mdlus tars are plain."""
    path = tmp_path / f"bomb.tar.{compression}"
    options = {"preset": 0} if compression == "xz" else {"compresslevel": 1}
    with tarfile.open(path, f"w:{compression}", **options) as tar:
        args = tarfile.TarInfo("args.json")
        args.size = 2
        tar.addfile(args, io.BytesIO(b"{}"))
        model = tarfile.TarInfo("model.pt")
        model.size = PAYLOAD
        tar.addfile(model, _Zeros(PAYLOAD))
    outcome = _read_capped(path)
    assert outcome.startswith("CheckpointFormatError: ") and "-compressed" in outcome, outcome


def test_truncated_mdlus_is_reported_as_truncated(tmp_path: pathlib.Path) -> None:
    """Cut inside args.json, the file still ends with model.pt's own zip directory,
    which zipfile used to open as if it were the .mdlus."""
    path = tmp_path / "cut.mdlus"
    raw = PHYSICSNEMO_MDLUS.read_bytes()
    path.write_bytes(raw[: raw.index(b"__args__")])
    with pytest.raises(CheckpointFormatError, match="not 0: the file is truncated") as caught:
        read_mdlus(path)
    assert caught.value.path == str(path) and "data.pkl" not in str(caught.value)


@pytest.mark.parametrize(
    "flags, method, match",
    [(0x1, zipfile.ZIP_STORED, "is encrypted"), (0, 6, r"is compressed \(method 6\)")],
    ids=["encrypted", "imploded"],
)
def test_unreadable_zip_records_are_named(flags: int, method: int, match: str) -> None:
    """zipfile raises RuntimeError for encryption, NotImplementedError for unknown methods."""
    pkl = pickle.dumps({"a": 1}, protocol=2)
    data = _raw_zip([("archive/data.pkl", pkl, len(pkl), method, flags)])
    with pytest.raises(CheckpointFormatError, match=rf"<bytes>: record 'archive/data.pkl': {match}"):
        load_torch_checkpoint(data)


@pytest.mark.parametrize(
    "size, stride, error, match",
    [
        ((1 << 63,), (0,), CheckpointFormatError, "non-negative int64"),
        ((1 << 40, 1 << 40), (0, 0), CheckpointLimitError, "max_bytes"),
        ((1,) * 65, (0,) * 65, CheckpointFormatError, "at most 64 ints"),
        ((2,), (1.5,), CheckpointFormatError, "non-negative int64"),
        ((2, 2), (1,), CheckpointFormatError, "differ in rank"),
    ],
    ids=["int64-overflow", "too-big", "too-many-dims", "float-stride", "rank-mismatch"],
)
def test_malformed_tensor_fields_are_named(size: tuple, stride: tuple, error: type, match: str) -> None:
    """These used to surface as OverflowError or NumPy's 'array is too big' ValueError."""
    pkl = _state_dict_pickle({"w": _tensor_ops("0", 1, 0, size, stride)})
    with pytest.raises(error, match=rf"<bytes>: tensor 'w': .*{match}") as caught:
        load_torch_checkpoint(_torch_zip(pkl, {"0": bytes(4)}))
    assert caught.value.field == "tensor 'w'"


@pytest.mark.parametrize(
    "state, refused",
    [
        (b"(" + _frag("items") + _global("collections", "OrderedDict") + b"d", "setting {'items'"),
        (b"(" + _frag("_metadata") + b"}" + _frag("x") + _frag(1) + b"d", "setting {'_metadata'"),
    ],
    ids=["shadow-items", "extra-attribute"],
)
def test_build_sets_nothing_but_metadata(tmp_path: pathlib.Path, state: bytes, refused: str) -> None:
    """An `items` attribute made the state dict's .items() return nothing: an empty model, silently."""
    pkl = (
        b"\x80\x02"
        + _global("collections", "OrderedDict")
        + b")R("
        + _frag("w")
        + _tensor_ops("0", 1, 0, (1,), (1,))
        + b"u"
        + state
        + b"b."
    )
    path = _mdlus(tmp_path / "shadow.mdlus", pkl, {"0": bytes(4)})
    with pytest.raises(UnsafePickleError, match=rf"BUILD on a OrderedDict {refused}"):
        read_mdlus(path)


def test_errors_are_one_hierarchy() -> None:
    assert issubclass(UnsafePickleError, CheckpointFormatError)
    assert issubclass(CheckpointLimitError, CheckpointFormatError)
    assert issubclass(CheckpointFormatError, ValueError)
    error = CheckpointFormatError("f.mdlus", "is odd", "tensor 'w'")
    assert str(error) == "f.mdlus: tensor 'w': is odd" and error.reason == "is odd"
    with pytest.raises(ValueError, match="max_bytes"):
        ReadLimits(max_bytes=0)
