"""Patch-based training batches and multi-diffusion sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import redraw_params

from jax_corrdiff.diffusion import EDMSampler
from jax_corrdiff.diffusion.conditioning import ConditioningLayout, PatchSettings
from jax_corrdiff.diffusion.patching import TileLayout, crop_patches, multidiffusion_denoiser, training_batch
from jax_corrdiff.models import build_model, init_variables

H, W = 24, 40
PATCH_MODEL = dict(
    kind="diffusion",
    img_resolution=[H, W],
    out_channels=2,
    cond_channels=2 + 3 + 3,
    unet=dict(
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[],
        dropout=0.0,
        position_grid="learnable",
        num_grid_channels=4,
        lead_time_steps=3,
        lead_time_channels=2,
    ),
)


def conditioning(patch: PatchSettings) -> ConditioningLayout:
    """PATCH_MODEL's conditioning: regression mean (2) | img_lr (3) | global context (3)."""
    return ConditioningLayout(("y0", "y1"), ("x0", "x1", "x2"), regression_mean=True, lead_time_steps=3, patch=patch)


@pytest.fixture(scope="module")
def patch_model():
    variables = redraw_params(init_variables(PATCH_MODEL, jax.random.key(0)), jax.random.key(1))
    return build_model(PATCH_MODEL), variables


def _fields(batch=2, seed=3):
    k = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k[0], (batch, H, W, 2)),
        jax.random.normal(k[1], (batch, H, W, 2)),
        jax.random.normal(k[2], (batch, H, W, 3)),
    )


