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

from jax_corrdiff.interop import parity, physicsnemo
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
