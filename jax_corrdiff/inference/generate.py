"""Batch generation: a trained CorrDiff (regression + diffusion) over many times, to CF files.

One compiled function per batch shape runs the regression mean and the whole diffusion
sampling loop for a batch of times and all ensemble members; the batch is sharded over
every device of every process, and process 0 writes.

Randomness: member m of the time t uses fold_in(fold_in(key(seed), minutes(t)), m), so a
sample depends only on (seed, time, member), not on batching or device count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.experimental import multihost_utils

from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.sources import FieldSpec, expand_paths, time_str
from jax_corrdiff.diffusion.patching import TileLayout
from jax_corrdiff.diffusion.samplers import EDMSampler
from jax_corrdiff.inference.sampling import corrdiff_ensemble, multidiffusion_denoisers, whole_image_denoisers
from jax_corrdiff.inference.writer import EnsembleWriter
from jax_corrdiff.mesh import batch_sharded, make_mesh, replicated, shard_batch, shard_keys
from jax_corrdiff.model_dir import load_grid, load_model
from jax_corrdiff.models.factory import build_model

log = logging.getLogger("jax_corrdiff")

SAMPLER_PRESETS = {
    # The reference's "stochastic" sampler: Heun, 18 steps, sigma 800 -> 0.002 (churn off).
    "stochastic": dict(solver="heun", num_steps=18, sigma_min=0.002, sigma_max=800.0),
    # Earth2Studio's Taiwan default: deterministic Euler, 8 steps from sigma 80.
    "deterministic": dict(solver="euler", num_steps=8, sigma_min=0.002, sigma_max=80.0),
}


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


@dataclasses.dataclass
class CorrDiffModel:
    """A trained pair of stages and what is needed to feed them (from a training workdir)."""

    regression: Any
    regression_variables: Any
    diffusion: Any
    diffusion_variables: Any
    normalizer: Normalizer
    data_config: dict
    lat: np.ndarray
    lon: np.ndarray
    hr_mean_conditioning: bool
    patch: dict
    workdir: str

    @classmethod
    def load(cls, workdir: str) -> CorrDiffModel:
        reg_dir, diff_dir = (os.path.join(workdir, stage, "model") for stage in ("regression", "diffusion"))
        for path in (reg_dir, diff_dir):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{workdir} has no {os.path.relpath(path, workdir)}: train both stages first")
        reg_config, reg_vars, reg_source = load_model(reg_dir)
        diff_config, diff_vars, diff_source = load_model(diff_dir)
        if reg_source.get("normalization") != diff_source.get("normalization"):
            raise ValueError(f"{workdir}: the regression and diffusion models were trained on different data")
        if "normalization" not in diff_source or "data" not in diff_source:
            raise ValueError(f"{diff_dir} holds no normalization/data description (not exported by training)")
        lat, lon = load_grid(diff_dir)
        return cls(
            build_model(reg_config),
            reg_vars,
            build_model(diff_config),
            diff_vars,
            Normalizer.from_dict(diff_source["normalization"]),
            diff_source["data"],
            lat,
            lon,
            bool(diff_source["hr_mean_conditioning"]),
            diff_source.get("patch", {}),
            workdir,
        )


def variable_attrs(paths: list[str], channels: list[str]) -> dict[str, dict]:
    """units / long_name / standard_name of each target variable, from the first file that has it."""
    names = list(dict.fromkeys(FieldSpec.parse(c).name for c in channels))
    attrs: dict[str, dict] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with xr.open_dataset(path, engine="zarr" if path.endswith(".zarr") else None) as ds:
            for name in names:
                if name in ds and name not in attrs:
                    attrs[name] = {
                        k: str(ds[name].attrs[k])
                        for k in ("units", "long_name", "standard_name")
                        if k in ds[name].attrs
                    }
    return attrs


def _time_keys(seed: int, times: np.ndarray) -> jax.Array:
    minutes = times.astype("datetime64[m]").astype(np.int64).astype(np.uint32)
    base = jax.random.key(seed)
    return jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.asarray(minutes))


def make_generate_fn(model: CorrDiffModel, sampler: EDMSampler, members: int, member_batch_size: int | None, mesh):
    """jit(reg_vars, diff_vars, img_lr (B, H, W, C), keys (B,)) -> (mean, samples), normalized units.

    Patch-trained diffusion models sample by multi-diffusion over tiles of their patch size."""

    lead_time_aware = bool(model.diffusion.unet.lead_time_steps)

    def generate(reg_vars, diff_vars, img_lr, keys, labels):
        labels = labels if lead_time_aware else None

        def apply(x, cond, sigma, label, origin, margin):
            return model.diffusion.apply(
                diff_vars, x, cond, sigma, lead_time_label=label, patch_origin=origin, grid_margin=margin
            )

        patch = model.patch
        if patch and patch["height"]:
            layout = TileLayout(
                tuple(img_lr.shape[1:3]), (patch["height"], patch["width"]), patch["overlap"], patch["boundary"]
            )
            make_denoiser = multidiffusion_denoisers(apply, layout, hr_mean_conditioning=model.hr_mean_conditioning)
        else:
            make_denoiser = whole_image_denoisers(apply, hr_mean_conditioning=model.hr_mean_conditioning)
        return corrdiff_ensemble(
            lambda x, lt: model.regression.apply(reg_vars, x, lead_time_label=lt),
            make_denoiser,
            sampler,
            img_lr,
            keys,
            num_members=members,
            member_batch_size=member_batch_size,
            lead_time_label=labels,
        )

    repl, sharded = replicated(mesh), batch_sharded(mesh)
    return jax.jit(generate, in_shardings=(repl, repl, sharded, sharded, sharded), out_shardings=sharded)


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
) -> str:
    """Generate ``members`` samples for every time of ``inputs`` into ``output`` (skipping
    times an earlier run finished). ``batch_size`` times per call (0 = one per device)."""
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
    mesh = make_mesh(num_devices)
    batch_size = batch_size or mesh.size
    if batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {mesh.size} devices")
    norm = model.normalizer
    writer = None
    if jax.process_index() == 0:
        writer = EnsembleWriter(
            output,
            times=inputs.times,
            members=members,
            lat=model.lat,
            lon=model.lon,
            target_channels=list(norm.target_channels),
            input_channels=list(norm.input_channels),
            has_truth=inputs.has_truth,
            variable_attrs=variable_attrs(
                [inputs.path, *expand_paths(model.data_config["target_paths"], "target")], list(norm.target_channels)
            ),
            init_times=inputs.init_times,
            global_attrs={
                "title": "CorrDiff downscaling ensemble",
                "source": f"jax_corrdiff, model {model.workdir}",
                "input": inputs.path,
                "sampler": repr(sampler),
                "seed": seed,
            },
        )
        done = writer.completed
    else:
        done = np.zeros(len(inputs), bool)
    done = multihost_utils.broadcast_one_to_all(done)
    static = norm.normalize_static(inputs.static).astype(np.float32)
    fn = make_generate_fn(model, sampler, members, member_batch_size, mesh)
    reg_vars = jax.device_put(model.regression_variables, replicated(mesh))
    diff_vars = jax.device_put(model.diffusion_variables, replicated(mesh))
    starts = [s for s in range(0, len(inputs), batch_size) if not done[s : s + batch_size].all()]
    log.info(
        "generate: %d times (%d already written), %d members, %d per batch on %d devices",
        len(inputs),
        int(done.sum()),
        members,
        batch_size,
        mesh.size,
    )
    t0 = time.time()
    for n, start in enumerate(starts):
        stop = min(start + batch_size, len(inputs))
        raw_inputs, truth = inputs.read(start, stop)
        img_lr = np.concatenate(
            [norm.normalize_inputs(raw_inputs), np.broadcast_to(static, (*raw_inputs.shape[:3], static.shape[-1]))],
            axis=-1,
        )
        times = inputs.times[start:stop]
        pad = batch_size - (stop - start)  # keep one compiled shape: repeat the last time
        img_lr = np.concatenate([img_lr, np.repeat(img_lr[-1:], pad, axis=0)]).astype(np.float32)
        keys = _time_keys(seed, np.concatenate([times, np.repeat(times[-1:], pad)]))
        labels = (
            np.zeros(stop - start, np.int32) if inputs.lead_time_labels is None else inputs.lead_time_labels[start:stop]
        )
        labels = np.concatenate([labels, np.repeat(labels[-1:], pad)]).astype(np.int32)
        mean, samples = fn(
            reg_vars, diff_vars, shard_batch(img_lr, mesh), shard_keys(keys, mesh), shard_batch(labels, mesh)
        )
        mean = multihost_utils.process_allgather(mean, tiled=True)[: stop - start]
        samples = multihost_utils.process_allgather(samples, tiled=True)[: stop - start]
        if writer is not None:
            writer.write(start, norm.denormalize_target(samples), norm.denormalize_target(mean), raw_inputs, truth)
        elapsed = time.time() - t0
        eta = elapsed / (n + 1) * (len(starts) - n - 1)
        log.info(
            "generate: %s..%s done (%d/%d batches) | %.1f s/batch | ETA %s",
            time_str(times[0]),
            time_str(times[-1]),
            n + 1,
            len(starts),
            elapsed / (n + 1),
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
    return output
