"""Training both CorrDiff stages: resumable, with validation, progress and export.

``train_stage`` composes five pieces that can also be called alone:
    build_stage (training.stage) -> compile_train_step -> restore (or init_state) -> run -> export
and runs them at the config's matmul precision. The step is compiled from the shapes of the
state and batches before the state exists, or loaded from the executable cache without tracing
it (``executable_cache``), and a resumed run reads its checkpoint into the shapes the compiled
step takes without initialising.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np

from jax_corrdiff import executable_cache
from jax_corrdiff.compilation_cache import cache_dir, enable_compilation_cache
from jax_corrdiff.config import check_training_config
from jax_corrdiff.host_memory import release_freed_memory
from jax_corrdiff.mesh import batch_sharded, local_batch_size, to_global
from jax_corrdiff.model_dir import SavedModel, save_model
from jax_corrdiff.models.factory import example_inputs
from jax_corrdiff.training.checkpointing import TrainingCheckpoints
from jax_corrdiff.training.cross_fit import CrossFit
from jax_corrdiff.training.data_setup import TrainingData, step_batch
from jax_corrdiff.training.progress import Progress
from jax_corrdiff.training.stage import MODEL_DIR, Stage, build_stage
from jax_corrdiff.training.steps import (
    TrainState,
    init_train_state,
    make_eval_step,
    make_train_step,
    train_state_shapes,
)

log = logging.getLogger("jax_corrdiff")


def _initialised(stage: Stage) -> TrainState:
    args, kwargs = example_inputs(stage.model_config)
    key = jax.random.key(stage.seed)
    return init_train_state(stage.model, args, kwargs, stage.optimizer, key, stage.mesh)


def init_state(stage: Stage) -> TrainState:
    """A fresh train state (step 0), replicated on the stage's mesh.

    Initialising compiles and runs a program of its own; once the state exists, the memory that
    took goes back to the system (``release_freed_memory``), or the training step's temporaries
    are mapped on top of it: 0.27 GB more resident memory in the full-width Taiwan regression
    step on a CPU."""
    state = jax.block_until_ready(_initialised(stage))
    release_freed_memory()
    return state


def state_shapes(stage: Stage) -> TrainState:
    """``init_state``'s shapes, dtypes and shardings, computing nothing (``train_state_shapes``)."""
    return train_state_shapes(lambda: _initialised(stage), stage.mesh)


def batch_shapes(stage: Stage) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes, dtypes and sharding of the global batches the step takes: the pipeline stacks
    ``global_batch`` samples shaped like the stage's first training sample (``step_batch`` entries)."""
    sharding = batch_sharded(stage.mesh)
    return {
        key: jax.ShapeDtypeStruct(
            (stage.global_batch, *np.shape(value)),
            jax.dtypes.canonicalize_dtype(np.asarray(value).dtype),
            sharding=sharding,
        )
        for key, value in step_batch(stage.data.train_source[0]).items()
    }


