"""ZSSD generation: a trained prior sampled with posterior guidance toward a coarse field.

The prior (``config.stage = "prior"``) knows the fine field's climatology given the static
fields and the time; guidance (``diffusion.guidance``) makes each sample agree with the coarse
observation, at whatever scale factor it comes:

- ``dps``: the observation on its own grid, A = block average by ``obs_factor`` (coarsened truth)
  or area-weighted averaging onto the observation's lat/lon grid (a coarse file), each coarse
  cell weighted by its size.
- ``ucg``: unified coordinate guidance. The observation, bilinearly interpolated to the fine
  grid, and the sample are both mapped to the unified grid of ``obs_factor`` fine cells and
  projected back (``guidance.unified_operator``), then compared with cos(lat) weights.

The output is the CorrDiff file layout (``inference.writer``), so ``score`` reads it unchanged:
``NAME`` the guided members, ``NAME_regression`` their ensemble mean (there is no regression
stage), ``NAME_interpolated`` the observation interpolated bilinearly, ``NAME_bcsd`` the BCSD
baseline of the same observation (``inference.bcsd``) and ``NAME_truth``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff import executable_cache
from jax_corrdiff.compiler_options import network_evaluation_options
from jax_corrdiff.data.calendar import cyclic_time_features
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.regrid import block_average
from jax_corrdiff.data.sources import EmptyTimeRangeError, FieldSource
from jax_corrdiff.data.store import PREPARED_DIR, STORE_NAME, PreparedStore
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.diffusion.guidance import (
    GuidanceSchedule,
    Observation,
    SeparableOperator,
    area_weighted_operator,
    block_average_operator,
    cell_count_weights,
    cos_lat_weights,
    guided_denoiser,
    unified_operator,
)
from jax_corrdiff.diffusion.samplers import EDMSampler, sample_ensemble
from jax_corrdiff.inference.batch_loop import Baseline, Batch, write_ensembles
from jax_corrdiff.inference.bcsd import BCSD, ShortClimatologyError
from jax_corrdiff.mesh import batch_sharded, replicated
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models.factory import build_model

log = logging.getLogger("jax_corrdiff")

GUIDANCE = ("dps", "ucg")


@dataclasses.dataclass
class PriorModel:
    """A trained ZSSD prior (WORKDIR/prior/model) and what is needed to feed it."""

    network: Any
    variables: Any
    conditioning: ConditioningLayout
    matmul_precision: str
    normalizer: Normalizer
    data_config: dict
    lat: np.ndarray
    lon: np.ndarray
    workdir: str

    @classmethod
    def load(cls, workdir: str) -> PriorModel:
        path = os.path.join(workdir, "prior", "model")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{workdir} has no prior/model: train it first (config.stage = 'prior')")
        saved = load_model(path)
        if saved.conditioning is None or not saved.conditioning.cyclic_time or saved.grid is None:
            raise ValueError(f"{path} is not a ZSSD prior (no cyclic-time conditioning layout or grid)")
        norm = Normalizer.from_dict(saved.source["normalization"])
        if tuple(norm.input_channels) != tuple(norm.target_channels):
            raise ValueError(
                f"{path}: guidance compares the coarse inputs {list(norm.input_channels)} with the targets "
                f"{list(norm.target_channels)}; they must be the same variables"
            )
        return cls(
            build_model(saved.config),
            saved.variables,
            saved.conditioning,
            saved.matmul_precision,
            norm,
            saved.source["data"],
            *saved.grid,
            workdir,
        )


def open_inputs(model: PriorModel, path: str, *, coarsen: bool, obs_factor: int, period=None, times=None):
    """The observations of ``path``: with ``coarsen``, fine truth block-averaged by ``obs_factor``
    (the interpolated input made by that factor); otherwise a coarse file on its own grid."""
    config = {**model.data_config, "coarsen_factor": int(obs_factor)}
    return InferenceInputs.open(config, path, coarsen=coarsen, lat=model.lat, lon=model.lon, period=period, times=times)


# (A from the fine grid to the observation's grid, raw_values(raw, truth, times) -> y, physical units)
CoarseObservation = tuple[SeparableOperator, Callable]


def coarse_observation(model: PriorModel, inputs: InferenceInputs, obs_factor: int) -> CoarseObservation:
    """(A, raw_values): the operator from the fine grid to the observation's own grid, and
    raw_values(raw, truth, times) -> the observations on it (B, A, B', C), physical units.
    Coarsened truth: block average by ``obs_factor`` of the truth. A coarse file: area-weighted
    averaging onto its regular lat/lon grid, and the file's values in the cells A keeps."""
    shape = model.lat.shape
    if inputs.has_truth:
        return block_average_operator(obs_factor, shape), lambda raw, truth, times: block_average(truth, obs_factor)
    source = FieldSource([inputs.path], model.data_config["input_variables"], "observations")
    if source.regular is None:
        raise ValueError(f"{inputs.path}: guidance from a coarse file needs a regular 1-D lat/lon grid")
    op, (lat_idx, lon_idx) = area_weighted_operator(model.lat, model.lon, *source.regular)

    def raw_values(raw, truth, times):
        return source.read(np.searchsorted(source.times, times))[:, lat_idx][:, :, lon_idx]

    return op, raw_values


# values(raw interpolated inputs (B, H, W, C), truth or None, times (B,)) -> normalized y (B, ...)
ObservationValues = Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray]


