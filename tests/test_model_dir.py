"""A trained model directory carries its conditioning layout and matmul precision: they reload
in a fresh process, and training and generation both run at that precision (scoped, not
process-wide)."""

import json
import os
import subprocess
import sys

import demo
import jax

import jax_corrdiff.inference.generate as generation
import jax_corrdiff.training.steps as steps
from jax_corrdiff.config import set_stages
from jax_corrdiff.data import demo_data_path
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.inference.generate import CorrDiffModel, generate, make_sampler
from jax_corrdiff.model_dir import SavedModel, load_model, save_model
from jax_corrdiff.models import init_variables
from jax_corrdiff.training.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISION = "tensorfloat32"  # not the default "highest", so a setting that is lost shows
RELOAD = """
import json, sys
from jax_corrdiff.model_dir import load_model
saved = {stage: load_model(path) for stage, path in json.loads(sys.argv[1]).items()}
print(json.dumps({s: [m.matmul_precision, m.conditioning.to_dict()] for s, m in saved.items()}))
"""


def _record_precision(monkeypatch, module, name: str, seen: list) -> None:
    """Note the matmul precision in force whenever ``module.name`` is traced."""
    original = getattr(module, name)

    def recording(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)


def test_layout_and_precision_round_trip_and_govern_training_and_generation(tmp_path, monkeypatch):
    config = demo.get_config("smoke")
    config.matmul_precision = PRECISION
    config.diffusion.patch.update(height=16, width=24, num_patches=2)
    set_stages(config, training=dict(total_samples=4, eval_batches=1))
    seen_training, seen_generation = [], []
    for name in ("regression_loss", "residual_loss"):
        _record_precision(monkeypatch, steps, name, seen_training)
    exported = train_and_evaluate(config, str(tmp_path / "run"))
    assert seen_training and set(seen_training) == {PRECISION}
    assert jax.config.jax_default_matmul_precision is None

    reloaded = subprocess.run(
        [sys.executable, "-c", RELOAD, json.dumps(exported)], cwd=REPO, capture_output=True, text=True
    )
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    (reg_precision, reg_layout), (diff_precision, diff_layout) = json.loads(reloaded.stdout).values()
    assert reg_precision == diff_precision == PRECISION
    assert reg_layout["channels"] == ["t2m", "orog", "land_frac"] and reg_layout["patch"] is None
    assert diff_layout["channels"][:4] == ["regression_mean:t2m", "t2m", "orog", "land_frac"]
    assert diff_layout["patch"] == dict(height=16, width=24, num_patches=2, overlap=4, boundary=2)

    _record_precision(monkeypatch, generation, "corrdiff_ensemble", seen_generation)
    model = CorrDiffModel.load(str(tmp_path / "run"))
    inputs = InferenceInputs.open(
        model.data_config,
        demo_data_path("era5_t2m_uk_0p25deg.nc"),
        coarsen=True,
        lat=model.lat,
        lon=model.lon,
        times=["2019-03-22T00"],
    )
    generate(model, inputs, str(tmp_path / "out.nc"), make_sampler("deterministic", steps=2), members=1, seed=0)
    assert seen_generation == [PRECISION]


def test_paths_to_shipped_demo_files_follow_the_installation(tmp_path):
    gone = "/nowhere/old-checkout/jax_corrdiff/data_files"
    kept = str(tmp_path / "mine.nc")  # a user's own file that is missing too: left as recorded
    data = {
        "target_paths": [f"{gone}/era5_t2m_uk_0p25deg.nc", kept],
        "input_paths": [],
        "static_path": f"{gone}/static_era5_uk_0p25deg.nc",
    }
    unet = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    config = dict(kind="regression", img_resolution=[8, 8], out_channels=1, cond_channels=1, unet=unet)
    variables = init_variables(config, jax.random.key(0))
    save_model(str(tmp_path / "model"), SavedModel(config, variables, "highest", source={"data": data}))
    loaded = load_model(str(tmp_path / "model")).source["data"]
    assert loaded["target_paths"] == [demo_data_path("era5_t2m_uk_0p25deg.nc"), kept]
    assert loaded["static_path"] == demo_data_path("static_era5_uk_0p25deg.nc")