def lower_train_step(stage: Stage, batch: dict[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
    """The stage's training step traced and lowered for the state's shapes (``state_shapes``)
    and ``batch`` (``batch_shapes``)."""
    step = make_train_step(stage.loss_fn, stage.optimizer, stage.training, stage.global_batch, stage.seed, stage.mesh)
    return step.lower(state_shapes(stage), batch, stage.frozen)


def compile_train_step(stage: Stage, batch: dict[str, jax.ShapeDtypeStruct], executables: str | None):
    """The stage's training step (``lower_train_step``): loaded from the executable cache in
    directory ``executables`` when a run compiled it before, else compiled before the state
    exists (``compile_then_release``: the jit object is built there and dropped with its traces)
    and added to the cache (None: no cache). ``train_state_shapes_of`` gives the state's shapes."""
    description = stage.description and {
        "program": "train_step",
        **stage.description,
        "batch": executable_cache.describe_arguments(batch),
        "frozen": executable_cache.describe_arguments(stage.frozen),
    }
    return executable_cache.load_or_compile(
        executables, description, stage.mesh, lambda: lower_train_step(stage, batch)
    )


def train_state_shapes_of(train_step) -> TrainState:
    """The shapes, dtypes and shardings of the state a compiled training step takes."""
    return executable_cache.argument_shapes(train_step)[0]


def restore(stage: Stage, shapes: TrainState, checkpoints: TrainingCheckpoints, iterator) -> tuple[TrainState, int]:
    """The latest checkpoint's state and step, the data iterator moved to the checkpoint's
    position in place; a fresh state (``init_state``) and 0 when there is none. A resumed run
    never initialises: the checkpoint is read into ``shapes`` (``train_state_shapes_of`` the
    compiled step, or ``state_shapes(stage)``)."""
    start = checkpoints.latest_step() or 0
    if not start:
        return init_state(stage), 0
    state, meta = checkpoints.restore(start, shapes, iterator)
    if meta["model_config"] != stage.model_config:
        raise ValueError(f"{stage.directory}: checkpoint was trained with a different model config; use a new workdir")
    log.info("%s: resumed from step %d", stage.name, start)
    return state, start


def validation_losses(stage: Stage, eval_step, state: TrainState) -> dict[str, float]:
    """Mean per-sample loss of the raw and the EMA weights over the first ``eval_batches``
    validation batches, on fixed noise (so successive values are comparable)."""
    losses = {}
    for name, params in (("valid_loss", state.params), ("valid_loss_ema", state.ema_params)):
        batches = stage.data.valid_iterator(local_batch_size(stage.global_batch, stage.mesh))
        total, count = 0.0, 0.0
        for _, batch in zip(range(stage.training.eval_batches), batches):
            loss_sum, n = eval_step(params, state.constants, to_global(step_batch(batch), stage.mesh), stage.frozen)
            total, count = total + loss_sum, count + n
        losses[name] = float(np.asarray(total) / max(float(np.asarray(count)), 1.0))
    return losses


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def run(
    stage: Stage,
    train_step,
    state: TrainState,
    start: int,
    iterator,
    checkpoints: TrainingCheckpoints,
    meta,
) -> TrainState:
    """Train from step ``start`` to ``stage.total_steps`` with ``train_step`` (``compile_train_step``'s):
    log, validate (also at step 0, the untrained baseline) and checkpoint (with ``meta``) at the
    configured intervals."""
    training, mesh = stage.training, stage.mesh
    eval_step = make_eval_step(stage.loss_fn, stage.seed, mesh)
    progress = Progress(stage.name, stage.directory, start, stage.total_steps, stage.global_batch)
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(state.params))
    log.info(
        "%s: %d parameters, steps %d -> %d, global batch %d on %d devices",
        stage.name,
        n_params,
        start,
        stage.total_steps,
        stage.global_batch,
        mesh.size,
    )

    def validate(step: int) -> None:
        losses = validation_losses(stage, eval_step, state)
        log.info("%s step %d | validation loss %.5f (EMA %.5f)", stage.name, step, *losses.values())
        progress.scalars(step, losses)

    if start == 0:
        validate(0)
    pending: list[dict] = []
    for done in range(start + 1, stage.total_steps + 1):
        batch = to_global(step_batch(next(iterator)), mesh)
        state, metrics = train_step(state, batch, stage.frozen)
        pending.append(metrics)
        last = done == stage.total_steps
        if done % training.log_every_steps == 0 or last:
            progress.log(done, _mean_metrics(pending))
            pending = []
        if done % training.eval_every_steps == 0 or last:
            validate(done)
        if done % training.checkpoint_every_steps == 0 or last:
            checkpoints.save(done, state, iterator, meta)
    progress.close()
    return state


def export(stage: Stage, state: TrainState) -> str:
    """Write the EMA weights as WORKDIR/<stage>/model (replacing an earlier export) with the
    model config, conditioning layout, matmul precision, grid and data description."""
    path, data = os.path.join(stage.directory, MODEL_DIR), stage.data
    if jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)
    source = {
        "format": "jax_corrdiff",
        "stage": stage.name,
        "step": int(state.step),
        "data": data.data_config,
        "normalization": data.normalizer.to_dict(),
        **stage.export_source,
    }
    variables = jax.device_get({"params": state.ema_params, **state.constants})
    saved = SavedModel(stage.model_config, variables, stage.matmul_precision, stage.layout, source, data.grid)
    save_model(path, saved)
    return path


def train_stage(config, stage: str, workdir: str, data: TrainingData, fold: int | None = None) -> str:
    """Train one stage to ``training.total_samples`` (resuming from the latest checkpoint) and
    export its EMA weights, all at ``config.matmul_precision``.

    Args:
        config: the run config.
        stage: "regression", "diffusion" or "prior".
        workdir: the run's work directory (the stage writes WORKDIR/<stage>).
        data: the opened training data.
        fold: a cross-fitting fold model of the regression stage to train instead (``data``
            without that fold's samples).

    Returns:
        The exported model directory.
    """
    with jax.default_matmul_precision(config.matmul_precision):
        built = build_stage(config, stage, workdir, data, fold)
        iterator = built.data.train_iterator(local_batch_size(built.global_batch, built.mesh), seed=built.seed)
        checkpoints = TrainingCheckpoints(os.path.join(built.directory, "checkpoints"), built.training.keep_checkpoints)
        meta = {
            "config": json.loads(config.to_json()),
            "model_config": built.model_config,
            "normalization": data.normalizer.to_dict(),
        }
        train_step = compile_train_step(built, batch_shapes(built), executable_cache.directory())
        state, start = restore(built, train_state_shapes_of(train_step), checkpoints, iterator)
        state = run(built, train_step, state, start, iterator, checkpoints, meta)
        checkpoints.close()
        return export(built, state)


def train_and_evaluate(config, workdir: str) -> dict[str, str]:
    """Prepare the data, then train ``config.stage``: "regression", "diffusion", "all" (both, in
    order) or "prior" (the ZSSD prior, alone). With ``diffusion.cross_fit`` on, the regression
    stage also trains its fold models (``training.cross_fit``), exported as regression_fold<k>.

    Args:
        config: the run config (``jax_corrdiff.config.base_config`` and a file of ``configs/``).
        workdir: the run's work directory; rerunning with the same one resumes.

    Returns:
        {stage: exported model directory}.
    """
    stages = check_training_config(config)
    enable_compilation_cache(cache_dir(config.compilation_cache_dir, workdir))
    data = TrainingData.open(config, workdir)
    cross_fit = CrossFit.from_config(config)
    exported = {}
    for stage in stages:
        exported[stage] = train_stage(config, stage, workdir, data)
        if stage == "regression" and cross_fit is not None:
            for fold in range(cross_fit.folds):
                exported[f"regression_fold{fold}"] = train_stage(config, stage, workdir, data.without_fold(fold), fold)
    return exported
