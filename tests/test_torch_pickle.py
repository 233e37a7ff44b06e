"""Tests for the torch-free checkpoint readers (that torch is never imported: test_physicsnemo_interop).

Real checkpoints come from tests/fixtures/torch_pickle (made by
make_torch_pickle_fixtures.py with torch); hostile and edge-case pickles are
assembled here from raw opcodes, since torch globals cannot be pickled
without torch.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import shlex
import tarfile
import zipfile

import ml_dtypes
import numpy as np
import pytest

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


def _tensor_pickle(
    key: str,
    numel: int,
    offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    storage: str = "FloatStorage",
    metadata: dict | None = None,
) -> bytes:
    """A data.pkl holding one tensor, laid out exactly as torch.save does."""
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
    return b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + args + b"R."


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
