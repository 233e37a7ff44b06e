"""Replay PhysicsNeMo reference fixtures through the imported JAX models.

A fixture folder (written by ``tests/fixtures/make_physicsnemo_fixtures.py``) holds
``manifest.json``, ``.mdlus`` models and ``.npz`` inputs/outputs in NCHW. Each case is a
module forward call or a sampler run; the figure of merit is
max |jax - torch| / std(torch output). Used by the CI tests (small widths) and by
``benchmarks/parity_physicsnemo.py`` (full Taiwan width).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.diffusion.samplers import EDMSampler
from jax_corrdiff.interop.physicsnemo import MATMUL_PRECISION, PhysicsNemoModel, load

SAMPLER_CALLS = ("stochastic_sampler", "deterministic_sampler")


def read_manifest(fixture_dir: str) -> dict:
    with open(os.path.join(fixture_dir, "manifest.json")) as f:
        return json.load(f)


def _sampler_from_case(case: dict) -> EDMSampler:
    kw = case["sampler_kwargs"]
    return EDMSampler(
        num_steps=int(kw["num_steps"]),
        sigma_min=float(kw["sigma_min"]),
        sigma_max=float(kw["sigma_max"]),
        rho=float(kw["rho"]),
        solver=kw.get("solver", "heun"),
        s_churn=float(kw.get("S_churn", 0.0)),
    )


def _run_sampler(model: PhysicsNemoModel, case: dict, data) -> np.ndarray:
    """Reference samplers condition on cat(mean_hr, img_lr) and start from latents * sigma_max."""
    nhwc = lambda a: jnp.asarray(np.asarray(a, np.float32).transpose(0, 2, 3, 1))  # noqa: E731
    latents, img_lr = (nhwc(data[k]) for k in case["args"])
    cond = img_lr
    if "mean_hr" in case["kwargs"]:
        cond = jnp.concatenate([nhwc(data[case["kwargs"]["mean_hr"]]), img_lr], axis=-1)
    sampler = _sampler_from_case(case)

    @jax.jit
    def run(variables, latents, cond):
        denoise = lambda x, sigma: model.module.apply(variables, x, cond, sigma)  # noqa: E731
        return sampler(denoise, latents, jax.random.key(0))

    with jax.default_matmul_precision(MATMUL_PRECISION):
        return np.asarray(run(model.variables, latents, cond)).transpose(0, 3, 1, 2)


def run_case(fixture_dir: str, case: dict, model: PhysicsNemoModel | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(our output, reference output) for one manifest case, both NCHW."""
    model = model or load(os.path.join(fixture_dir, case["model"]))
    with np.load(os.path.join(fixture_dir, case["data"])) as npz:
        data = {k: npz[k] for k in npz.files}
    if case["call"] in SAMPLER_CALLS:
        ours = _run_sampler(model, case, data)
    elif case["call"] == "forward":
        args = [data[k] for k in case["args"]]
        kwargs = {name: data[key] for name, key in case["kwargs"].items()}
        ours = model(*args, **kwargs)
    else:
        raise ValueError(f"unknown fixture call {case['call']!r}")
    return ours, data[case["output"]]


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / std(reference)."""
    return float(np.max(np.abs(ours.astype(np.float64) - reference)) / np.std(reference))
