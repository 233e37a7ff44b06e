"""Batch generation: a trained CorrDiff (regression + diffusion) over many times, to CF files.

One compiled function per batch shape runs the regression mean and the whole diffusion
sampling loop for a batch of times and all ensemble members; ``inference.batch_loop`` shards
the batches over every device of every process, seeds them and has process 0 write them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff import executable_cache
from jax_corrdiff.compiler_options import network_evaluation_options
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.diffusion.ddpm import DDIMSampler
from jax_corrdiff.diffusion.residual_mean import InterpolationMean
from jax_corrdiff.diffusion.samplers import EDMSampler
from jax_corrdiff.inference.batch_loop import Batch, write_ensembles
from jax_corrdiff.inference.sampling import conditioned_denoisers, corrdiff_ensemble
from jax_corrdiff.mesh import DATA_AXIS, batch_sharded, replicated, tile_sharding
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models.corrdiff import EpsilonUNet
from jax_corrdiff.models.factory import build_model

SAMPLER_PRESETS = {
    # The reference's "stochastic" sampler: Heun, 18 steps, sigma 800 -> 0.002 (churn off).
    "stochastic": dict(solver="heun", num_steps=18, sigma_min=0.002, sigma_max=800.0),
    # Earth2Studio's Taiwan default: deterministic Euler, 8 steps from sigma 80.
    "deterministic": dict(solver="euler", num_steps=8, sigma_min=0.002, sigma_max=80.0),
}
SAMPLER_NAMES = [*sorted(SAMPLER_PRESETS), "ddim"]  # ddim: DDPM models (diffusion.ddpm.DDIMSampler)


def make_sampler(
    name: str,
    *,
    steps: int = 0,
    sigma_min: float = 0.0,
    sigma_max: float = 0.0,
    churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
) -> EDMSampler:
    """A preset by name, with any non-zero argument overriding it."""
    if name not in SAMPLER_PRESETS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLER_PRESETS)}")
    preset = dict(SAMPLER_PRESETS[name])
    for key, value in (("num_steps", steps), ("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value:
            preset[key] = value
    return EDMSampler(**preset, s_churn=churn, s_min=s_min, s_max=s_max, s_noise=s_noise)


def make_ddim_sampler(model: CorrDiffModel, *, steps: int = 0, eta: float = 0.0, x0_clip: float = 0.0) -> DDIMSampler:
    """DDIM (``steps``, default 50; ``eta``; ``x0_clip``) on the schedule ``model``'s DDPM network was trained with."""
    if not isinstance(model.diffusion, EpsilonUNet):
        raise ValueError(f"{model.workdir}: --sampler=ddim needs a DDPM diffusion model (diffusion.parameterization)")
    return DDIMSampler(steps or 50, eta, model.diffusion.schedule, model.diffusion.num_timesteps, x0_clip)


def _check_sampler(model: CorrDiffModel, sampler) -> None:
    if isinstance(model.diffusion, EpsilonUNet) != isinstance(sampler, DDIMSampler):
        raise ValueError(
            f"{model.workdir}: {type(sampler).__name__} cannot sample its "
            f"{type(model.diffusion).__name__} diffusion network (DDPM models take --sampler=ddim)"
        )


@dataclasses.dataclass
class CorrDiffModel:
    """A trained pair of stages and what is needed to feed them (from a training workdir)."""

    regression: Any
    regression_variables: Any
    diffusion: Any
    diffusion_variables: Any
    conditioning: ConditioningLayout  # the diffusion network's
    matmul_precision: str
    normalizer: Normalizer
    data_config: dict
    lat: np.ndarray
    lon: np.ndarray
    workdir: str  # or the Earth2Studio package it was loaded from (interop.e2s_package)
    # Earth2Studio's inference_mode: "both" (mean + residual), "regression" (every member is the
    # mean) or "diffusion" (the residual alone, from a diffusion not conditioned on the mean).
    inference_mode: str = "both"

    @classmethod
    def load(cls, workdir: str) -> CorrDiffModel:
        """The models WORKDIR/regression/model and WORKDIR/diffusion/model of one training run
        (only the diffusion model when its residual is to the interpolated input)."""
        diff_dir = _stage_dir(workdir, "diffusion")
        diff = load_model(diff_dir)
        if diff.conditioning is None or diff.grid is None:
            raise ValueError(f"{diff_dir} has no conditioning layout or grid (not exported by training)")
        normalizer = Normalizer.from_dict(diff.source["normalization"])
        if diff.source.get("residual_mean") == "interpolation":
            regression, reg_variables = InterpolationMean.from_data(diff.conditioning, normalizer), {}
        else:
            reg = load_model(_stage_dir(workdir, "regression"))
            if reg.source.get("normalization") != diff.source["normalization"]:
                raise ValueError(f"{workdir}: the regression and diffusion models were trained on different data")
            if reg.matmul_precision != diff.matmul_precision:
                raise ValueError(
                    f"{workdir}: the regression ({reg.matmul_precision}) and diffusion ({diff.matmul_precision}) "
                    "models were trained at different matmul precisions"
                )
            regression, reg_variables = build_model(reg.config), reg.variables
        return cls(
            regression,
            reg_variables,
            build_model(diff.config),
            diff.variables,
            diff.conditioning,
            diff.matmul_precision,
            normalizer,
            diff.source["data"],
            *diff.grid,
            workdir,
        )


def _stage_dir(workdir: str, stage: str) -> str:
    path = os.path.join(workdir, stage, "model")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{workdir} has no {stage}/model: train the {stage} stage first")
    return path


