"""How many CPU devices training splits the cores into (``jax_corrdiff.cpu_devices``)."""

import os
import subprocess
import sys

import demo
import pytest

from jax_corrdiff import cpu_devices
from jax_corrdiff.cpu_devices import cpu_device_count, training_cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def host(monkeypatch):
    """host(vendor, flags): the CPU the rules see."""

    def set_host(vendor: str, flags: set[str]) -> None:
        monkeypatch.setattr(cpu_devices, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(cpu_devices, "cpu_flags", lambda: frozenset(flags))

    return set_host


@pytest.mark.parametrize(
    "channels, batches, cores, expected",
    [
        (32, [2], 2, 2),
        (32, [8], 16, 8),  # never more devices than samples
        (32, [8, 6], 4, 2),  # every stage's batch must split evenly
        (32, [3], 2, 1),
        (64, [12], 8, 6),
        (128, [8], 8, 1),  # YNNPACK threads these convolutions itself
    ],
)
def test_narrow_networks_get_one_device_per_core_as_the_batches_allow(host, channels, batches, cores, expected):
    host("GenuineIntel", {"avx2", "avx512f"})
    assert cpu_device_count(channels, batches, cores) == expected


@pytest.mark.parametrize(
    "vendor, flags, devices",
    [
        ("AuthenticAMD", {"avx2"}, 2),  # Zen 3
        ("AuthenticAMD", {"avx2", "avx512f"}, 1),  # Zen 4: one device, Eigen's threaded convolutions
        ("GenuineIntel", {"avx2", "avx512f"}, 2),  # the Xeon
        ("", set(), 2),  # no /proc/cpuinfo, or not x86
    ],
)
def test_amd_cpus_with_avx512_train_narrow_networks_on_one_device(host, vendor, flags, devices):
    host(vendor, flags)
    assert cpu_device_count(32, [2], 2) == devices


def test_the_widest_trained_network_and_every_trained_batch_decide(host):
    host("GenuineIntel", {"avx2", "avx512f"})
    config = demo.get_config()
    config.regression.training.batch_size = 8
    config.diffusion.training.batch_size = 4
    assert training_cpu_devices(config, cores=16) == 4
    config.diffusion.model.unet.model_channels = 128
    assert training_cpu_devices(config, cores=16) == 1
    config.stage = "regression"  # the wide diffusion network is not trained
    assert training_cpu_devices(config, cores=16) == 8
    config.cpu_devices = 3
    assert training_cpu_devices(config, cores=16) == 3
    config.cpu_devices = -1
    with pytest.raises(ValueError, match="cpu_devices"):
        training_cpu_devices(config, cores=16)


_SPLIT = """
import sys
sys.path.insert(0, "configs")
import demo
from jax_corrdiff.cpu_devices import split_cores_for_training
config = demo.get_config()
config.cpu_devices = 3
print(split_cores_for_training(config))
import jax
print(jax.device_count(), jax.default_backend())
"""


@pytest.mark.parametrize(
    "environment, devices, says",
    [
        ({}, 3, "CPU devices: 3 on"),
        ({"JAX_NUM_CPU_DEVICES": "2"}, 2, "environment"),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, 2, "environment"),
        ({"SLURM_NTASKS": "2"}, 1, "multi-process"),
    ],
)
def test_the_entry_point_splits_the_backend_unless_the_environment_chose(environment, devices, says):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS", "SLURM_NTASKS")}
    env.update(environment, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _SPLIT], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    message, count = result.stdout.strip().splitlines()[-2:]
    assert says in message
    assert count == f"{devices} cpu"
