"""The batch loop shared by CorrDiff and ZSSD generation: times x members into one CF file.

``write_ensembles`` owns everything but the sampling itself: the device mesh and batch size,
process 0's writer (resuming a file an earlier run left unfinished, refusing one of other
settings), the per-time random keys, padding every batch to one compiled shape, gathering
the sharded results and logging progress. The caller supplies a step that samples one batch.

Randomness: member m of the time t uses fold_in(fold_in(key(seed), minutes(t)), m), so a
sample depends only on (seed, time, member), not on batching or device count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jax_corrdiff.data.data_config import files_fingerprint
from jax_corrdiff.data.inference_inputs import InferenceInputs
from jax_corrdiff.data.sources import FieldSpec, expand_paths, open_dataset, time_str
from jax_corrdiff.inference.writer import EnsembleWriter
from jax_corrdiff.mesh import data_size, make_mesh, shard_batch, shard_keys

log = logging.getLogger("jax_corrdiff")


@dataclasses.dataclass(frozen=True)
class Batch:
    """Times ``start:stop`` of the inputs, to be sampled as one compiled call of ``size`` rows."""

    start: int
    stop: int
    size: int
    raw_inputs: np.ndarray  # (stop - start, H, W, C) interpolated inputs, physical units
    truth: np.ndarray | None  # (stop - start, H, W, C_out) when the inputs are coarsened truth
    times: np.ndarray  # (stop - start,)
    keys: jax.Array  # (size,) one key per time, sharded over the mesh's data axis
    mesh: Mesh

    def sharded(self, values: np.ndarray) -> jax.Array:
        """Per-time ``values`` (stop - start rows) padded to ``size`` rows (the last repeated, so
        every batch has one compiled shape) and sharded over the mesh's data axis."""
        return shard_batch(_padded(values, self.size), self.mesh)


# step(batch) -> (ensemble mean (size, H, W, C) or None = the members' mean, samples
# (size, M, H, W, C)), normalized units, sharded over the data axis.
BatchStep = Callable[[Batch], tuple[jax.Array | None, jax.Array]]
# baseline(batch) -> its fields (stop - start, H, W, C), physical units (numpy, on the host).
Baseline = Callable[[Batch], np.ndarray]


def write_ensembles(
    model: Any,
    inputs: InferenceInputs,
    output: str,
    sampler: Any,
    make_step: Callable[[Mesh], BatchStep],
    *,
    members: int,
    seed: int,
    batch_size: int = 0,
    num_devices: int = 0,
    tile_devices: int = 1,
    overwrite: bool = False,
    baselines: Mapping[str, Baseline] | None = None,
) -> str:
    """Sample every time of ``inputs`` not yet finished in ``output`` with the step that
    ``make_step(mesh)`` builds (under the model's matmul precision), and write the members,
    their mean, the inputs and the truth; returns ``output``.

    ``model`` is a ``CorrDiffModel`` or a ``PriorModel`` (its normalizer, grid, data config,
    conditioning, matmul precision and workdir are read); ``sampler`` is recorded in the run
    settings. ``batch_size`` is times per compiled call (0 = one per data-parallel device),
    ``tile_devices`` the devices sharing one image's tiles, ``overwrite`` starts ``output`` anew,
    ``baselines`` ({name: Baseline}, names of ``writer.BASELINE_COMMENTS``) are written beside.
    """
    baselines = dict(baselines or {})
    mesh, batch_size = _mesh_and_batch(model, num_devices, tile_devices, batch_size)
    writer = _open_writer(model, inputs, output, sampler, members, seed, overwrite, tuple(baselines))
    starts = _unfinished_batches(writer, len(inputs), batch_size)
    norm = model.normalizer
    with jax.default_matmul_precision(model.matmul_precision):
        step = make_step(mesh)
        t0 = time.time()
        for n, start in enumerate(starts):
            raw, truth = inputs.read(start, min(start + batch_size, len(inputs)))
            times = inputs.times[start : start + len(raw)]
            keys = shard_keys(_time_keys(seed, _padded(times, batch_size)), mesh)
            batch = Batch(start, start + len(raw), batch_size, raw, truth, times, keys, mesh)
            mean, samples = step(batch)
            samples = norm.denormalize_target(_gathered(samples, len(raw)))
            mean = samples.mean(axis=1) if mean is None else norm.denormalize_target(_gathered(mean, len(raw)))
            if writer is not None:
                writer.write(start, samples, mean, raw, truth, {name: fn(batch) for name, fn in baselines.items()})
            _log_batch(times, n, len(starts), t0)
    return output


def _gathered(array: jax.Array, rows: int) -> np.ndarray:
    return multihost_utils.process_allgather(array, tiled=True)[:rows]


