"""Data layer: regridding, preparation and statistics, named errors, Grain pipeline, CWB layout."""

import json
import os
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from jax_corrdiff.data import (
    TAIWAN_CWB_VARIABLES,
    TAIWAN_ERA5_VARIABLES,
    DownscalingSource,
    EmptyTimeRangeError,
    GridMismatchError,
    LatLonBilinear,
    MissingLevelError,
    MissingTimesError,
    MissingVariableError,
    NonFiniteDataError,
    Normalizer,
    PreparedDataMismatchError,
    block_average,
    degrade,
    demo_data_path,
    ensure_prepared,
    load_stats,
    make_eval_iterator,
    make_train_iterator,
    prepare_dataset,
    write_cwb_zarr,
)
from jax_corrdiff.data.regrid import block_centres

ERA5 = demo_data_path("era5_t2m_uk_0p25deg.nc")
ERA5_STATIC = demo_data_path("static_era5_uk_0p25deg.nc")
HRRR = demo_data_path("hrrr_3km_idaho_rme_sfc.nc")
HRRR_STATIC = demo_data_path("static_hrrr_3km_idaho_rme.nc")
TRAIN = ["2019-03-01", "2019-03-03"]  # 72 hourly steps
VALID = ["2019-03-04", "2019-03-04"]  # 24


