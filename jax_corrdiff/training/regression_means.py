"""The diffusion stage's regression means, computed once per sample and kept beside the run.

The diffusion stage learns r = y - mu(img_lr) (CorrDiff, Mardani et al. 2023, eq. 3), mu being
the frozen regression network or its cross-fitted fold models (``training.cross_fit``). mu does
not change while the diffusion stage trains, so each sample's mean is computed here once and
read with the sample (``diffusion.residual_mean.PrecomputedMean``) instead of at every step that
draws it: a run that draws S samples from a period of N computes N regression forwards instead
of S (K N instead of K S under K-fold cross-fitting), and the step no longer holds the regression
weights. The full-width Taiwan diffusion step takes 0.77x the time without its regression forward
on a CPU (benchmarks/README.md).

Layout of WORKDIR/diffusion/regression_means/:
    means.npy   float32 (samples of the prepared store, H, W, C_out): row t is the mean of the
                store's sample t, in normalized target units
    key.json    what they were computed from (``means_key``); a different key recomputes them

Each process computes the means of its share of the samples on its own devices and writes those
rows into one file (the work directory is shared, as the prepared store is). The means are
written to partial.means.npy and renamed, and key.json is written last, so a crash leaves
nothing that a later run would take for complete. The cost is one target-sized float32 array per
sample on disk (Taiwan, 448 x 448 x 4 channels: 3.2 MB an hour); ``diffusion.precompute_mean =
False`` computes the mean in every step instead. The key does not cover the package's source:
delete the directory to recompute after changing the regression network's code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from jax.sharding import Mesh

from jax_corrdiff import executable_cache
from jax_corrdiff.compiler_options import network_evaluation_options
from jax_corrdiff.data.pipeline import make_eval_iterator
from jax_corrdiff.diffusion.residual_mean import batch_mean
from jax_corrdiff.distributed import barrier
from jax_corrdiff.mesh import DATA_AXIS, batch_sharded, replicated
from jax_corrdiff.training.data_setup import TrainingData

log = logging.getLogger("jax_corrdiff")

MEANS_DIR = "regression_means"
MEANS_FILE = "means.npy"
KEY_FILE = "key.json"
_INPUT_KEYS = ("img_lr", "lead_time_label", "fold")  # what a mean is computed from
_LOG_EVERY_S = 30.0


def _digest(arrays) -> str:
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(arrays):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def means_key(mean_model, variables, data: TrainingData, matmul_precision: str) -> dict | None:
    """What the means of ``data`` under ``mean_model`` (with host ``variables``) depend on: the
    model's repr (a Flax module's lists its whole definition), a digest of its variables, the
    prepared store, the normalization, the samples' folds and the matmul precision. None when
    the model cannot be described (``executable_cache.describe_objects``)."""
    networks = executable_cache.describe_objects(mean_model)
    if networks is None:
        return None
    folds = [s.folds for s in (data.train_source, data.valid_source) if s.folds is not None]
    key = {
        "networks": networks,
        "variables": _digest(variables),
        "store": data.train_source.store_identity,
        "normalization": data.normalizer.to_dict(),
        "folds": _digest(folds) if folds else None,
        "matmul_precision": matmul_precision,
    }
    return json.loads(json.dumps(key))  # as key.json reads back (tuples become lists)


def stored_means(directory: str, key: dict | None) -> str | None:
    """The means file in DIRECTORY/regression_means (DIRECTORY: WORKDIR/diffusion) when its
    key.json equals ``key`` (``means_key``) and it is complete, else None."""
    out = os.path.join(directory, MEANS_DIR)
    try:
        with open(os.path.join(out, KEY_FILE)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    path = os.path.join(out, MEANS_FILE)
    return path if key is not None and stored == key and os.path.exists(path) else None


def mean_forward(mean_model, mesh: Mesh):
    """jit(variables, inputs) -> ``batch_mean`` of ``inputs`` (``img_lr``, optional
    ``lead_time_label`` and ``fold``), variables replicated and the batch split over ``mesh``,
    compiled as generation's network evaluations are (``network_evaluation_options``)."""
    return jax.jit(
        lambda variables, inputs: batch_mean(mean_model, variables, inputs),
        in_shardings=(replicated(mesh), batch_sharded(mesh)),
        out_shardings=batch_sharded(mesh),
        compiler_options=network_evaluation_options(),
    )


