"""Our models out: the torch-free zip checkpoint writer and the PhysicsNeMo ``.mdlus`` exporter."""

import io
import json
import os
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from test_physicsnemo_interop import FIXTURES, REPO, WITHOUT_TORCH

from jax_corrdiff.interop import physicsnemo
from jax_corrdiff.interop.mdlus import read_mdlus
from jax_corrdiff.interop.physicsnemo_export import ExportError, physicsnemo_checkpoint, write_mdlus
from jax_corrdiff.interop.torch_pickle import load_torch_checkpoint
from jax_corrdiff.interop.torch_save import state_dict_bytes
from jax_corrdiff.model_dir import SavedModel, save_model
from jax_corrdiff.models.factory import build_model, example_inputs, init_variables

EXPORTABLE = [
    "edm_posembd_learnable",
    "edm_posembd_sin4_hrmean",
    "edm_posembd_sin8",
    "edm_posltembd",
    "regression_unet_posembd_sin4",
]


def _small_config(kind: str, **unet) -> dict:
    config = dict(
        kind=kind,
        img_resolution=[16, 32],
        out_channels=2,
        cond_channels=3 if kind == "regression" else 5,
        unet=dict(
            model_channels=8,
            channel_mult=[1, 2],
            channel_mult_emb=2,
            channel_mult_noise=1,
            num_blocks=1,
            attn_resolutions=[8],
            dropout=0.0,
            embedding_type="zero" if kind == "regression" else "positional",
            position_grid="sinusoidal",
            num_grid_channels=4,
            **unet,
        ),
    )
    if kind == "diffusion":
        config.update(sigma_data=0.5, legacy_scale_conditioning=False)
    return config


def _random_variables(config: dict, seed: int = 0) -> dict:
    """Every parameter redrawn (the real init hides most of the network behind near-zero branches)."""
    variables = init_variables(config, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree,
        [
            np.asarray(jax.random.normal(k, x.shape) / np.sqrt(max(x.size // x.shape[-1], 1)))
            for k, x in zip(keys, leaves)
        ],
    )


def test_zip_writer_reads_back_exactly_and_aligns_records():
    state = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # a transposed view is written contiguous
        "scalar": np.asarray(3.5),
        "big": np.arange(300, dtype=np.int64) * 10**12,
        "half": np.ones((2, 2), ml_dtypes.bfloat16),
        "empty": np.zeros((0, 3), np.float32),
        "big_endian": np.arange(4, dtype=">f4"),
        "mask": np.array([True, False]),
    }
    raw = state_dict_bytes(state)
    back = load_torch_checkpoint(io.BytesIO(raw))
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype.newbyteorder("=")
        np.testing.assert_array_equal(back[key], value)
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0, info.filename
        names = set(archive.namelist())
    with zipfile.ZipFile(os.path.join(FIXTURES, "regression_unet_posembd_sin4.mdlus")) as mdlus:
        torch_written = zipfile.ZipFile(io.BytesIO(mdlus.read("model.pt"))).namelist()
    bookkeeping = {n for n in torch_written if not n.startswith("archive/data/")} - {"archive/.data/serialization_id"}
    assert bookkeeping <= names


@pytest.mark.parametrize("case", EXPORTABLE)
def test_export_of_an_imported_checkpoint_gives_physicsnemo_state_dict(tmp_path, case):
    """Key names, shapes and buffers as PhysicsNeMo 2.2.2 saved them; parameters bit-identical."""
    original = read_mdlus(os.path.join(FIXTURES, f"{case}.mdlus"))
    config, variables, _ = physicsnemo.convert(original.path)
    path = str(tmp_path / "out.mdlus")
    write_mdlus(path, config, variables)
    exported = read_mdlus(path)
    assert set(exported.state_dict) == set(original.state_dict)
    for key, value in original.state_dict.items():
        assert exported.state_dict[key].shape == value.shape, key
        np.testing.assert_allclose(exported.state_dict[key], value, rtol=1e-6, atol=0, err_msg=key)
    assert exported.args["__name__"] == original.args["__name__"]
    assert exported.args["__module__"] == original.args["__module__"]
    config_back, variables_back, _ = physicsnemo.convert(path)
    assert config_back == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables_back, variables)


@pytest.mark.parametrize("kind", ["regression", "diffusion"])
def test_trained_model_round_trip_is_exact(tmp_path, kind):
    """Export -> import: the same parameters, config (biased GroupNorm kept) and outputs, bit for bit."""
    config = _small_config(kind)
    variables = _random_variables(config)
    path = str(tmp_path / f"{kind}.mdlus")
    write_mdlus(path, config, variables)
    back = physicsnemo.load(path)
    assert back.config["unet"]["unbiased_groupnorm"] is False
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.variables, variables)
    args, kwargs = example_inputs(config, batch=2)
    rng = np.random.default_rng(0)
    args = tuple(
        rng.normal(size=a.shape).astype(np.float32) if a.ndim == 4 else np.full(a.shape, 0.7, np.float32) for a in args
    )
    with jax.default_matmul_precision(physicsnemo.MATMUL_PRECISION):
        ours = np.asarray(jax.jit(build_model(config).apply)(variables, *args, **kwargs))
    nchw = lambda a: a.transpose(0, 3, 1, 2)  # noqa: E731
    if kind == "regression":
        theirs = back(np.zeros_like(nchw(ours)), nchw(args[0]))
    else:
        theirs = back(nchw(args[0]), nchw(args[1]), args[2])
    np.testing.assert_array_equal(theirs, nchw(ours))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="unet"), "only regression and diffusion"),
        (dict(global_residual=[[0, 0]]), "global residual"),
        (dict(kind="diffusion", legacy_scale_conditioning=True, sigma_data=0.5), "legacy_scale_conditioning"),
    ],
)
def test_models_physicsnemo_cannot_express_are_refused(change, message):
    config = dict(_small_config("regression"), **change)
    with pytest.raises(ExportError, match=message):
        physicsnemo_checkpoint(config, {})


def test_convert_to_physicsnemo_command_never_imports_torch(tmp_path):
    config = _small_config("diffusion")
    variables = _random_variables(config)
    save_model(str(tmp_path / "model"), SavedModel(config, variables, "highest"))
    out = str(tmp_path / "diffusion.mdlus")
    command = ["jax_corrdiff.convert", "--to_physicsnemo", str(tmp_path / "model"), "--output", out]
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *command], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = read_mdlus(out)
    assert exported.args["__name__"] == "EDMPrecondSuperResolution"
    assert json.loads(json.dumps(exported.metadata))["jax_corrdiff"] == {"unbiased_groupnorm": False}