def make_generate_fn(model: CorrDiffModel, sampler: EDMSampler, members: int, member_batch_size: int | None, mesh):
    """jit(reg_vars, diff_vars, img_lr (B, H, W, C), keys (B,), lead-time labels (B,)) -> (mean, samples),
    normalized units. Patch-trained diffusion models sample by multi-diffusion over tiles of
    their patch size (see ``conditioned_denoisers``); networks without a lead-time embedding
    ignore the labels."""

    def generate(reg_vars, diff_vars, img_lr, keys, labels):
        def apply(x, cond, sigma, label, origin, margin):
            return model.diffusion.apply(
                diff_vars, x, cond, sigma, lead_time_label=label, patch_origin=origin, grid_margin=margin
            )

        def regression(x, lt):
            if model.inference_mode == "diffusion":
                return jnp.zeros((*x.shape[:-1], len(model.normalizer.target_channels)), jnp.float32)
            return model.regression.apply(reg_vars, x, lead_time_label=lt)

        if model.inference_mode == "regression":
            mean = regression(img_lr, labels)
            return mean, jnp.repeat(mean[:, None], members, axis=1)
        tiles = tile_sharding(mesh)
        return corrdiff_ensemble(
            regression,
            conditioned_denoisers(apply, model.conditioning, tiles),
            sampler,
            img_lr,
            keys,
            num_members=members,
            member_batch_size=member_batch_size,
            lead_time_label=labels,
            spmd_axis_name=DATA_AXIS if tiles is not None else None,
        )

    repl, sharded = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        generate,
        in_shardings=(repl, repl, sharded, sharded, sharded),
        out_shardings=sharded,
        compiler_options=network_evaluation_options(),
    )


def check_options(output: str, *, members: int, batch_size: int, member_batch_size: int | None) -> None:
    """Raise ValueError naming the argument (as ``name=value``) that cannot work, before any work."""
    if members < 1:
        raise ValueError(f"members={members}: at least one member is needed")
    for name, value in (("batch_size", batch_size), ("member_batch_size", member_batch_size or 0)):
        if value < 0:
            raise ValueError(f"{name}={value}: must be positive (0 = the default)")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise ValueError(f"output={output}: the directory {directory} does not exist")


def _check_inputs(model: CorrDiffModel, inputs: InferenceInputs) -> None:
    if tuple(inputs.input_channels) != tuple(model.normalizer.input_channels):
        raise ValueError(
            f"{inputs.path}: input channels {inputs.input_channels} differ from the model's "
            f"{model.normalizer.input_channels}"
        )
    if len(np.unique(inputs.times)) != len(inputs.times):
        raise ValueError(
            f"{inputs.path}: several samples share a valid time (forecasts at several lead times); "
            "generate one lead time at a time (--lead_time)"
        )


def _step_maker(model: CorrDiffModel, inputs: InferenceInputs, sampler, members: int, member_batch_size: int | None):
    """``make_step(mesh)`` for ``write_ensembles``: a batch's regression mean and members,
    compiled for the first batch's shapes, or loaded untraced from the executable cache
    (``executable_cache``: every batch has the first one's shapes, ``Batch.sharded``)."""
    norm, static = model.normalizer, model.normalizer.normalize_static(inputs.static).astype(np.float32)
    labels = np.zeros(len(inputs), np.int32) if inputs.lead_time_labels is None else inputs.lead_time_labels
    # What make_generate_fn's program is traced from besides the source and its arguments.
    described = executable_cache.describe_objects(
        model.regression,
        model.diffusion,
        model.conditioning,
        tuple(norm.target_channels),
        model.inference_mode,
        sampler,
    )

    def make_step(mesh):
        fn = make_generate_fn(model, sampler, members, member_batch_size, mesh)
        description = described and {
            "program": "generate",
            "closed_over": described,
            "members": [members, member_batch_size],
        }
        program = executable_cache.FirstCallProgram(fn, mesh, description)
        variables = jax.device_put((model.regression_variables, model.diffusion_variables), replicated(mesh))

        def step(batch: Batch):
            img_lr = batch.sharded(norm.img_lr(batch.raw_inputs, static))
            return program(*variables, img_lr, batch.keys, batch.sharded(labels[batch.start : batch.stop]))

        return step

    return make_step


def generate(
    model: CorrDiffModel,
    inputs: InferenceInputs,
    output: str,
    sampler: EDMSampler,
    *,
    members: int,
    seed: int,
    batch_size: int = 0,
    member_batch_size: int | None = None,
    num_devices: int = 0,
    tile_devices: int = 1,
    overwrite: bool = False,
) -> str:
    """Sample ``members`` members for every time of ``inputs`` into ``output`` at the model's
    matmul precision (skipping times an earlier run finished); returns ``output``.

    Args:
        model: the trained pair of stages.
        inputs: the coarse inputs (and truth, if any) on the model's grid.
        output: the file to write (CF NetCDF, or Zarr for ``*.zarr``).
        sampler: the EDM sampler of the residual.
        members: ensemble members per time.
        seed: member m of time t depends only on (seed, t, m).
        batch_size: times per compiled call, sharded over every device (0 = one per device).
        member_batch_size: members vectorised at once (None = all).
        num_devices: devices of the mesh (0 = all).
        tile_devices: devices sharing one image's multi-diffusion tiles (patch-trained models).
        overwrite: replace an existing ``output`` (one of other settings is otherwise refused).
    """
    check_options(output, members=members, batch_size=batch_size, member_batch_size=member_batch_size)
    _check_inputs(model, inputs)
    _check_sampler(model, sampler)
    return write_ensembles(
        model,
        inputs,
        output,
        sampler,
        _step_maker(model, inputs, sampler, members, member_batch_size),
        members=members,
        seed=seed,
        batch_size=batch_size,
        num_devices=num_devices,
        tile_devices=tile_devices,
        overwrite=overwrite,
    )
