"""jax_corrdiff: CorrDiff (residual corrective diffusion) for km-scale downscaling in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="jax_corrdiff",
    version="0.1.0",
    description="CorrDiff km-scale atmospheric downscaling (regression UNet + EDM residual diffusion) in JAX/Flax",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["jax_corrdiff", "jax_corrdiff.*"]),
    package_data={"jax_corrdiff": ["data_files/*"]},
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "xarray>=2025.1",
        "netCDF4>=1.7",
        "h5netcdf>=1.3",
        "zarr>=3.0",
        "scipy>=1.12",
        "tensorboardX>=2.6",
        "scores>=2.7",
        "matplotlib>=3.8",
        "numpy>=2.0",
        "ml_collections>=1.0",
        "absl-py>=2.1",
        "ml_dtypes>=0.5",
    ],
    extras_require={
        "cuda12": ["jax[cuda12]>=0.8"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.15"],
    },
)
