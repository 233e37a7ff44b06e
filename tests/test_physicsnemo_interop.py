"""PhysicsNeMo checkpoints in: parity with the reference fixtures, converter, key forms."""

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import jax
import numpy as np
import pytest
from capped import run_capped

from jax_corrdiff.interop import CheckpointFormatError, CheckpointLimitError, ReadLimits, parity, physicsnemo
from jax_corrdiff.interop.mdlus import read_mdlus
from jax_corrdiff.interop.torch_pickle import UnsafePickleError
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "physicsnemo")
CASES = parity.read_manifest(FIXTURES)["cases"]
DIFFUSION = os.path.join(FIXTURES, "edm_posembd_sin4_hrmean.mdlus")


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_physicsnemo_reference(case):
    ours, reference = parity.run_case(FIXTURES, case)
    assert ours.shape == reference.shape
    assert parity.relative_error(ours, reference) <= 1e-4


def test_fixture_set_covers_every_required_case():
    names = {c["model_class"] for c in CASES}
    assert {"CorrDiffRegressionUNet", "EDMPrecondSuperResolution", "EDMPrecondSR", "SongUNet"} <= names
    calls = {c["call"] for c in CASES}
    assert calls == {"forward", "stochastic_sampler", "deterministic_sampler"}
    sigmas = np.load(os.path.join(FIXTURES, "edm_posembd_sin4_hrmean.npz"))["sigma"]
    np.testing.assert_allclose(sorted(sigmas), [0.002, 0.5, 10, 800], rtol=1e-6)


def _reference_output(name):
    case = next(c for c in CASES if c["name"] == name)
    data = np.load(os.path.join(FIXTURES, case["data"]))
    return case, data


def test_legacy_attention_key_names_convert_identically():
    archive = read_mdlus(DIFFUSION)
    legacy = {
        re.sub(r"\.attn\.norm\.", ".norm2.", re.sub(r"\.attn\.(qkv|proj)\.", r".\1.", k)): v
        for k, v in archive.state_dict.items()
    }
    assert legacy.keys() != archive.state_dict.keys()
    config = physicsnemo.model_config_from_args(archive)
    new = physicsnemo.convert_state_dict(archive, config)
    old = physicsnemo.convert_state_dict(dataclasses.replace(archive, state_dict=legacy), config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, old)


def test_tar_form_mdlus_loads_like_zip(tmp_path):
    tar_path = tmp_path / "old.mdlus"
    with zipfile.ZipFile(DIFFUSION) as zf, tarfile.open(tar_path, "w") as tar:
        for name in zf.namelist():
            payload = zf.read(name)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    case, data = _reference_output("edm_posembd_sin4_hrmean")
    out = physicsnemo.load(str(tar_path))(data["x"], data["img_lr"], data["sigma"])
    assert parity.relative_error(out, data["output"]) <= 1e-4


def test_callable_follows_torch_forward_signatures():
    case, data = _reference_output("regression_unet_posembd_sin4")
    model = physicsnemo.load(os.path.join(FIXTURES, case["model"]))
    assert model.config["kind"] == "regression" and model.class_name == "CorrDiffRegressionUNet"
    out = model(data["x"], data["img_lr"], force_fp32=True)
    assert out.dtype == np.float32 and out.shape == data["output"].shape
    case, data = _reference_output("edm_posltembd")
    model = physicsnemo.load(os.path.join(FIXTURES, case["model"]))
    out = model(data["x"], data["img_lr"], data["sigma"], lead_time_label=data["lead_time_label"])
    assert parity.relative_error(out, data["output"]) <= 1e-4