def test_patches_are_laid_out_batch_major_with_their_own_location_and_label(patch_model):
    model, variables = patch_model
    target, mean, img_lr = _fields()
    labels = jnp.array([0, 2])
    layout = conditioning(PatchSettings(8, 16, num_patches=3, overlap=0, boundary=0))
    cut = training_batch(jax.random.key(5), layout, target, mean, img_lr, labels)
    origins = np.asarray(cut["patch_origin"])
    assert len(set(map(tuple, origins))) > 1
    for row, (y, x) in enumerate(origins):
        b = row // 3
        np.testing.assert_array_equal(cut["target"][row], target[b, y : y + 8, x : x + 16])
        assert int(cut["lead_time_label"][row]) == int(labels[b])
    # The network, fed all six patches at once, treats each as if it were alone.
    x = jax.random.normal(jax.random.key(6), cut["target"].shape)
    cond = cut["cond"]
    np.testing.assert_array_equal(cond[..., :2], cut["regression_mean"])
    sigma = jnp.full((6,), 1.5)
    together = model.apply(
        variables, x, cond, sigma, lead_time_label=cut["lead_time_label"], patch_origin=cut["patch_origin"]
    )
    for row in range(6):
        alone = model.apply(
            variables,
            x[row : row + 1],
            cond[row : row + 1],
            sigma[:1],
            lead_time_label=cut["lead_time_label"][row : row + 1],
            patch_origin=cut["patch_origin"][row : row + 1],
        )
        np.testing.assert_allclose(together[row], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overlap,boundary", [(0, 0), (4, 2), (6, 0)])
def test_tiles_cover_the_image_and_merge_back(overlap, boundary):
    layout = TileLayout((H, W), (8, 16), overlap, boundary)
    assert layout.coverage().min() >= 1
    images = jax.random.normal(jax.random.key(0), (2, H, W, 3))
    np.testing.assert_allclose(layout.merge(layout.split(images)), images, rtol=1e-6)


def test_bad_tilings_are_rejected():
    with pytest.raises(ValueError, match="overlap"):
        TileLayout((H, W), (8, 16), 8, 0)
    with pytest.raises(ValueError, match="larger"):
        TileLayout((H, W), (32, 16), 0, 0)


def _patch_denoise(model, variables, margin):
    def denoise(tiles, cond, sigma, origins, labels):
        return model.apply(
            variables,
            tiles,
            cond,
            jnp.broadcast_to(sigma, (tiles.shape[0],)),
            lead_time_label=labels,
            patch_origin=origins,
            grid_margin=margin,
        )

    return denoise


def test_one_tile_covering_the_image_equals_whole_image_sampling(patch_model):
    model, variables = patch_model
    _, mean, img_lr = _fields(batch=1)
    label = jnp.array([1])
    one_tile = conditioning(PatchSettings(H, W, num_patches=1, overlap=0, boundary=0))
    tiled = multidiffusion_denoiser(_patch_denoise(model, variables, 0), one_tile, img_lr, mean, label)
    # Whole image: the global context of a full-size "patch" is the input itself.
    cond = jnp.concatenate([mean, img_lr, img_lr], axis=-1)
    whole = lambda x, sigma: model.apply(variables, x, cond, sigma[None], lead_time_label=label)  # noqa: E731
    sampler = EDMSampler(num_steps=5, sigma_max=80.0, s_churn=3.0)
    latents = jax.random.normal(jax.random.key(9), (1, H, W, 2))
    a = jax.jit(lambda z: sampler(tiled, z, jax.random.key(2)))(latents)
    b = jax.jit(lambda z: sampler(whole, z, jax.random.key(2)))(latents)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overlap,boundary", [(0, 0), (4, 2)])
def test_multidiffusion_sampling_is_finite_and_uses_every_tile(patch_model, overlap, boundary):
    model, variables = patch_model
    _, mean, img_lr = _fields(batch=1)
    layout = conditioning(PatchSettings(16, 16, num_patches=1, overlap=overlap, boundary=boundary))
    tiles = TileLayout((H, W), (16, 16), overlap, boundary)
    calls = []
    inner = _patch_denoise(model, variables, boundary)

    def counting(tiles, *args):
        calls.append(tiles.shape[0])
        return inner(tiles, *args)

    denoise = multidiffusion_denoiser(counting, layout, img_lr, mean, jnp.array([0]))
    out = jax.jit(lambda z: EDMSampler(num_steps=3, sigma_max=80.0)(denoise, z, jax.random.key(0)))(
        jax.random.normal(jax.random.key(1), (1, H, W, 2))
    )
    assert np.isfinite(np.asarray(out)).all()
    assert calls and all(n == len(tiles.origins) > 1 for n in calls)


def test_crop_patches_matches_slicing():
    images = jnp.arange(2 * 6 * 7 * 1, dtype=jnp.float32).reshape(2, 6, 7, 1)
    origins = jnp.array([[0, 0], [2, 3], [1, 1], [4, 5]])
    patches = crop_patches(images, origins, 2, (2, 2))
    np.testing.assert_array_equal(patches[1], images[0, 2:4, 3:5])
    np.testing.assert_array_equal(patches[3], images[1, 4:6, 5:7])


def test_patch_trained_demo_generates_by_multidiffusion(smoke_workdir, tmp_path):
    import shutil

    import demo
    import xarray as xr

    from jax_corrdiff.data import demo_data_path
    from jax_corrdiff.data.inference_inputs import InferenceInputs
    from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
    from jax_corrdiff.training.loop import train_and_evaluate

    workdir = tmp_path / "patched"
    shutil.copytree(f"{smoke_workdir}/regression/model", workdir / "regression" / "model")
    config = demo.get_config("smoke")
    config.stage = "diffusion"
    config.diffusion.patch.update(height=16, width=24, num_patches=2, overlap=4, boundary=2)
    config.diffusion.training.total_samples = 4 * 4
    config.diffusion.training.eval_batches = 1
    train_and_evaluate(config, str(workdir))
    model = CorrDiffModel.load(str(workdir))
    assert model.conditioning.patch.height == 16
    inputs = InferenceInputs.open(
        model.data_config,
        demo_data_path("era5_t2m_uk_0p25deg.nc"),
        coarsen=True,
        lat=model.lat,
        lon=model.lon,
        period=["2019-03-22T00", "2019-03-22T01"],
    )
    out = generate(model, inputs, str(tmp_path / "p.nc"), make_sampler("deterministic", steps=3), members=2, seed=0)
    with xr.open_dataset(out) as ds:
        assert ds.t2m.shape == (2, 2, 33, 49) and bool(np.isfinite(ds.t2m.values).all())


@pytest.mark.parametrize("overlap,boundary", [(0, 0), (4, 2)])
def test_tiles_sharded_over_devices_give_the_single_device_result(patch_model, overlap, boundary):
    """A (data 2, tiles 2) mesh on 4 CPU devices: two inputs split over data, each image's
    tiles (6 or 8, padded to a multiple of 2) over the tile axis; same samples as one device."""
    from jax_corrdiff.inference.sampling import conditioned_denoisers, corrdiff_ensemble
    from jax_corrdiff.mesh import DATA_AXIS, batch_sharded, make_mesh, tile_sharding

    model, variables = patch_model
    layout = conditioning(PatchSettings(16, 16, num_patches=1, overlap=overlap, boundary=boundary))
    _, _, img_lr = _fields(batch=2)
    keys = jax.random.split(jax.random.key(5), 2)
    labels = jnp.array([0, 2])
    shardings = []

    def apply(x, cond, sigma, label, origin, margin):
        jax.debug.inspect_array_sharding(x, callback=lambda s: shardings.append((x.shape, s.shard_shape(x.shape))))
        return model.apply(variables, x, cond, sigma, lead_time_label=label, patch_origin=origin, grid_margin=margin)

    def sample(img_lr, keys, labels, mesh=None):
        tiles = None if mesh is None else tile_sharding(mesh)
        return corrdiff_ensemble(
            lambda x, lt: 0.5 * x[..., :2],
            conditioned_denoisers(apply, layout, tiles),
            EDMSampler(num_steps=3, sigma_max=80.0),
            img_lr,
            keys,
            num_members=2,
            lead_time_label=labels,
            spmd_axis_name=DATA_AXIS if mesh is not None else None,
        )

    mean, single = jax.jit(sample)(img_lr, keys, labels)
    mesh = make_mesh(4, tile_devices=2)
    args = [jax.device_put(a, batch_sharded(mesh)) for a in (img_lr, keys, labels)]
    shardings.clear()
    _, sharded = jax.jit(lambda *a: sample(*a, mesh=mesh))(*args)
    # The tile dimension of the denoiser input is split over the two tile devices.
    assert any(shard[0] * 2 == shape[0] for shape, shard in shardings), shardings
    # Partitioned convolutions sum in another order; sigma_max = 80 scales that float32 noise.
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-4, atol=5e-4)


def test_tile_devices_must_divide_the_devices():
    from jax_corrdiff.mesh import make_mesh

    with pytest.raises(ValueError, match="tile_devices"):
        make_mesh(4, tile_devices=3)