def local_mean_fn(mean_model, variables):
    """batch -> ``batch_mean`` of the batch's inputs (``img_lr``, optional ``lead_time_label``
    and ``fold``) under ``mean_model`` with host ``variables``, on this process's devices alone:
    each process computes its own samples' means, with no collective between processes. Batches
    hold a multiple of the local device count."""
    mesh = Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))
    forward = mean_forward(mean_model, mesh)
    variables = jax.device_put(variables, replicated(mesh))
    return lambda batch: forward(variables, {k: v for k, v in batch.items() if k in _INPUT_KEYS})


def compute_means(
    path: str,
    mean_model,
    variables,
    data: TrainingData,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> int:
    """Write into the existing float32 (store samples, H, W, C_out) .npy file ``path`` the mean
    (``batch_mean``) of process ``process_index``'s share of both splits' samples, ``batch_size``
    (a multiple of the local device count) at a time, on this process's devices. Returns how
    many means it wrote; logs progress and the time left."""
    mean_of = local_mean_fn(mean_model, variables)
    means = np.load(path, mmap_mode="r+")
    sources = (data.train_source, data.valid_source)
    total = sum(len(range(process_index, len(s), process_count)) for s in sources)
    written, start, last_log = 0, time.monotonic(), time.monotonic()
    for source in sources:
        if not len(source):
            continue
        batches = make_eval_iterator(
            source.without_target(), batch_size=batch_size, process_index=process_index, process_count=process_count
        )
        for batch in batches:
            keep = batch["mask"]
            means[batch["time_index"][keep]] = np.asarray(mean_of(batch))[keep]
            written += int(keep.sum())
            if time.monotonic() - last_log > _LOG_EVERY_S:
                last_log = time.monotonic()
                rate = written / (last_log - start)
                log.info(
                    "regression means: %d/%d samples, %.2f samples/s, %.0f s left",
                    written,
                    total,
                    rate,
                    (total - written) / rate,
                )
    means.flush()
    log.info("regression means: %d samples in %.1f s", written, time.monotonic() - start)
    return written


def with_regression_means(
    data: TrainingData, mean_model, variables, directory: str, batch_size: int, matmul_precision: str
) -> TrainingData:
    """``data`` with every sample carrying its mean under ``mean_model`` (host ``variables``),
    read from DIRECTORY/regression_means: computed there first unless a run stored them from
    the same model, variables, data and precision (``means_key``).

    Args:
        data: the training data (both splits get their means).
        mean_model: the regression network or ``CrossFitMean``.
        variables: its variables, as host arrays.
        directory: where the means live (WORKDIR/diffusion).
        batch_size: samples per forward on this process (a multiple of its device count).
        matmul_precision: the precision in force (part of the key).
    """
    out = os.path.join(directory, MEANS_DIR)
    means_path = os.path.join(out, MEANS_FILE)
    key = means_key(mean_model, variables, data, matmul_precision)
    stored = stored_means(directory, key)
    if stored is not None:
        log.info("regression means: reusing %s", stored)
        return data.with_regression_means(stored)
    source = data.train_source
    shape = (source.store_length, *source.shape, len(source.target_channels))
    partial = os.path.join(out, "partial." + MEANS_FILE)  # np.load needs the .npy suffix
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        for stale in (KEY_FILE, MEANS_FILE):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
        size = int(np.prod(shape)) * 4
        free = shutil.disk_usage(out).free
        if size > free:
            raise OSError(
                f"regression means of {shape[0]} samples need {size / 2**30:.1f} GiB in {out}, "
                f"{free / 2**30:.1f} GiB free (diffusion.precompute_mean=False computes them in every step)"
            )
        log.info("regression means: computing %s float32 (%.2f GiB) into %s", shape, size / 2**30, out)
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
    barrier("regression means allocated")
    compute_means(partial, mean_model, variables, data, batch_size, jax.process_index(), jax.process_count())
    barrier("regression means computed")
    if jax.process_index() == 0:
        os.replace(partial, means_path)
        if key is not None:
            executable_cache.write_atomically(os.path.join(out, KEY_FILE), json.dumps(key, indent=1).encode())
    barrier("regression means stored")
    return data.with_regression_means(means_path)
