"""Test-wide JAX setup: four virtual CPU devices so sharding code runs without a GPU."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")
