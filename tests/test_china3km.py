"""configs/china3km.py:smoke end to end: forecast inputs with lead times, pressure levels,
global residual, patched diffusion, multi-diffusion generation of one lead time."""

import china3km
import numpy as np
import xarray as xr

from jax_corrdiff.config import set_stages
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
from jax_corrdiff.training.loop import train_and_evaluate


def test_china3km_smoke_trains_and_generates(tmp_path):
    config = set_stages(china3km.get_config("smoke"), training=dict(total_samples=4 * 3, eval_batches=1))
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    model = CorrDiffModel.load(workdir)
    assert model.conditioning.patch.height == config.diffusion.patch.height > 0
    forecast = model.data_config["input_paths"][0]  # the synthetic dataset, written under the workdir
    assert forecast.startswith(workdir)
    lead = float(config.data.lead_times[1])

    def open_(**kw):
        return InferenceInputs.open(
            model.data_config, forecast, coarsen=False, lat=model.lat, lon=model.lon, lead_time=lead, **kw
        )

    inputs = open_(times=[str(t) for t in open_().times[:2]])
    assert set(inputs.lead_time_labels.tolist()) == {1}
    out = generate(model, inputs, str(tmp_path / "china.nc"), make_sampler("deterministic", steps=2), members=2, seed=0)
    with xr.open_dataset(out) as ds:
        assert ds.t.dims == ("time", "ensemble", "level", "y", "x") and ds.sizes["level"] == 6
        assert ds.t2m.attrs["units"] == "K" and "forecast_reference_time" in ds.coords
        np.testing.assert_array_equal(
            ds.forecast_reference_time.values + np.timedelta64(int(lead), "h"), ds.time.values
        )
        assert bool(np.isfinite(ds.t.values).all())
