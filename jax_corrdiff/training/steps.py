"""Train state and the jitted training / evaluation steps of both CorrDiff stages.

A stage is described by a loss function
    per_sample_loss(params, constants, batch, rng, frozen, train) -> (B,)
where ``frozen`` holds variables that are inputs but not trained (the regression network
while training diffusion). Steps are built around it; they never sync with the host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jax_corrdiff.compiler_options import network_evaluation_options, training_step_options
from jax_corrdiff.diffusion.conditioning import ConditioningLayout
from jax_corrdiff.diffusion.ddpm import ddpm_residual_loss
from jax_corrdiff.diffusion.losses import regression_loss, residual_loss
from jax_corrdiff.diffusion.patching import training_batch
from jax_corrdiff.diffusion.residual_mean import batch_mean
from jax_corrdiff.mesh import batch_sharded, placed_shapes, replicated
from jax_corrdiff.training.optimizer import ema_decay, ema_update, gradient_statistics, learning_rate

PerSampleLoss = Callable[..., jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    constants: Any  # non-trained variable collections (e.g. fourier frequencies)


def init_train_state(model, example_args, example_kwargs, optimizer, key, mesh) -> TrainState:
    """Initialise replicated on ``mesh`` (every process computes the same values)."""

    def init(key):
        variables = dict(model.init(key, *example_args, **example_kwargs))
        params = variables.pop("params")
        return TrainState(jnp.zeros((), jnp.int32), params, params, optimizer.init(params), variables)

    return jax.jit(init, out_shardings=replicated(mesh))(key)


def train_state_shapes(init: Callable[[], TrainState], mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state ``init()`` builds (replicated on ``mesh``, as
    ``init_train_state`` places it), computing nothing. Compiling the step and restoring a
    checkpoint need no more, so the state need not exist while XLA compiles: on a CPU the
    compiler's working memory (about 2 GB for a CorrDiff step) and the state (1.3 GB at Taiwan
    width) are then not resident together."""
    return placed_shapes(jax.eval_shape(init), replicated(mesh))


def _pixel_mean(per_pixel: jax.Array) -> jax.Array:
    return jnp.mean(per_pixel, axis=tuple(range(1, per_pixel.ndim)))


def regression_per_sample_loss(model) -> PerSampleLoss:
    def loss(params, constants, batch, rng, frozen, train):
        del frozen
        pred = model.apply(
            {"params": params, **constants},
            batch["img_lr"],
            lead_time_label=batch.get("lead_time_label"),
            train=train,
            rngs={"dropout": rng},
        )
        return _pixel_mean(regression_loss(pred, batch["target"]))

    return loss


def diffusion_per_sample_loss(
    model, regression_model, layout: ConditioningLayout, *, p_mean: float, p_std: float, sigma_data: float
) -> PerSampleLoss:
    """Residual EDM loss; ``frozen`` = the regression variables (an argument, not a
    compile-time constant, so 80 M weights are not baked into the program).

    The network is conditioned as ``layout`` says. With patch settings each image contributes
    ``num_patches`` random patches (``diffusion.patching``); the regression mean is still
    computed once on the whole image and an image's loss is the mean over its patches."""

    def pixel_loss(denoise, key, target, mean):
        return residual_loss(denoise, key, target, mean, p_mean=p_mean, p_std=p_std, sigma_data=sigma_data)

    return _residual_per_sample_loss(model, regression_model, layout, pixel_loss)


def ddpm_per_sample_loss(model, regression_model, layout: ConditioningLayout, *, alpha_bars) -> PerSampleLoss:
    """Residual DDPM simple loss (``diffusion.ddpm``), conditioned, patched and reduced as
    ``diffusion_per_sample_loss``; ``model`` predicts the noise at the integer step t."""
    alpha_bars = jnp.asarray(alpha_bars, jnp.float32)

    def pixel_loss(eps_fn, key, target, mean):
        return ddpm_residual_loss(eps_fn, key, target, mean, alpha_bars)

    return _residual_per_sample_loss(model, regression_model, layout, pixel_loss)