def test_convert_command_writes_a_reloadable_model_dir(tmp_path):
    out_dir = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "jax_corrdiff.convert", "--physicsnemo", DIFFUSION, "--output", str(out_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = load_model(str(out_dir))
    config, variables = saved.config, saved.variables
    assert config["kind"] == "diffusion" and saved.source["class"] == "EDMPrecondSuperResolution"
    assert saved.matmul_precision == physicsnemo.MATMUL_PRECISION and saved.conditioning is None
    case, data = _reference_output("edm_posembd_sin4_hrmean")
    nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    out = build_model(config).apply(variables, nhwc(data["x"]), nhwc(data["img_lr"]), data["sigma"])
    assert parity.relative_error(np.asarray(out).transpose(0, 3, 1, 2), data["output"]) <= 1e-4


# Run a command with ``import torch`` (and any torch submodule) raising ImportError.
WITHOUT_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch must not be imported")

sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def test_conversion_never_imports_torch(tmp_path):
    out_dir = tmp_path / "converted"
    command = ["jax_corrdiff.convert", "--physicsnemo", DIFFUSION, "--output", str(out_dir)]
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *command], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load_model(str(out_dir)).config["kind"] == "diffusion"


def _rewrite(tmp_path, src, name, args=None, model_pt=None):
    dst = tmp_path / name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for member in zin.namelist():
            payload = zin.read(member)
            if member == "args.json" and args is not None:
                payload = json.dumps(args).encode()
            if member == "model.pt" and model_pt is not None:
                payload = model_pt
            zout.writestr(member, payload)
    return str(dst)


def test_unsupported_options_are_named(tmp_path):
    args = read_mdlus(DIFFUSION).args
    bad = json.loads(json.dumps(args))
    bad["__args__"]["resample_filter"] = [1, 3, 3, 1]
    with pytest.raises(physicsnemo.UnsupportedCheckpointError, match="resample_filter"):
        physicsnemo.load(_rewrite(tmp_path, DIFFUSION, "filter.mdlus", bad))
    bad = json.loads(json.dumps(args))
    bad["__name__"] = "StormCastUNet"
    with pytest.raises(physicsnemo.UnsupportedCheckpointError, match="StormCastUNet"):
        physicsnemo.load(_rewrite(tmp_path, DIFFUSION, "class.mdlus", bad))
    bad = json.loads(json.dumps(args))
    bad["__args__"]["model_channels"] = 32
    with pytest.raises(physicsnemo.UnsupportedCheckpointError, match="shape"):
        physicsnemo.load(_rewrite(tmp_path, DIFFUSION, "width.mdlus", bad))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Exploit(), protocol=2))
        zf.writestr("archive/byteorder", "little")
    path = _rewrite(tmp_path, DIFFUSION, "evil.mdlus", model_pt=payload.getvalue())
    with pytest.raises(UnsafePickleError, match="system"):
        physicsnemo.load(path)
    assert not marker.exists()


# --- args.json checked against the weights before building ------------------------

LEARNABLE = os.path.join(FIXTURES, "edm_posembd_learnable.mdlus")
LEAD_TIME = os.path.join(FIXTURES, "edm_posltembd.mdlus")


def _with_args(tmp_path, src, name, **changes):
    args = json.loads(json.dumps(read_mdlus(src).args))
    args["__args__"].update(changes)
    return _rewrite(tmp_path, src, name, args)


@pytest.fixture(scope="module")
def capped_convert(tmp_path_factory):
    """Outcomes of convert() on args.json variants, all in one capped child (importing JAX is slow)."""
    tmp = tmp_path_factory.mktemp("capped_convert")
    files = {
        "unchanged": DIFFUSION,
        "num_blocks_100000": _with_args(tmp, DIFFUSION, "blocks.mdlus", num_blocks=100000),
        "sinusoidal_4096": _with_args(tmp, DIFFUSION, "sin.mdlus", img_resolution=[4096, 4096]),
        "learnable_4096": _with_args(tmp, LEARNABLE, "learnable.mdlus", img_resolution=[4096, 4096]),
        "learnable_32x4096": _with_args(tmp, LEARNABLE, "wide.mdlus", img_resolution=[32, 4096]),
    }
    cases = "".join(
        f"case({name!r}, lambda: physicsnemo.convert(sys.argv[{i + 1}])[0]['kind'])\n" for i, name in enumerate(files)
    )
    # Importing JAX and running one computation creates its threads before the cap.
    setup = "import jax\nfrom jax_corrdiff.interop import physicsnemo\njax.numpy.zeros(1).block_until_ready()"
    return run_capped(cases, setup=setup, headroom_mib=768, timeout_s=180, args=tuple(files.values()))