def era5_config(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(
        format="variables",
        target_paths=[ERA5],
        target_variables=["t2m"],
        input_paths=[],
        input_variables=["t2m"],
        coarsen_factor=8,
        static_path=ERA5_STATIC,
        static_variables=["orog", "land_frac"],
        train_period=TRAIN,
        valid_period=VALID,
        nan_policy="error",
        nan_fill_value=0.0,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def era5_prepared(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("era5") / "prepared")
    return ensure_prepared(era5_config(), cache)


# --- coarsening and bilinear ------------------------------------------------------------------


def test_block_average_by_hand():
    x = np.arange(25, dtype=np.float64).reshape(1, 5, 5, 1)  # x[i, j] = 5 i + j
    got = block_average(x, 2)[0, ..., 0]
    # Full 2x2 blocks, then partial blocks at the right/bottom edges average what they hold.
    want = np.array(
        [
            [(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2],
            [(10 + 11 + 15 + 16) / 4, (12 + 13 + 17 + 18) / 4, (14 + 19) / 2],
            [(20 + 21) / 2, (22 + 23) / 2, 24.0],
        ]
    )
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(block_centres(5, 2), [0.5, 2.5, 4.0])


@pytest.mark.parametrize("k", [2, 3, 8])
def test_degrade_reproduces_a_linear_field_in_the_interior(k):
    h, w = 37, 50  # not multiples of k: partial edge blocks
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    f = np.stack([0.3 * i - 1.7 * j + 5.0, -2.0 * i + 0.1 * j], axis=-1)[None]
    got = degrade(f, k)
    cy, cx = block_centres(h, k), block_centres(w, k)
    interior = (i >= cy[0]) & (i <= cy[-1]) & (j >= cx[0]) & (j <= cx[-1])
    np.testing.assert_allclose(got[0][interior], f[0][interior], atol=1e-10)
    assert got.shape == f.shape


def test_latlon_bilinear_is_exact_for_linear_fields_across_longitude_conventions():
    lat = np.arange(60.0, 48.0, -1.0)  # decreasing, like ERA5
    lon = np.mod(np.arange(-12.0, 5.0, 1.0), 360.0)  # 0..360 convention, crossing the meridian
    lon_cont = np.where(lon > 180, lon - 360, lon)
    field = (2.0 * lat[:, None] - 3.0 * lon_cont[None, :])[None, :, :, None]
    dst_lat, dst_lon = np.meshgrid(np.linspace(50.1, 57.9, 7), np.linspace(-9.7, 3.3, 9), indexing="ij")
    got = LatLonBilinear(lat, lon, dst_lat, dst_lon, path="coarse.nc")(field)
    np.testing.assert_allclose(got[0, ..., 0], 2.0 * dst_lat - 3.0 * dst_lon, atol=1e-9)
    # A global grid wraps around its seam.
    glon = np.arange(0.0, 360.0, 30.0)
    g = np.cos(np.deg2rad(glon))[None, None, :, None] * np.ones((1, 3, 1, 1))
    seam = LatLonBilinear([0.0, 1.0, 2.0], glon, np.array([[1.0]]), np.array([[-15.0]]), path="g.nc")(g)
    np.testing.assert_allclose(seam[0, 0, 0, 0], (np.cos(np.deg2rad(330)) + 1.0) / 2)


# --- preparation and statistics ---------------------------------------------------------------


def test_prepare_and_stats_on_the_era5_demo(era5_prepared, tmp_path):
    store_path, normalizer = era5_prepared
    ds = xr.open_zarr(store_path)
    assert ds["target"].shape == (96, 33, 49, 1) and ds["inputs"].shape == (96, 33, 49, 1)
    assert ds["static"].shape == (33, 49, 2) and ds["lat"].shape == (33, 49)
    assert list(ds["static_channel"].values) == ["orog", "land_frac"]
    assert ds["target"].encoding["chunks"] == (1, 33, 49, 1)

    raw = xr.open_dataset(ERA5)["t2m"].sel(time=slice(*TRAIN)).values[..., None].astype(np.float64)
    assert raw.shape[0] == 72
    np.testing.assert_allclose(normalizer.target_mean, [raw.mean()], rtol=1e-6)
    np.testing.assert_allclose(normalizer.target_std, [raw.std()], rtol=1e-5)
    coarse = degrade(raw, 8)
    np.testing.assert_allclose(ds["inputs"].values[:72], coarse, rtol=1e-6)
    np.testing.assert_allclose(normalizer.input_mean, [coarse.mean()], rtol=1e-6)
    np.testing.assert_allclose(normalizer.input_std, [coarse.std()], rtol=1e-5)
    static = xr.open_dataset(ERA5_STATIC)
    for c, name in enumerate(["orog", "land_frac"]):
        np.testing.assert_allclose(normalizer.static_mean[c], static[name].values.mean(), rtol=1e-5)
        np.testing.assert_allclose(normalizer.static_std[c], static[name].values.std(), rtol=1e-5)
    on_disk = load_stats(os.path.join(os.path.dirname(store_path), "stats.json"))
    np.testing.assert_array_equal(on_disk.target_std, normalizer.target_std)


def test_prepare_reuses_the_store_and_detects_a_changed_config(tmp_path):
    cache = str(tmp_path / "prepared")
    cfg = era5_config(static_path="", static_variables=[], valid_period=TRAIN)
    store = prepare_dataset(cfg, cache)
    stamp = os.path.getmtime(os.path.join(store, "target", "0.0.0.0"))
    assert prepare_dataset(cfg, cache) == store
    assert os.path.getmtime(os.path.join(store, "target", "0.0.0.0")) == stamp
    changed = era5_config(static_path="", static_variables=[], valid_period=TRAIN, coarsen_factor=4)
    with pytest.raises(PreparedDataMismatchError, match="different data config"):
        prepare_dataset(changed, cache)
    prepare_dataset(changed, cache, overwrite=True)
    assert zarr.open_group(store, mode="r").attrs["data_config"]["coarsen_factor"] == 4


def test_inputs_on_their_own_grid_are_interpolated_bilinearly(tmp_path):
    era5 = xr.open_dataset(ERA5).isel(time=slice(0, 30))
    coarse = era5.isel(lat=slice(None, None, 2), lon=slice(None, None, 2))  # 0.5 deg
    coarse = coarse.assign_coords(lon=np.mod(coarse.lon, 360.0))  # 0..360, unsorted order
    coarse.to_netcdf(tmp_path / "coarse.nc")
    cfg = era5_config(
        input_paths=[str(tmp_path / "coarse.nc")],
        static_path="",
        static_variables=[],
        train_period=["2019-03-01T00", "2019-03-01T09"],
        valid_period=["2019-03-01T10", "2019-03-01T11"],
    )
    ds = xr.open_zarr(prepare_dataset(cfg, str(tmp_path / "prepared")))
    fine, got = era5["t2m"].values[:12], ds["inputs"].values[..., 0]
    np.testing.assert_allclose(got[:, ::2, ::2], fine[:, ::2, ::2], rtol=1e-6)  # coarse points
    mid = (fine[:, 0:-1:2, ::2] + fine[:, 2::2, ::2]) / 2  # halfway between two coarse rows
    np.testing.assert_allclose(got[:, 1::2, ::2], mid, rtol=1e-6)


def test_target_files_from_a_glob_of_netcdf_and_zarr_parts(tmp_path):
    era5 = xr.open_dataset(ERA5).isel(time=slice(0, 48)).load()
    era5.isel(time=slice(24, 48)).to_netcdf(tmp_path / "part_1.nc")  # later times first on disk
    era5.isel(time=slice(0, 24)).to_zarr(tmp_path / "part_0.zarr", zarr_format=2)
    cfg = era5_config(
        target_paths=[str(tmp_path / "part_*")],
        static_path="",
        static_variables=[],
        train_period=["2019-03-01", "2019-03-01"],
        valid_period=["2019-03-02", "2019-03-02"],
    )
    ds = xr.open_zarr(prepare_dataset(cfg, str(tmp_path / "prepared")))
    np.testing.assert_array_equal(ds["time"].values, era5["time"].values)
    np.testing.assert_array_equal(ds["target"].values[..., 0], era5["t2m"].values)


# --- named errors -----------------------------------------------------------------------------


def test_missing_variable_is_named(tmp_path):
    with pytest.raises(MissingVariableError, match=r"era5_t2m_uk_0p25deg\.nc: no variable 'tas'"):
        prepare_dataset(era5_config(target_variables=["tas"]), str(tmp_path))


def test_missing_level_is_named(tmp_path):
    with pytest.raises(MissingLevelError, match=r"hrrr_3km_idaho_rme_sfc\.nc: no level 850 of 't2m'.*no vertical"):
        prepare_dataset(
            era5_config(target_paths=[HRRR], target_variables=["t2m@850"], static_path="", static_variables=[]),
            str(tmp_path),
        )
    times = pd.date_range("2019-03-01", periods=3, freq="h")
    level_file = str(tmp_path / "levels.nc")
    xr.Dataset(
        {"t": (("time", "plev", "lat", "lon"), np.zeros((3, 2, 4, 5), np.float32))},
        coords={"time": times, "plev": [850.0, 700.0], "lat": np.arange(4.0), "lon": np.arange(5.0)},
    ).to_netcdf(level_file)
    cfg = era5_config(
        target_paths=[level_file],
        target_variables=["t@500"],
        input_variables=["t@850"],
        coarsen_factor=2,
        static_path="",
        static_variables=[],
        train_period=["2019-03-01", "2019-03-01"],
        valid_period=["2019-03-01", "2019-03-01"],
    )
    with pytest.raises(MissingLevelError, match=r"levels\.nc: no level 500 of 't'; available levels: 850, 700"):
        prepare_dataset(cfg, str(tmp_path / "a"))
    cfg.target_variables = ["t"]
    with pytest.raises(MissingLevelError, match="name one as 't@LEVEL'"):
        prepare_dataset(cfg, str(tmp_path / "b"))
    cfg.target_variables = ["t@700"]
    assert xr.open_zarr(prepare_dataset(cfg, str(tmp_path / "c")))["target_channel"].values.tolist() == ["t@700"]


def test_non_finite_values_raise_or_are_filled_and_counted(tmp_path):
    ds = xr.open_dataset(ERA5).load()
    ds["t2m"][5, 3, 4] = np.nan
    ds["t2m"][5, 3, 5] = np.inf
    ds["t2m"][30, 0, 0] = np.nan
    bad = str(tmp_path / "era5_with_nan.nc")
    ds.to_netcdf(bad)
    cfg = era5_config(target_paths=[bad], static_path="", static_variables=[])
    with pytest.raises(NonFiniteDataError, match=r"era5_with_nan\.nc: 't2m' has 2 non-finite.*2019-03-01T05:00:00"):
        prepare_dataset(cfg, str(tmp_path / "a"))
    cfg.nan_policy, cfg.nan_fill_value = "fill", 270.0
    store = prepare_dataset(cfg, str(tmp_path / "b"))
    counts = zarr.open_group(store, mode="r").attrs["nonfinite_counts"]
    assert counts["target"] == {"t2m": 3} and counts["inputs"] == {"t2m": 3}
    assert xr.open_zarr(store)["target"].values[5, 3, 4, 0] == 270.0


def test_static_fields_on_another_grid_are_rejected(tmp_path):
    with pytest.raises(GridMismatchError, match=r"static_hrrr_3km_idaho_rme\.nc: static fields are not on the target"):
        prepare_dataset(era5_config(static_path=HRRR_STATIC, static_variables=["orog"]), str(tmp_path))


def test_time_range_without_data_is_named(tmp_path):
    cfg = era5_config(train_period=["2020-01-01", "2020-01-31"])
    with pytest.raises(
        EmptyTimeRangeError,
        match=r"era5_t2m_uk_0p25deg\.nc: no time step in the requested "
        r"period 2020-01-01 \.\. 2020-01-31; the file covers 2019-03-01",
    ):
        prepare_dataset(cfg, str(tmp_path))


def test_input_grid_must_cover_the_target_and_its_times(tmp_path):
    era5 = xr.open_dataset(ERA5).isel(time=slice(0, 48))
    era5.sel(lat=slice(56, 52)).to_netcdf(tmp_path / "crop.nc")
    cfg = era5_config(
        input_paths=[str(tmp_path / "crop.nc")],
        static_path="",
        static_variables=[],
        train_period=["2019-03-01", "2019-03-01"],
        valid_period=["2019-03-02", "2019-03-02"],
    )
    with pytest.raises(GridMismatchError, match=r"crop\.nc: input grid does not cover the target grid.*latitude"):
        prepare_dataset(cfg, str(tmp_path / "a"))
    era5.isel(time=slice(0, 40)).to_netcdf(tmp_path / "short.nc")
    cfg.input_paths = [str(tmp_path / "short.nc")]
    with pytest.raises(MissingTimesError, match=r"short\.nc: .*2019-03-02T16:00:00"):
        prepare_dataset(cfg, str(tmp_path / "b"))


# --- normalizer -------------------------------------------------------------------------------


def test_normalizer_round_trips_and_constant_fields_get_unit_std(era5_prepared):
    _, normalizer = era5_prepared
    again = Normalizer.from_dict(json.loads(json.dumps(normalizer.to_dict())))
    np.testing.assert_array_equal(again.input_std, normalizer.input_std)
    assert again.static_channels == ("orog", "land_frac")
    x = np.random.default_rng(0).normal(280, 5, (2, 3, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(again.denormalize_target(again.normalize_target(x)), x, rtol=1e-6)
    from jax_corrdiff.data.normalization import RunningMoments

    moments = RunningMoments(2)
    moments.update(np.stack([np.full((5, 5), 3.0), np.arange(25.0).reshape(5, 5)], -1))
    mean, std = moments.mean_std()
    np.testing.assert_allclose(mean, [3.0, 12.0])
    np.testing.assert_allclose(std, [1.0, np.arange(25.0).std()])  # constant channel -> std 1


# --- Grain pipeline ---------------------------------------------------------------------------


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_train_iterator_state_resumes_exactly(era5_prepared):
    store, normalizer = era5_prepared
    source = DownscalingSource(store, "train", normalizer)
    sample = source[0]
    assert sample["target"].shape == (33, 49, 1) and sample["img_lr"].shape == (33, 49, 3)
    assert sample["target"].dtype == np.float32 and sample["time_index"].dtype == np.int64

    it = make_train_iterator(source, batch_size=5, seed=3)
    first = _take(it, 16)  # 80 samples: crosses the 72-sample epoch boundary
    epoch = np.concatenate([b["time_index"] for b in first])[:72]
    assert sorted(epoch) == list(range(72))  # one permutation per epoch
    state = json.loads(json.dumps(it.get_state()))
    rest = _take(it, 4)

    resumed = make_train_iterator(source, batch_size=5, seed=3)
    resumed.set_state(state)
    for a, b in zip(rest, _take(resumed, 4)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_train_iterator_state_in_an_orbax_checkpoint(era5_prepared, tmp_path):
    import orbax.checkpoint as ocp

    store, normalizer = era5_prepared
    source = DownscalingSource(store, "train", normalizer)
    it = make_train_iterator(source, batch_size=4, seed=0)
    _take(it, 3)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _take(it, 2)
    fresh = make_train_iterator(source, batch_size=4, seed=0)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    for a, b in zip(expected, _take(fresh, 2)):
        np.testing.assert_array_equal(a["time_index"], b["time_index"])


def test_process_shards_are_disjoint_and_cover_the_split(era5_prepared):
    store, normalizer = era5_prepared
    source = DownscalingSource(store, "train", normalizer)
    seen = []
    for p in range(3):
        it = make_train_iterator(source, batch_size=4, seed=0, process_index=p, process_count=3)
        seen.append({int(t) for b in _take(it, 6) for t in b["time_index"]})  # 24 = one epoch of a shard
    assert all(len(s) == 24 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set.union(*seen) == set(range(72))


def test_eval_iterator_covers_every_sample_once_with_a_mask(era5_prepared):
    store, normalizer = era5_prepared
    source = DownscalingSource(store, "valid", normalizer)
    assert len(source) == 24
    seen, counts = [], []
    for p in range(5):  # shards of 5,5,5,5,4 -> 2 batches of 4 each, padded
        batches = list(make_eval_iterator(source, batch_size=4, process_index=p, process_count=5))
        counts.append(len(batches))
        for b in batches:
            assert b["img_lr"].shape == (4, 33, 49, 3) and b["mask"].dtype == bool
            seen.extend(b["time_index"][b["mask"]].tolist())
            assert (b["time_index"][~b["mask"]] == -1).all()
    assert counts == [2] * 5
    assert sorted(seen) == list(range(72, 96))


# --- CWB layout -------------------------------------------------------------------------------


def test_cwb_store_through_the_pipeline(tmp_path):
    cwb_path = write_cwb_zarr(
        str(tmp_path / "cwb.zarr"), times=pd.date_range("2018-01-01", periods=6, freq="h"), height=32, width=32, seed=1
    )
    cfg = era5_config(
        format="cwb",
        target_paths=[cwb_path],
        target_variables=list(TAIWAN_CWB_VARIABLES),
        input_variables=list(TAIWAN_ERA5_VARIABLES),
        static_path="",
        static_variables=[],
        train_period=["2018-01-01T00", "2018-01-01T03"],
        valid_period=["2018-01-01T04", "2018-01-01T05"],
    )
    store, normalizer = ensure_prepared(cfg, str(tmp_path / "prepared"))
    assert not os.path.exists(os.path.join(store, "target"))  # nothing big copied
    source = DownscalingSource(store, "train", normalizer)
    assert len(source) == 4 and source.img_lr_channels[5] == "geopotential@850"
    batch = next(make_train_iterator(source, batch_size=2, seed=0))
    assert batch["target"].shape == (2, 32, 32, 4) and batch["img_lr"].shape == (2, 32, 32, 12)

    raw = zarr.open_group(cwb_path, mode="r")
    sample = source[1]
    np.testing.assert_allclose(
        normalizer.denormalize_target(sample["target"]), np.moveaxis(raw["cwb"][1], 0, -1), rtol=1e-5, atol=1e-3
    )
    cwb_all = np.moveaxis(raw["cwb"][:4], 1, -1).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(normalizer.target_mean, cwb_all.mean(0), rtol=1e-5)

    # Channels are picked by name@level, in the config's order; steps flagged invalid are skipped.
    raw_rw = zarr.open_group(cwb_path, mode="r+")
    raw_rw["cwb_valid"][2] = 0
    zarr.consolidate_metadata(cwb_path)
    cfg2 = era5_config(
        **{
            **cfg.to_dict(),
            "target_variables": ["temperature_2m"],
            "input_variables": ["temperature@850", "total_column_water_vapour"],
        }
    )
    store2, norm2 = ensure_prepared(cfg2, str(tmp_path / "prepared2"))
    assert DownscalingSource(store2, "train", norm2).indices.tolist() == [0, 1, 2]  # source steps 0, 1, 3
    assert zarr.open_group(store2, mode="r")["source_time_index"][:].tolist() == [0, 1, 3, 4, 5]
    img_lr = norm2.denormalize_inputs(DownscalingSource(store2, "valid", norm2)[0]["img_lr"])
    np.testing.assert_allclose(img_lr, np.moveaxis(raw["era5"][4][[6, 0]], 0, -1), rtol=1e-5)
    cfg2.input_variables = ["temperature@700"]
    with pytest.raises(MissingLevelError, match=r"cwb\.zarr: no level 700 of 'era5 channel temperature'"):
        prepare_dataset(cfg2, str(tmp_path / "prepared3"))


def test_prepare_entry_point(tmp_path):
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import ml_collections\n"
        "def get_config():\n"
        f"    return ml_collections.ConfigDict({{'data': {era5_config(coarsen_factor=4).to_dict()!r}}})\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "jax_corrdiff.prepare", f"--config={config_file}", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert "train 72, valid 24" in out.stdout and "static land_frac" in out.stdout
    assert os.path.exists(tmp_path / "prepared" / "stats.json")