def _residual_per_sample_loss(model, regression_model, layout: ConditioningLayout, pixel_loss) -> PerSampleLoss:
    """``pixel_loss(net_fn, key, target, mean)`` on the residual to ``regression_model``'s mean
    (``residual_mean.batch_mean``), ``net_fn(x, noise_level)`` being the conditioned model."""

    def loss(params, constants, batch, rng, frozen, train):
        lead_time = batch.get("lead_time_label")
        mean = jax.lax.stop_gradient(batch_mean(regression_model, frozen, batch))
        patch_rng, dropout_rng, noise_rng = jax.random.split(rng, 3)
        cut = training_batch(patch_rng, layout, batch["target"], mean, batch["img_lr"], lead_time)

        def net_fn(x, noise_level):
            return model.apply(
                {"params": params, **constants},
                x,
                cut["cond"],
                noise_level,
                lead_time_label=cut["lead_time_label"],
                patch_origin=cut["patch_origin"],
                train=train,
                rngs={"dropout": dropout_rng},
            )

        per_pixel = pixel_loss(net_fn, noise_rng, cut["target"], cut["regression_mean"])
        return _pixel_mean(per_pixel).reshape(batch["target"].shape[0], -1).mean(axis=1)

    return loss


def prior_per_sample_loss(
    model, layout: ConditioningLayout, static: slice, *, p_mean: float, p_std: float, sigma_data: float
) -> PerSampleLoss:
    """EDM loss of the ZSSD prior: the denoising loss on the fine field itself (``residual_loss``
    with a zero mean), conditioned as ``layout`` says on the static channels of ``img_lr``
    (``static``: the data's coarse inputs are skipped) and the sample's cyclic time."""

    def loss(params, constants, batch, rng, frozen, train):
        del frozen
        dropout_rng, noise_rng = jax.random.split(rng)
        cond = layout.assemble(batch["img_lr"][..., static], time_features=batch["time_features"])

        def denoise(x, sigma):
            return model.apply(
                {"params": params, **constants}, x, cond, sigma, train=train, rngs={"dropout": dropout_rng}
            )

        target = batch["target"]
        per_pixel = residual_loss(
            denoise, noise_rng, target, jnp.zeros_like(target), p_mean=p_mean, p_std=p_std, sigma_data=sigma_data
        )
        return _pixel_mean(per_pixel)

    return loss


def _split_microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B / n, ...) taking every n-th sample, so each micro-batch still
    spans all devices of the data axis (B is sharded in contiguous blocks)."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch {x.shape[0]} does not split into {n} micro-batches")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree_util.tree_map(split, batch)


def make_train_step(loss_fn: PerSampleLoss, optimizer, training_config, global_batch: int, seed: int, mesh):
    """jit(state, batch, frozen) -> (state, metrics); the state buffer is donated."""
    schedule = learning_rate(training_config, global_batch)
    accumulation = int(training_config.grad_accumulation)

    def mean_loss(params, constants, batch, rng, frozen):
        return jnp.mean(loss_fn(params, constants, batch, rng, frozen, True))

    grad_fn = jax.value_and_grad(mean_loss)

    def step(state: TrainState, batch: dict, frozen: Any):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        if accumulation == 1:
            loss, grads = grad_fn(state.params, state.constants, batch, rng, frozen)
        else:

            def accumulate(carry, inputs):
                i, micro = inputs
                loss, grads = grad_fn(state.params, state.constants, micro, jax.random.fold_in(rng, i), frozen)
                return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state.params))
            micro = _split_microbatches(batch, accumulation)
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accumulation), micro))
            loss, grads = jax.tree_util.tree_map(lambda x: x / accumulation, (loss, grads))
        grad_norm, nonfinite = gradient_statistics(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay(training_config, state.step, global_batch))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite_grads": nonfinite,
            "learning_rate": schedule(state.step),
        }
        return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    repl = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(repl, batch_sharded(mesh), repl),
        out_shardings=(repl, repl),
        donate_argnums=0,
        compiler_options=training_step_options(len(mesh.local_devices)),
    )


def make_eval_step(loss_fn: PerSampleLoss, seed: int, mesh):
    """jit(params, constants, batch, frozen) -> (sum of per-sample losses, number of real samples).

    A fixed key makes successive validation losses comparable (same sigmas, same noise)."""

    def step(params, constants, batch, frozen):
        rng = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)
        per_sample = loss_fn(params, constants, batch, rng, frozen, False)
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(per_sample * mask), jnp.sum(mask)

    repl = replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(repl, repl, batch_sharded(mesh), repl),
        out_shardings=repl,
        compiler_options=network_evaluation_options(),
    )
