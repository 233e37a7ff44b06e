"""Several JAX processes on one machine (launch/local.sh, Gloo CPU collectives) behave like one.

Training: 2 processes x 2 CPU devices give the parameters of 1 process x 4 devices (the global
sample order does not depend on the process count), checkpoints are written once per step and
resume with the same process count. Generation: 2 processes write one file equal to a
1-process run.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import xarray as xr

from jax_corrdiff.data import demo_data_path
from jax_corrdiff.model_dir import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_SH = os.path.join(ROOT, "launch", "local.sh")
TIMEOUT = 600

SMOKE = [
    "-m",
    "jax_corrdiff.train",
    f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:smoke",
    "--config.stage=regression",
    "--config.regression.training.checkpoint_every_steps=2",
    "--config.regression.training.eval_batches=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(nproc: int, devices: int, args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    """``nproc`` JAX processes (through launch/local.sh when > 1) of ``devices`` CPU devices each,
    sharing the test run's compilation cache and XLA flags (conftest.py): a resumed run reuses
    what its first run compiled, compiling being most of these short runs on CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
    flags = os.environ.get("XLA_FLAGS", "").split()
    env.update(
        XLA_FLAGS=" ".join(f for f in flags if "xla_force_host_platform_device_count" not in f),
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(devices),
        PYTHON=sys.executable,
        JAX_COMPILATION_CACHE_DIR=os.environ["JAX_COMPILATION_CACHE_DIR"],
        PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    if nproc > 1:
        env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{_free_port()}"
        cmd = ["bash", LOCAL_SH, str(nproc), sys.executable, *args]
    else:
        cmd = [sys.executable, *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, str(log_path)


def _wait(*runs: tuple[subprocess.Popen, str]) -> list[str]:
    """Wait for every run; fail with the end of the log of the first that did not succeed."""
    deadline = time.time() + TIMEOUT
    outputs = []
    for proc, log_path in runs:
        try:
            rc = proc.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = "timeout"
        with open(log_path) as f:
            output = f.read()
        assert rc == 0, f"{log_path}: exit status {rc}\n{output[-6000:]}"
        outputs.append(output)
    return outputs


def _train_args(workdir, samples: int) -> list[str]:
    return [*SMOKE, f"--workdir={workdir}", f"--config.regression.training.total_samples={samples}"]


def _assert_trees_close(a, b, atol):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)


def test_two_processes_train_like_one_checkpoint_once_and_resume(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # 2 x 2 devices to step 4 (of 8), then 1 x 4 devices straight to step 8; batch 4. One run at a
    # time: three processes compiling at once on a 2-core CI machine run past any sane timeout.
    _wait(_start(2, 2, _train_args(two, 16), tmp_path / "two_a.log"))
    _wait(_start(1, 4, _train_args(one, 32), tmp_path / "one.log"))
    checkpoints = two / "regression" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["2", "4"]
    for step in ("2", "4"):
        assert sorted(os.listdir(checkpoints / step / "data")) == [
            "commit_success.txt",
            "process_0-of-2.json",
            "process_1-of-2.json",
        ]
    first = load_model(str(two / "regression" / "model"))
    assert first.source["step"] == 4

    (output,) = _wait(_start(2, 2, _train_args(two, 32), tmp_path / "two_b.log"))
    assert output.count("resumed from step 4") == 2  # both processes
    assert output.count("train_step loaded from") == 2  # ... each its own compiled step, untraced
    assert sorted(os.listdir(checkpoints), key=int) == ["4", "6", "8"]  # keep_checkpoints = 3

    # Logs written once (process 0): one training-metrics line per logged step.
    with open(two / "regression" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [m["step"] for m in lines if "loss" in m] == [4, 8]
    assert [m["step"] for m in lines if "valid_loss" in m] == [0, 4, 8]  # step 0: the untrained baseline

    a, b = load_model(str(two / "regression" / "model")), load_model(str(one / "regression" / "model"))
    assert a.config == b.config and a.source["step"] == b.source["step"] == 8
    _assert_trees_close(a.variables, b.variables, atol=1e-5)
    # ...and training really moved the weights (the comparison is not vacuous).
    moved = max(
        float(np.abs(x - y).max())
        for x, y in zip(jax.tree_util.tree_leaves(first.variables), jax.tree_util.tree_leaves(a.variables))
    )
    assert moved > 1e-4


def test_generation_across_two_processes_writes_one_file(smoke_workdir, tmp_path):
    era5 = demo_data_path("era5_t2m_uk_0p25deg.nc")

    def args(out):
        return [
            "-m",
            "jax_corrdiff.generate",
            f"--workdir={smoke_workdir}",
            f"--input={era5}",
            "--coarsen",
            f"--output={out}",
            "--members=2",
            "--times=2019-03-22T00,2019-03-22T02",
            "--sampler=deterministic",
            "--steps=4",
            "--batch_size=4",
        ]

    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two, one = tmp_path / "two" / "out.nc", tmp_path / "one" / "out.nc"
    _wait(
        _start(2, 2, args(two), tmp_path / "gen_two.log"),
        _start(1, 4, args(one), tmp_path / "gen_one.log"),
    )
    assert os.listdir(tmp_path / "two") == ["out.nc"]
    with xr.open_dataset(two) as a, xr.open_dataset(one) as b:
        assert a.sizes["time"] == 3 and a.sizes["ensemble"] == 2
        assert sorted(a.data_vars) == sorted(b.data_vars)
        np.testing.assert_array_equal(a.time.values, b.time.values)
        for name in a.data_vars:
            assert np.isfinite(a[name].values).all(), name
            np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-5, atol=1e-4, err_msg=name)


def test_two_processes_compute_their_halves_of_the_regression_means(smoke_workdir, tmp_path):
    """Each process computes the diffusion stage's regression means of its own samples into one
    shared file (``training.regression_means``): the file and its key equal the one-process run's."""
    workdir = tmp_path / "two"
    args = [
        *SMOKE[:2],
        f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:smoke",
        "--config.stage=diffusion",
        f"--config.diffusion.regression_model={os.path.join(smoke_workdir, 'regression', 'model')}",
        "--config.diffusion.training.total_samples=8",
        "--config.diffusion.training.eval_batches=1",
        f"--workdir={workdir}",
    ]
    (output,) = _wait(_start(2, 1, args, tmp_path / "means_two.log"))
    halves = sorted(
        int(line.split("regression means: ")[1].split()[0]) for line in output.splitlines() if " samples in " in line
    )
    one, two = (os.path.join(w, "diffusion", "regression_means") for w in (smoke_workdir, str(workdir)))
    alone = np.load(os.path.join(one, "means.npy"))
    assert len(halves) == 2 and sum(halves) == len(alone) and halves[1] - halves[0] <= 1
    np.testing.assert_allclose(np.load(os.path.join(two, "means.npy")), alone, rtol=1e-5, atol=1e-6)
    with open(os.path.join(one, "key.json")) as a, open(os.path.join(two, "key.json")) as b:
        assert json.load(a) == json.load(b)
    assert load_model(str(workdir / "diffusion" / "model")).source["step"] == 2


def test_environment_rules(monkeypatch):
    from jax_corrdiff import distributed

    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "JAX_DISTRIBUTED"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.describe_environment() == "single process"
    distributed.initialize()  # a no-op: this test process stays single
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.describe_environment() == "single process"
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert distributed.describe_environment() == "SLURM"
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.describe_environment().startswith("explicit")
    monkeypatch.delenv("JAX_PROCESS_ID")
    with pytest.raises(RuntimeError, match="incomplete"):
        distributed.initialize()
    assert jax.process_count() == 1