def run_settings(
    model: Any, inputs: InferenceInputs, sampler: Any, members: int, seed: int, baselines: tuple[str, ...] = ()
) -> dict:
    """What defines a generation run, kept in its output so a rerun that differs is refused:
    the model (workdir, and its exported files' sizes and times), the input file (likewise, and
    whether it is coarsened truth), the sampler with all its settings, the seed and the members."""
    # A workdir's exported models (a regression-free DDPM or a ZSSD prior has fewer), or the
    # files of an Earth2Studio package directory.
    stage_dirs = [os.path.join(model.workdir, stage, "model") for stage in ("regression", "diffusion", "prior")]
    model_dirs = [path for path in stage_dirs if os.path.isdir(path)] or [model.workdir]
    return {
        "model": os.path.abspath(model.workdir),
        "model_files": files_fingerprint(model_dirs),
        "input": os.path.abspath(inputs.path),
        "input_files": files_fingerprint([inputs.path]),
        "coarsened_truth": inputs.has_truth,
        "sampler": type(sampler).__name__,
        **{f"sampler.{k}": v for k, v in dataclasses.asdict(sampler).items()},
        "seed": int(seed),
        "members": int(members),
        **({"baselines": list(baselines)} if baselines else {}),
    }


def variable_attrs(paths: list[str], channels: list[str]) -> dict[str, dict]:
    """units / long_name / standard_name of each target variable, from the first file that has it."""
    names = list(dict.fromkeys(FieldSpec.parse(c).name for c in channels))
    attrs: dict[str, dict] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open_dataset(path) as ds:
            for name in names:
                if name in ds and name not in attrs:
                    attrs[name] = {
                        k: str(ds[name].attrs[k])
                        for k in ("units", "long_name", "standard_name")
                        if k in ds[name].attrs
                    }
    return attrs


def _open_writer(
    model, inputs: InferenceInputs, output: str, sampler, members: int, seed: int, overwrite: bool, baselines
):
    """Process 0's output file, laid out for every time of ``inputs``: opened as it is when it
    exists (and holds a run with the same settings), or created anew (``overwrite`` removes it
    first). None on the other processes."""
    if jax.process_index() != 0:
        return None
    if overwrite and os.path.exists(output):
        shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
    norm = model.normalizer
    attr_paths = [inputs.path, *expand_paths(model.data_config["target_paths"], "target")]
    return EnsembleWriter(
        output,
        times=inputs.times,
        members=members,
        lat=model.lat,
        lon=model.lon,
        target_channels=list(norm.target_channels),
        input_channels=list(norm.input_channels),
        has_truth=inputs.has_truth,
        variable_attrs=variable_attrs(attr_paths, list(norm.target_channels)),
        init_times=inputs.init_times,
        global_attrs={
            "title": "CorrDiff downscaling ensemble",
            "source": f"jax_corrdiff, model {model.workdir}",
            "input": inputs.path,
            "sampler": repr(sampler),
            "seed": seed,
        },
        run_settings=run_settings(model, inputs, sampler, members, seed, baselines),
        baselines=baselines,
    )


def _mesh_and_batch(model, num_devices: int, tile_devices: int, batch_size: int):
    """The device mesh and the number of times per compiled call (0 = one per data-parallel device)."""
    if tile_devices > 1 and model.conditioning.patch is None:
        raise ValueError("tile_devices > 1 needs a patch-trained model (it splits multi-diffusion tiles)")
    mesh = make_mesh(num_devices, tile_devices)
    batch_size = batch_size or data_size(mesh)
    if batch_size % data_size(mesh):
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {data_size(mesh)} data-parallel devices")
    log.info("generate: %d times per batch on %d devices", batch_size, mesh.size)
    return mesh, batch_size


def _unfinished_batches(writer: EnsembleWriter | None, n_times: int, batch_size: int) -> list[int]:
    """Start rows of the batches not completely written yet, from process 0's writer."""
    done = multihost_utils.broadcast_one_to_all(writer.completed if writer else np.zeros(n_times, bool))
    log.info("generate: %d times, %d already written", n_times, int(done.sum()))
    return [s for s in range(0, n_times, batch_size) if not done[s : s + batch_size].all()]


def _time_keys(seed: int, times: np.ndarray) -> jax.Array:
    minutes = times.astype("datetime64[m]").astype(np.int64).astype(np.uint32)
    base = jax.random.key(seed)
    return jax.vmap(lambda m: jax.random.fold_in(base, m))(jnp.asarray(minutes))


def _padded(values: np.ndarray, size: int) -> np.ndarray:
    """Repeat the last row up to ``size`` rows, so every batch has one compiled shape."""
    return np.concatenate([values, np.repeat(values[-1:], size - len(values), axis=0)])


def _log_batch(times: np.ndarray, n: int, batches: int, t0: float) -> None:
    per_batch = (time.time() - t0) / (n + 1)
    eta = time.strftime("%H:%M:%S", time.gmtime(per_batch * (batches - n - 1)))
    first, last = time_str(times[0]), time_str(times[-1])
    log.info(
        "generate: %s..%s done (%d/%d batches) | %.1f s/batch | ETA %s", first, last, n + 1, batches, per_batch, eta
    )