def test_capped_convert_of_a_real_checkpoint(capped_convert):
    assert capped_convert["unchanged"] == "ok: diffusion"


@pytest.mark.parametrize(
    "case, expected",
    [
        # used to trace 600000 blocks for minutes before comparing shapes
        ("num_blocks_100000", "args.json describes 600014 layers (num_blocks=100000, 3 levels)"),
        # used to compute a 4096 x 4096 sinusoidal grid (1.75 GB) first, or fail with KeyError: 32
        ("sinusoidal_4096", "'model.enc.32x32_conv.weight': is for a level 32 pixels high"),
        ("learnable_4096", "'model.enc.32x32_conv.weight': is for a level 32 pixels high"),
        ("learnable_32x4096", "'model.pos_embd': has shape (6, 32, 48), but args.json describes (6, 32, 4096)"),
    ],
)
def test_args_checked_against_state_dict_before_building(capped_convert, case, expected):
    outcome = capped_convert[case]
    assert outcome.startswith("UnsupportedCheckpointError: ") and expected in outcome, outcome


@pytest.mark.parametrize(
    "src, changes, error, field",
    [
        (DIFFUSION, dict(model_channels=0), "CheckpointFormatError", "__args__.model_channels"),  # ZeroDivisionError
        (DIFFUSION, dict(channel_mult=[1, 0, 2]), "CheckpointFormatError", "__args__.channel_mult"),
        (DIFFUSION, dict(num_blocks="1"), "CheckpointFormatError", "__args__.num_blocks"),  # TypeError
        (DIFFUSION, dict(N_grid_channels=float("inf")), "CheckpointFormatError", "__args__.N_grid_channels"),
        (LEAD_TIME, dict(lead_time_channels=float("inf")), "CheckpointFormatError", "__args__.lead_time_channels"),
        (LEAD_TIME, dict(lead_time_channels=None), "CheckpointFormatError", "__args__.lead_time_channels"),
        (DIFFUSION, dict(sigma_data="x"), "CheckpointFormatError", "__args__.sigma_data"),  # ValueError
        (DIFFUSION, dict(img_in_channels=2), "CheckpointFormatError", "__args__.img_in_channels"),  # TypeError
        (DIFFUSION, dict(img_resolution=[64, 48]), "UnsupportedCheckpointError", "'model.enc.8x8_down"),  # KeyError
        (DIFFUSION, dict(model_channels=20), "UnsupportedCheckpointError", "'model.enc.32x32_conv.weight'"),
    ],
    ids=[
        "model_channels-0",
        "channel_mult-0",
        "num_blocks-str",
        "N_grid_channels-inf",
        "lead_time_channels-inf",
        "lead_time_channels-None",
        "sigma_data-str",
        "img_in_channels-too-few",
        "img_resolution-other-levels",
        "model_channels-other-width",
    ],
)
def test_malformed_args_are_named(tmp_path, src, changes, error, field):
    path = _with_args(tmp_path, src, "bad.mdlus", **changes)
    with pytest.raises(CheckpointFormatError) as caught:
        physicsnemo.convert(path)
    assert type(caught.value).__name__ == error and caught.value.path == path
    assert field in caught.value.field, str(caught.value)


@pytest.mark.parametrize(
    "args_json",
    [b"[" * 100_000 + b"]" * 100_000, b'{"__name__": "SongUNet", "__args__": [1]}', b"[1]"],
    ids=["deep-nesting", "args-not-an-object", "not-an-object"],
)
def test_malformed_args_json_is_named(tmp_path, args_json):
    path = tmp_path / "bad.mdlus"
    with zipfile.ZipFile(DIFFUSION) as zin, zipfile.ZipFile(path, "w") as zout:
        for member in zin.namelist():
            zout.writestr(member, args_json if member == "args.json" else zin.read(member))
    with pytest.raises(CheckpointFormatError, match="args.json") as caught:  # deep nesting: RecursionError
        physicsnemo.convert(str(path))
    assert caught.value.path == str(path)


def test_convert_honours_read_limits():
    with pytest.raises(CheckpointLimitError, match="max_bytes=1048576"):
        physicsnemo.convert(DIFFUSION, limits=ReadLimits(max_bytes=1 << 20))
