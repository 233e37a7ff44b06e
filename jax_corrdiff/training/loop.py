"""The training loop: both CorrDiff stages, resumable, with progress and TensorBoard."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

from jax_corrdiff.mesh import local_batch_size, make_mesh, replicated
from jax_corrdiff.model_dir import load_model, save_model
from jax_corrdiff.models.factory import build_model, example_inputs
from jax_corrdiff.training import data_setup
from jax_corrdiff.training.checkpointing import TrainingCheckpoints
from jax_corrdiff.training.optimizer import make_optimizer
from jax_corrdiff.training.steps import (
    TrainState,
    diffusion_per_sample_loss,
    init_train_state,
    make_eval_step,
    make_train_step,
    regression_per_sample_loss,
)

MODEL_DIR = "model"
log = logging.getLogger("jax_corrdiff")


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def model_config_for_stage(config, stage: str, data: data_setup.TrainingData) -> dict:
    """The network config of a stage, with shapes and channels taken from the data."""
    model = config[stage].model
    common = dict(
        img_resolution=list(data.grid_shape),
        out_channels=len(data.target_channels),
        compute_dtype=model.compute_dtype,
        unet=model.unet.to_dict(),
    )
    if stage == "regression":
        pairs = data.residual_pairs() if model.global_residual else []
        return dict(kind="regression", cond_channels=len(data.condition_channels), global_residual=pairs, **common)
    hr_mean = len(data.target_channels) if model.hr_mean_conditioning else 0
    # Patches also see the whole coarse input resized to the patch (global context).
    context = len(data.condition_channels) if config.diffusion.patch.height else 0
    return dict(
        kind="diffusion",
        cond_channels=hr_mean + len(data.condition_channels) + context,
        sigma_data=model.sigma_data,
        **common,
    )


class _Progress:
    """Terminal progress (step, samples/s, loss, ETA), TensorBoard scalars and a
    ``metrics.jsonl`` history (one JSON object per logged step), on process 0."""

    def __init__(self, stage: str, directory: str, start: int, total: int, global_batch: int):
        self.stage, self.start, self.total, self.batch = stage, start, total, global_batch
        self.t0 = self.t_last = time.time()
        self.step_last = start
        self.writer = self.history = None
        if jax.process_index() == 0:
            self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))
            self.history = open(os.path.join(directory, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{self.stage}/{name}", value, step)
            self.writer.flush()
            self.history.write(json.dumps({"step": step, **values}) + "\n")
            self.history.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        rate = (step - self.step_last) * self.batch / max(now - self.t_last, 1e-9)
        elapsed_steps = step - self.start
        eta = (now - self.t0) / max(elapsed_steps, 1) * (self.total - step)
        self.t_last, self.step_last = now, step
        log.info(
            "%s step %d/%d | %.1f samples/s | loss %.5f | grad norm %.3g | lr %.3g | ETA %s",
            self.stage,
            step,
            self.total,
            rate,
            metrics["loss"],
            metrics["grad_norm"],
            metrics["learning_rate"],
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
        if metrics["nonfinite_grads"]:
            log.warning(
                "%s step %d: %d non-finite gradient entries were zeroed", self.stage, step, metrics["nonfinite_grads"]
            )
        self.scalars(step, {**metrics, "samples_per_second": rate})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.history.close()


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _frozen_regression(config, workdir: str, mesh):
    """The trained regression network the diffusion stage conditions on (replicated)."""
    path = config.diffusion.regression_model or os.path.join(stage_dir(workdir, "regression"), MODEL_DIR)
    model_config, variables, _ = load_model(path)
    return build_model(model_config), jax.device_put(variables, replicated(mesh))


def train_stage(config, stage: str, workdir: str, data: data_setup.TrainingData) -> str:
    """Train one stage to ``training.total_samples`` (resuming if checkpoints exist) and
    export its EMA weights as a model directory; returns that directory."""
    training = config[stage].training
    directory = stage_dir(workdir, stage)
    mesh = make_mesh(config.num_devices)
    global_batch = int(training.batch_size)
    total_steps = int(training.total_samples) // global_batch
    model_config = model_config_for_stage(config, stage, data)
    model = build_model(model_config)
    optimizer = make_optimizer(training, global_batch)

    if stage == "regression":
        loss_fn, frozen = regression_per_sample_loss(model), {}
    else:
        regression_model, frozen = _frozen_regression(config, workdir, mesh)
        loss_fn = diffusion_per_sample_loss(
            model,
            regression_model,
            p_mean=config.diffusion.loss.p_mean,
            p_std=config.diffusion.loss.p_std,
            sigma_data=config.diffusion.model.sigma_data,
            hr_mean_conditioning=config.diffusion.model.hr_mean_conditioning,
            patch=config.diffusion.patch.to_dict(),
        )

    train_iter = data.train_iterator(local_batch_size(global_batch, mesh), seed=config.seed)
    args, kwargs = example_inputs(model_config)
    state = init_train_state(model, args, kwargs, optimizer, jax.random.key(config.seed), mesh)
    checkpoints = TrainingCheckpoints(os.path.join(directory, "checkpoints"), training.keep_checkpoints)
    meta = {"config": json.loads(config.to_json()), "model_config": model_config, "normalization": data.normalization}
    start = checkpoints.latest_step() or 0
    if start:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, saved_meta = checkpoints.restore(start, abstract, train_iter)
        if saved_meta["model_config"] != model_config:
            raise ValueError(f"{directory}: checkpoint was trained with a different model config; use a new workdir")
        log.info("%s: resumed from step %d", stage, start)

    train_step = make_train_step(loss_fn, optimizer, training, global_batch, config.seed, mesh)
    eval_step = make_eval_step(loss_fn, config.seed, mesh)
    progress = _Progress(stage, directory, start, total_steps, global_batch)
    log.info(
        "%s: %d parameters, steps %d -> %d, global batch %d on %d devices",
        stage,
        sum(p.size for p in jax.tree_util.tree_leaves(state.params)),
        start,
        total_steps,
        global_batch,
        mesh.size,
    )

    def validate(step: int) -> None:
        """Validation loss of the raw and EMA weights on fixed noise (comparable across steps)."""
        losses = {
            name: data.validation_loss(
                eval_step,
                params,
                state.constants,
                frozen,
                mesh,
                local_batch_size(global_batch, mesh),
                training.eval_batches,
            )
            for name, params in (("valid_loss", state.params), ("valid_loss_ema", state.ema_params))
        }
        log.info(
            "%s step %d | validation loss %.5f (EMA %.5f)", stage, step, losses["valid_loss"], losses["valid_loss_ema"]
        )
        progress.scalars(step, losses)

    if start == 0:
        validate(0)  # the untrained baseline every later validation loss is read against
    pending: list[dict] = []
    for step in range(start, total_steps):
        state, metrics = train_step(state, data.next_train_batch(train_iter, mesh), frozen)
        pending.append(metrics)
        done = step + 1
        if done % training.log_every_steps == 0 or done == total_steps:
            progress.log(done, _mean_metrics(pending))
            pending = []
        if done % training.eval_every_steps == 0 or done == total_steps:
            validate(done)
        if done % training.checkpoint_every_steps == 0 or done == total_steps:
            checkpoints.save(done, state, train_iter, meta)
    checkpoints.close()
    progress.close()
    extra = {}
    if stage == "diffusion":
        extra = {
            "hr_mean_conditioning": bool(config.diffusion.model.hr_mean_conditioning),
            "patch": config.diffusion.patch.to_dict(),
        }
    return _export(directory, model_config, state, data, stage, extra)


def _export(directory: str, model_config: dict, state: TrainState, data, stage: str, extra: dict) -> str:
    """Write the EMA weights as a model directory (replacing an earlier export)."""
    path = os.path.join(directory, MODEL_DIR)
    if jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)
    variables = {"params": state.ema_params, **state.constants}
    source = {
        "format": "jax_corrdiff",
        "stage": stage,
        "step": int(state.step),
        "data": data.data_config,
        "normalization": data.normalization,
        "channels": data.channel_metadata(),
        **extra,
    }
    save_model(path, model_config, jax.device_get(variables), source, grid=data.grid)
    return path


def train_and_evaluate(config, workdir: str) -> dict[str, str]:
    """Run ``config.stage`` ("regression", "diffusion" or "all"); returns the exported model dirs."""
    jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    data = data_setup.TrainingData.open(config, workdir)
    stages = ("regression", "diffusion") if config.stage == "all" else (config.stage,)
    return {stage: train_stage(config, stage, workdir, data) for stage in stages}