def make_observation(
    model: PriorModel, coarse: CoarseObservation, guidance: str, obs_factor: int
) -> tuple[Observation, ObservationValues]:
    """The observation operator and weights of ``guidance`` (a template with zero values), and
    the function that gives each batch's observation values in normalized units; ``coarse`` is
    ``coarse_observation``'s (operator, raw values)."""
    norm, shape = model.normalizer, model.lat.shape
    if guidance == "ucg":
        op = unified_operator(obs_factor, shape)
        template = Observation(op, jnp.zeros((*shape, 1)), cos_lat_weights(model.lat), shape)
        return template, lambda raw, truth, times: np.asarray(op(norm.normalize_target(raw)))
    if guidance != "dps":
        raise ValueError(f"--guidance must be one of {GUIDANCE}, got {guidance!r}")
    op, raw_values = coarse
    values = lambda raw, truth, times: norm.normalize_target(raw_values(raw, truth, times))  # noqa: E731
    return Observation(op, jnp.zeros((*op.shape, 1)), cell_count_weights(op), shape), values


def bcsd_baseline(
    model: PriorModel, inputs: InferenceInputs, obs_factor: int, coarse: CoarseObservation
) -> Baseline | None:
    """The BCSD baseline of these observations (``inference.bcsd``): the reference climatology is
    the training period of the prior's prepared store; the bias correction maps from the
    observation file's own record over that period (the historical overlap, as in the original
    method). None, with a warning, when the workdir has no prepared store or the file does not
    cover enough of the training period."""
    store_path = os.path.join(model.workdir, PREPARED_DIR, STORE_NAME)
    if not os.path.isdir(store_path):
        log.warning("no prepared store at %s: the output has no BCSD baseline", store_path)
        return None
    store = PreparedStore(store_path)
    train = store.split_indices("train")
    operator, raw_values = coarse
    try:
        overlap = open_inputs(
            model, inputs.path, coarsen=inputs.has_truth, obs_factor=obs_factor, period=store.config["train_period"]
        )
        record = raw_values(*overlap.read(0, len(overlap)), overlap.times)
        bcsd = BCSD.fit(operator, store.read(train)[0], store.times[train], record, overlap.times)
    except (EmptyTimeRangeError, ShortClimatologyError) as error:
        log.warning("no BCSD baseline (it needs the observation source over the training period): %s", error)
        return None
    log.info("BCSD: climatology of %d training times, record of %d observation times", len(train), len(record))
    return lambda batch: bcsd(raw_values(batch.raw_inputs, batch.truth, batch.times), batch.times)


