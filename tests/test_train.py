"""End-to-end training on the shipped demo data (smoke widths): both stages, resume, devices."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jax_corrdiff import executable_cache
from jax_corrdiff.config import set_stages
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.training import loop
from jax_corrdiff.training.checkpointing import TrainingCheckpoints
from jax_corrdiff.training.data_setup import TrainingData
from jax_corrdiff.training.loop import export, restore, state_shapes, train_and_evaluate
from jax_corrdiff.training.stage import build_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo  # noqa: E402


def smoke(steps, stage="regression", **overrides):
    config = demo.get_config("smoke")
    config.stage = stage
    every = dict(checkpoint_every_steps=steps, eval_every_steps=steps, log_every_steps=5)
    set_stages(config, training=dict(total_samples=config.regression.training.batch_size * steps, **every))
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def history(workdir, stage):
    with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_smoke_demo_trains_both_stages_and_the_loss_falls(tmp_path):
    workdir = str(tmp_path)
    exported = train_and_evaluate(smoke(40, stage="all"), workdir)
    for stage in ("regression", "diffusion"):
        saved = load_model(exported[stage])
        assert saved.config["kind"] == stage and saved.source["stage"] == stage
        assert saved.source["normalization"]["target"]["channels"] == ["t2m"]
        assert os.listdir(os.path.join(workdir, stage, "checkpoints"))
        # Validation losses use fixed noise, so they are comparable: step 0 is the untrained model.
        valid = {h["step"]: h["valid_loss_ema"] for h in history(workdir, stage) if "valid_loss_ema" in h}
        assert sorted(valid) == [0, 40] and valid[40] < 0.8 * valid[0], valid
    assert os.path.exists(os.path.join(workdir, "prepared", "stats.json"))


def _final(workdir):
    saved = load_model(os.path.join(workdir, "regression", "model"))
    return saved.variables, saved.source["step"]


def _recording(monkeypatch, calls: list, module, name: str, label: str):
    """Append ``label`` to ``calls`` whenever ``module.<name>`` is called."""
    original = getattr(module, name)

    def record(*args, **kwargs):
        calls.append(label)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, record)


def test_kill_and_resume_is_bit_identical(tmp_path, monkeypatch):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(smoke(16), straight)
    calls = []
    _recording(monkeypatch, calls, executable_cache, "compile_then_release", "compile step")
    _recording(monkeypatch, calls, loop, "init_state", "initialise")
    train_and_evaluate(smoke(8), resumed)  # stopped after 8 steps
    # The step is compiled (or loaded) before the state exists.
    assert calls[-1] == "initialise" and calls.count("initialise") == 1
    train_and_evaluate(smoke(16), resumed)  # the same run, continued to 16
    assert calls.count("initialise") == 1  # a resumed run never initialises
    a, step_a = _final(straight)
    b, step_b = _final(resumed)
    assert step_a == step_b == 16
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert history(resumed, "regression")[-1]["step"] == 16


def test_a_restarted_run_loads_its_training_step_without_tracing(tmp_path):
    """Two processes, the second extending the first's run: the first compiles the step and
    keeps it in the workdir's executable cache, the second loads it and traces nothing."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the workdir's caches
    outputs = []
    for samples in (16, 32):
        command = [
            sys.executable,
            "-m",
            "jax_corrdiff.train",
            "--config=configs/demo.py:smoke",
            "--config.stage=regression",
        ]
        command += [f"--workdir={tmp_path}", f"--config.regression.training.total_samples={samples}"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    assert "train_step compiled in" in outputs[0] and "train_step loaded from" not in outputs[0]
    assert "train_step loaded from" in outputs[1] and "train_step compiled in" not in outputs[1]
    assert "resumed from step 4" in outputs[1]
    assert len(os.listdir(tmp_path / "compilation_cache" / "executables")) == 1


def test_a_run_stopped_on_one_device_resumes_on_four(tmp_path):
    # CPU training picks its device count from the config (cpu_devices), so it can change
    # between a run and its resumption. This also shows one device trains like four: the first
    # half of the resumed run is on one.
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_and_evaluate(smoke(16, num_devices=4), straight)
    train_and_evaluate(smoke(8, num_devices=1), resumed)
    train_and_evaluate(smoke(16, num_devices=4), resumed)
    (a, step_a), (b, step_b) = _final(straight), _final(resumed)
    assert step_a == step_b == 16
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6), a, b)


def test_unknown_config_key_is_rejected(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_corrdiff.train",
            "--config=configs/demo.py:smoke",
            f"--workdir={tmp_path}",
            "--config.regression.training.learning_rate=1e-3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "learning_rate" in result.stderr


def test_unknown_demo_variant_is_rejected():
    with pytest.raises(ValueError, match="tiny"):
        demo.get_config("tiny")


def test_unknown_stage_is_rejected_before_any_work(tmp_path):
    config = demo.get_config("smoke")
    config.stage = "posterior"
    with pytest.raises(ValueError, match="config.stage"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_stage_pieces_can_be_called_alone(tmp_path):
    config = smoke(1)
    data = TrainingData.open(config, str(tmp_path))
    stage = build_stage(config, "regression", str(tmp_path), data)
    assert stage.model_config["cond_channels"] == stage.layout.cond_channels == 3  # t2m | orog, land_frac
    checkpoints = TrainingCheckpoints(str(tmp_path / "checkpoints"), keep=1)
    state, start = restore(stage, state_shapes(stage), checkpoints, data.train_iterator(4, seed=0))
    checkpoints.close()
    assert start == 0 and int(state.step) == 0
    saved = load_model(export(stage, state))
    assert saved.config == stage.model_config and saved.conditioning == stage.layout
    assert saved.matmul_precision == config.matmul_precision and saved.source["step"] == 0
