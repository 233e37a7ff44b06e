"""A training stage built from the run config and the data: its conditioning, network and loss.

``build_stage`` makes everything a stage trains with (for the diffusion stage, the regression
means of its samples, computed once: ``training.regression_means``) and trains nothing;
``training.loop`` initialises or restores the state, runs the steps and exports the model
directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from jax_corrdiff import executable_cache
from jax_corrdiff.diffusion.conditioning import ConditioningLayout, PatchSettings
from jax_corrdiff.diffusion.ddpm import alpha_bar
from jax_corrdiff.diffusion.residual_mean import RESIDUAL_MEANS, InterpolationMean, PrecomputedMean
from jax_corrdiff.mesh import local_batch_size, make_mesh, replicated
from jax_corrdiff.model_dir import load_model
from jax_corrdiff.models.factory import build_model
from jax_corrdiff.training.cross_fit import CrossFit, fold_directory, fold_mean, load_fold_models
from jax_corrdiff.training.data_setup import TrainingData
from jax_corrdiff.training.optimizer import make_optimizer
from jax_corrdiff.training.regression_means import with_regression_means
from jax_corrdiff.training.steps import (
    PerSampleLoss,
    ddpm_per_sample_loss,
    diffusion_per_sample_loss,
    prior_per_sample_loss,
    regression_per_sample_loss,
)

MODEL_DIR = "model"  # WORKDIR/<stage>/model: the exported model directory


def conditioning_layout(config, stage: str, data: TrainingData) -> ConditioningLayout:
    """What the ``stage`` network is conditioned on: the data's channels and lead times, and for
    the diffusion stage the regression mean and patch settings of ``config.diffusion``. The ZSSD
    prior takes the static fields and cyclic time only (no coarse input)."""
    norm, unet = data.normalizer, config[stage].model.unet
    if stage == "prior":
        if unet.lead_time_channels:
            raise ValueError("prior.model.unet.lead_time_channels must be 0: the prior takes no forecast inputs")
        return ConditioningLayout(norm.target_channels, (), norm.static_channels, cyclic_time=True)
    if unet.lead_time_channels and not data.lead_time_steps:
        raise ValueError(f"{stage}.model.unet.lead_time_channels > 0 needs forecast inputs (data.lead_times)")
    common = dict(
        target_channels=norm.target_channels,
        input_channels=norm.input_channels,
        static_channels=norm.static_channels,
        lead_time_steps=data.lead_time_steps if unet.lead_time_channels else 0,
    )
    if stage == "regression":
        return ConditioningLayout(**common)
    patch = config.diffusion.patch
    # The interpolated coarse input is already part of img_lr: conditioning on it again as the
    # "mean" would only repeat channels.
    return ConditioningLayout(
        **common,
        regression_mean=bool(config.diffusion.model.hr_mean_conditioning) and config.diffusion.mean == "regression",
        patch=PatchSettings(**patch.to_dict()) if patch.height else None,
    )


def model_config(config, stage: str, layout: ConditioningLayout, grid_shape: tuple[int, int]) -> dict:
    """The network config of ``stage`` (``models.build_model``): widths from the run config;
    shape, channels and lead-time steps from the data through ``layout``."""
    model = config[stage].model
    common = dict(
        kind="diffusion" if stage == "prior" else stage,
        img_resolution=list(grid_shape),
        out_channels=len(layout.target_channels),
        cond_channels=layout.cond_channels,
        compute_dtype=model.compute_dtype,
        unet=dict(model.unet.to_dict(), lead_time_steps=layout.lead_time_steps),
    )
    if stage == "regression":
        return dict(common, global_residual=layout.residual_pairs() if model.global_residual else [])
    if config.diffusion.parameterization == "ddpm":
        ddpm = config.diffusion.ddpm
        return dict(common, kind="ddpm", schedule=ddpm.schedule, num_timesteps=int(ddpm.num_timesteps))
    return dict(common, sigma_data=model.sigma_data)


@dataclasses.dataclass
class Stage:
    """Everything one stage trains with (nothing trained yet)."""

    name: str
    directory: str  # WORKDIR/<name>: checkpoints/, model/, tensorboard/, metrics.jsonl
    data: TrainingData  # what it trains on: ``build_stage``'s data, with the diffusion stage's regression means
    training: Any  # config[name].training
    seed: int
    matmul_precision: str
    mesh: Mesh
    layout: ConditioningLayout
    model_config: dict
    model: Any
    loss_fn: PerSampleLoss
    frozen: Any  # variables that are inputs but not trained: the regression network the diffusion step runs
    optimizer: optax.GradientTransformation
    # What the training step is traced from besides the source and its arguments' shapes: the
    # compiled step's cache key (``executable_cache``; None: not cached). What ``build_stage``
    # reads must be here.
    description: dict | None
    # Written into the exported model's provenance ("source"): the diffusion stage's residual_mean.
    export_source: dict = dataclasses.field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return int(self.training.batch_size)

    @property
    def total_steps(self) -> int:
        return int(self.training.total_samples) // self.global_batch


def _frozen_regression(config, workdir: str, layout: ConditioningLayout, data) -> tuple[Any, Any]:
    """The residual's mean (``diffusion.mean``): the trained regression network the diffusion
    stage conditions on, its cross-fitted fold models (variables stacked, ``diffusion.cross_fit``),
    or the interpolated coarse input (no variables); variables as host arrays."""
    if config.diffusion.mean not in RESIDUAL_MEANS:
        raise ValueError(f"diffusion.mean must be one of {RESIDUAL_MEANS}, got {config.diffusion.mean!r}")
    if config.diffusion.mean == "interpolation":
        return InterpolationMean.from_data(layout, data.normalizer), {}
    cross_fit = CrossFit.from_config(config)
    if cross_fit is None:
        path = config.diffusion.regression_model or os.path.join(workdir, "regression", MODEL_DIR)
        saved = load_model(path)
        _check_conditioning(saved, path, layout)
        return build_model(saved.config), saved.variables
    folds = load_fold_models(workdir)
    if len(folds) != cross_fit.folds:
        raise ValueError(f"{workdir}: {len(folds)} regression fold models, diffusion.cross_fit.folds={cross_fit.folds}")
    for k, fold in enumerate(folds):
        _check_conditioning(fold, fold_directory(workdir, k), layout)
    return fold_mean(folds)


def _check_conditioning(saved, path: str, layout: ConditioningLayout) -> None:
    if saved.conditioning is not None and saved.conditioning.img_lr_channels != layout.img_lr_channels:
        raise ValueError(
            f"{path} takes img_lr channels {list(saved.conditioning.img_lr_channels)}, "
            f"the data gives {list(layout.img_lr_channels)}"
        )


def build_stage(config, stage: str, workdir: str, data: TrainingData, fold: int | None = None) -> Stage:
    """Build the ``stage`` ("regression", "diffusion" or "prior") of ``config`` on ``data``.

    Args:
        config: the run config.
        stage: which stage.
        workdir: the run's work directory; the stage writes to WORKDIR/<stage>, and the diffusion
            stage reads the regression model of ``config.diffusion.regression_model`` (default
            WORKDIR/regression/model).
        data: the opened training data.
        fold: for the regression stage, the cross-fitting fold model to build (``data`` already
            without that fold): it is named regression_fold<k> and writes to
            ``cross_fit.fold_directory``.
    """
    mesh = make_mesh(config.num_devices)
    directory = os.path.join(workdir, stage) if fold is None else fold_directory(workdir, fold)
    training = config[stage].training
    layout = conditioning_layout(config, stage, data)
    net_config = model_config(config, stage, layout, data.grid[0].shape)
    model = build_model(net_config)
    regression = None  # the residual's mean, for the diffusion stage
    if stage == "regression":
        loss_fn, frozen = regression_per_sample_loss(model), {}
    elif stage == "prior":
        loss = config.prior.loss
        static = slice(len(data.normalizer.input_channels), None)  # img_lr = [coarse input | static]
        loss_fn = prior_per_sample_loss(
            model, layout, static, p_mean=loss.p_mean, p_std=loss.p_std, sigma_data=config.prior.model.sigma_data
        )
        frozen = {}
    else:
        regression, frozen = _frozen_regression(config, workdir, layout, data)
        if config.diffusion.precompute_mean and config.diffusion.mean == "regression":
            batch = local_batch_size(int(training.batch_size), mesh)
            data = with_regression_means(data, regression, frozen, directory, batch, config.matmul_precision)
            regression, frozen = PrecomputedMean(), {}
        frozen = jax.device_put(frozen, replicated(mesh))
        loss_fn = _diffusion_loss(config, model, regression, layout)
    if fold is not None and stage != "regression":
        raise ValueError(f"only the regression stage has cross-fitting folds, not {stage!r}")
    return Stage(
        name=stage if fold is None else f"regression_fold{fold}",
        directory=directory,
        data=data,
        training=training,
        seed=int(config.seed),
        matmul_precision=config.matmul_precision,
        mesh=mesh,
        layout=layout,
        model_config=net_config,
        model=model,
        loss_fn=loss_fn,
        frozen=frozen,
        optimizer=make_optimizer(training, int(training.batch_size)),
        export_source=_export_source(config, stage, fold),
        description=_step_description(config, stage, data, executable_cache.describe_objects(model, regression)),
    )


def _step_description(config, stage: str, data: TrainingData, networks: list[str] | None) -> dict | None:
    """``Stage.description``: none where the networks the loss closes over cannot be described."""
    if networks is None:
        return None
    return {
        "config": step_config(config),
        "stage": stage,
        "normalization": data.normalizer.to_dict(),
        "grid": list(data.grid[0].shape),
        "lead_time_steps": data.lead_time_steps,
        "networks": networks,
    }


# Training settings only the loop reads (how long, how often to log, validate and checkpoint),
# and which stages run and where the compilation cache lives: a run extended or resumed with
# other values of these trains with the same step.
_LOOP_ONLY = (
    "total_samples",
    "log_every_steps",
    "eval_every_steps",
    "eval_batches",
    "checkpoint_every_steps",
    "keep_checkpoints",
)


def step_config(config) -> dict:
    """The run config as the training step depends on it: without the loop's own settings."""
    settings = json.loads(config.to_json())
    for name in ("stage", "compilation_cache_dir"):
        settings.pop(name)
    for stage in ("regression", "diffusion", "prior"):
        for name in _LOOP_ONLY:
            settings[stage]["training"].pop(name)
    return settings