def observation_arguments(observation: Observation) -> tuple:
    """(A's row and column matrices, the weights W, lambda_max(A^T W^2 A)) as float32 arrays:
    what ``make_guided_fn``'s program takes of the observation as arguments rather than closing
    over, so that nothing it is traced from is a value its description cannot name
    (``executable_cache``)."""
    fields = (observation.operator.rows, observation.operator.cols, observation.weights, observation.norm)
    return tuple(np.asarray(a, np.float32) for a in fields)


def make_guided_fn(
    model: PriorModel, sampler: EDMSampler, observation: Observation, schedule: GuidanceSchedule, members, mbs, mesh
):
    """jit(variables, static (H, W, C_s), ``observation_arguments(observation)``, time features
    (B, 4), y (B, ...), keys (B,)) -> samples (B, M, H, W, C), normalized units; member m of
    input b uses fold_in(keys[b], m). ``observation`` gives the kind of operator, not its values."""
    layout = model.conditioning
    shape = (*model.lat.shape, len(layout.target_channels))

    def generate(variables, static, observed, time_features, values, keys):
        rows, cols, weights, norm = observed
        operator = SeparableOperator(rows, cols)

        def one(features, y, key):
            cond = layout.assemble(static[None], time_features=features[None])
            denoise = lambda x, sigma: model.network.apply(variables, x[None], cond, sigma[None])[0]  # noqa: E731
            guide = dataclasses.replace(observation, operator=operator, values=y, weights=weights, norm=norm)
            guided = guided_denoiser(denoise, guide, schedule)
            return sample_ensemble(sampler, guided, shape, key, jnp.arange(members), mbs)

        return jax.vmap(one)(time_features, values, keys)

    repl, sharded = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        generate,
        in_shardings=(repl, repl, repl, sharded, sharded, sharded),
        out_shardings=sharded,
        compiler_options=network_evaluation_options(),
    )


def generate_guided(
    model: PriorModel,
    inputs: InferenceInputs,
    output: str,
    sampler: EDMSampler,
    *,
    guidance: str,
    obs_factor: int,
    schedule: GuidanceSchedule,
    members: int,
    seed: int,
    batch_size: int = 0,
    member_batch_size: int | None = None,
    num_devices: int = 0,
) -> str:
    """Sample ``members`` guided members for every time of ``inputs`` into ``output`` (skipping
    times an earlier run finished), at the prior's matmul precision; returns ``output``."""
    coarse = coarse_observation(model, inputs, obs_factor)
    observation, values = make_observation(model, coarse, guidance, obs_factor)
    log.info("generate (%s guidance, x%d): %d times, %d members", guidance, obs_factor, len(inputs), members)
    static = model.normalizer.normalize_static(inputs.static).astype(np.float32)

    # What make_guided_fn's program is traced from besides the source and its arguments.
    described = executable_cache.describe_objects(model.network, model.conditioning, sampler, schedule)
    members_per_call = [members, member_batch_size]
    description = described and {"program": "guided generate", "closed_over": described, "members": members_per_call}

    def make_step(mesh):
        fn = make_guided_fn(model, sampler, observation, schedule, members, member_batch_size, mesh)
        program = executable_cache.FirstCallProgram(fn, mesh, description)
        fixed = jax.device_put((model.variables, static, observation_arguments(observation)), replicated(mesh))

        def step(batch: Batch):
            y = values(batch.raw_inputs, batch.truth, batch.times).astype(np.float32)
            features = batch.sharded(cyclic_time_features(batch.times))
            return None, program(*fixed, features, batch.sharded(y), batch.keys)

        return step

    bcsd = bcsd_baseline(model, inputs, obs_factor, coarse)
    return write_ensembles(
        model,
        inputs,
        output,
        sampler,
        make_step,
        members=members,
        seed=seed,
        batch_size=batch_size,
        num_devices=num_devices,
        baselines={"bcsd": bcsd} if bcsd else None,
    )
