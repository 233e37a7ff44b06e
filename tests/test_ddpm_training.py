"""The DDPM residual-to-interpolation model: the mean switch, training and DDIM generation."""

import numpy as np
import pytest
import xarray as xr

from jax_corrdiff.config import set_stages
from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.diffusion.residual_mean import InterpolationMean
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_ddim_sampler, make_sampler
from jax_corrdiff.training.loop import train_and_evaluate

ERA5 = demo_data_path("era5_t2m_uk_0p25deg.nc")


def test_interpolation_mean_is_the_input_in_target_normalization():
    norm = Normalizer(("a", "b"), [10.0, -1.0], [2.0, 0.5], ("b", "x", "a"), [-0.5, 0.0, 9.0], [0.4, 1.0, 1.5])
    layout = ConditioningLayout(target_channels=("a", "b"), input_channels=("b", "x", "a"), static_channels=("s",))
    physical = np.array([[13.0, -2.0, 7.0, 0.3]])  # b, x, a, static
    img_lr = np.concatenate([norm.normalize_inputs(physical[:, :3]), physical[:, 3:]], axis=-1)
    mean = InterpolationMean.from_data(layout, norm).apply({}, img_lr)
    np.testing.assert_allclose(norm.denormalize_target(np.asarray(mean)), [[7.0, 13.0]], rtol=1e-6)
    with pytest.raises(ValueError, match="diffusion.mean='interpolation'"):
        InterpolationMean.from_data(
            ConditioningLayout(("a", "c"), ("a",)), Normalizer(("a", "c"), [0, 0], [1, 1], ("a",), [0], [1])
        )


@pytest.fixture(scope="module")
def ddpm_workdir(tmp_path_factory):
    import demo

    config = set_stages(demo.get_config("smoke"), training=dict(total_samples=4 * 6, eval_batches=1))
    config.diffusion.parameterization = "ddpm"
    config.diffusion.mean = "interpolation"
    config.diffusion.ddpm.num_timesteps = 100
    workdir = tmp_path_factory.mktemp("ddpm")
    assert list(train_and_evaluate(config, str(workdir))) == ["diffusion"]
    return workdir


def test_ddpm_trains_without_regression_and_samples_with_ddim(ddpm_workdir, tmp_path):
    assert not (ddpm_workdir / "regression").exists()
    model = CorrDiffModel.load(str(ddpm_workdir))
    assert model.diffusion.num_timesteps == 100 and model.diffusion.schedule == "cosine"
    inputs = InferenceInputs.open(
        model.data_config, ERA5, coarsen=True, lat=model.lat, lon=model.lon, period=["2019-03-22T00", "2019-03-22T01"]
    )
    with pytest.raises(ValueError, match="ddim"):
        generate(model, inputs, str(tmp_path / "x.nc"), make_sampler("deterministic", steps=2), members=1, seed=0)
    out = generate(model, inputs, str(tmp_path / "o.nc"), make_ddim_sampler(model, steps=4), members=2, seed=0)
    ds = xr.open_dataset(out)
    assert np.isfinite(ds.t2m.values).all() and float(ds.t2m.std("ensemble").mean()) > 0
    # The mean is the interpolated input itself.
    np.testing.assert_allclose(ds.t2m_regression.values, ds.t2m_interpolated.values, atol=1e-3)