def _export_source(config, stage: str, fold: int | None) -> dict:
    """What the exported model records of how it was trained beyond its config: the diffusion
    stage's residual mean (and cross-fitting), a fold model's fold."""
    cross_fit = config.diffusion.cross_fit.to_dict()
    if fold is not None:
        return {"cross_fit": dict(cross_fit, fold=fold)}
    if stage != "diffusion":
        return {}
    if CrossFit.from_config(config) is None:
        return {"residual_mean": config.diffusion.mean}
    return {"residual_mean": config.diffusion.mean, "cross_fit": cross_fit}


def _diffusion_loss(config, model, mean_model, layout: ConditioningLayout) -> PerSampleLoss:
    """The residual loss of ``diffusion.parameterization``: EDM or DDPM."""
    kind = config.diffusion.parameterization
    if kind == "ddpm":
        ddpm = config.diffusion.ddpm
        return ddpm_per_sample_loss(
            model, mean_model, layout, alpha_bars=alpha_bar(ddpm.schedule, int(ddpm.num_timesteps))
        )
    if kind != "edm":
        raise ValueError(f"diffusion.parameterization must be 'edm' or 'ddpm', got {kind!r}")
    loss = config.diffusion.loss
    return diffusion_per_sample_loss(
        model, mean_model, layout, p_mean=loss.p_mean, p_std=loss.p_std, sigma_data=config.diffusion.model.sigma_data
    )
