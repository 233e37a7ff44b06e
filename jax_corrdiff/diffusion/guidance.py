"""Diffusion posterior sampling: guidance as a wrapper around a denoise function.

Given a prior's denoiser D(x; sigma) ~ E[x0 | x] and an observation y = A(x0) + noise of the
fine field x0 (the coarse field of a reanalysis or a climate model), the posterior score is
the prior score (D - x) / sigma^2 plus the likelihood score grad_x log p(y | x), approximated
through x0_hat = D(x; sigma) (Chung et al. 2023, "Diffusion posterior sampling for general
noisy inverse problems"). With the data-fidelity loss

    L(x) = || W (A(D(x; sigma)) - y) ||^2

the guided denoiser is D_g = D + sigma^2 grad log p(y | x), i.e. the samplers see

    dps: D_g = D - zeta grad_x ||W r|| = D - zeta grad_x L / (2 sqrt(L))
         Chung et al. Algorithm 1 takes x <- x - zeta_i grad ||y - A(x0_hat)||^2 with
         zeta_i = zeta' / ||y - A(x0_hat)||; with the EDM Euler step x' = x + (t' - t)(x - D_g) / t
         this moves x by -zeta (t - t') / t grad ||W r||: their step, with a step size following
         the noise schedule and reaching zeta at the final step (to sigma = 0).
    sda: D_g = D - sigma^2 grad_x L / (2 (sigma_y^2 + gamma sigma^2)) * scale
         the Gaussian likelihood p(y | x) ~ N(y; A(x0_hat), sigma_y^2 + gamma sigma^2) of
         score-based data assimilation (Rozet & Louppe 2023), as PhysicsNeMo and Earth2Studio
         weight it: guidance fades out as sigma falls below sigma_y / sqrt(gamma).

The gradient goes through the network (one vjp per denoiser call). The wrapper is an ordinary
denoise function, so it compiles inside the samplers' ``lax.scan`` and they stay unaware of it.
With scale 0 it returns D(x; sigma) itself.

Observation operators A are linear and separable on a regular grid, A(x) = R x C^T per channel
(``SeparableOperator``): (a) block average by an integer factor, (b) area-weighted averaging
onto an arbitrary coarser lat/lon grid, (c) unified coordinate guidance: sample and observation
both mapped to one unified coarse grid and projected back to the fine grid (block average, then
bilinear interpolation: ``data.regrid.degrade``), compared there with cos(lat) weights, so the
gradient reaches every fine pixel whatever the observation's scale factor (the block-average
gradient of (a) shrinks as 1 / factor: vanilla DPS loses its guidance at large factors).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jax_corrdiff.data.regrid import area_weights_1d, block_average, degrade
from jax_corrdiff.diffusion.samplers import DenoiseFn

SCHEDULES = ("dps", "sda")


@dataclasses.dataclass(frozen=True)
class SeparableOperator:
    """A(x) = rows @ x @ cols^T on each channel: (..., H, W, C) -> (..., A, B, C)."""

    rows: np.ndarray  # (A, H)
    cols: np.ndarray  # (B, W)

    def __call__(self, x: jax.Array) -> jax.Array:
        rows, cols = jnp.asarray(self.rows, jnp.float32), jnp.asarray(self.cols, jnp.float32)
        return jnp.einsum("ah,...hwc,bw->...abc", rows, x, cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape[0], self.cols.shape[0]


def _axis_matrices(op, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The (rows, cols) matrices of a separable linear NumPy ``op`` on (..., H, W, C) fields,
    read off its response to unit impulses along each axis."""
    h, w = shape
    rows = op(np.eye(h)[:, :, None, None])[:, :, 0, 0].T
    cols = op(np.eye(w)[:, None, :, None])[:, 0, :, 0].T
    return rows, cols


def block_average_operator(factor: int, shape: tuple[int, int]) -> SeparableOperator:
    """(a) The mean over each factor x factor block (partial blocks at the edges, as
    ``data.regrid.block_average`` makes the paired-synthetic inputs)."""
    return SeparableOperator(*_axis_matrices(lambda f: block_average(f, factor), shape))


def unified_operator(factor: int, shape: tuple[int, int]) -> SeparableOperator:
    """(c) Block average onto the unified grid of ``factor`` fine cells, then bilinear back to
    the fine grid (``data.regrid.degrade``): a smooth projection, output on the fine grid."""
    return SeparableOperator(*_axis_matrices(lambda f: degrade(f, factor), shape))


def area_weighted_operator(fine_lat, fine_lon, coarse_lat, coarse_lon) -> tuple[SeparableOperator, tuple]:
    """(b) Area-weighted averages of a regular fine lat/lon grid over the cells of a coarse
    regular grid (1-D ``coarse_lat``, ``coarse_lon``, any alignment, longitudes in either
    convention). Returns the operator and (lat index, lon index) of the coarse cells it keeps
    (those at least half covered by the fine domain)."""
    fine_lat, fine_lon = np.asarray(fine_lat, np.float64), np.asarray(fine_lon, np.float64)
    if fine_lat.ndim == 2:
        if not (np.allclose(fine_lat, fine_lat[:, :1]) and np.allclose(fine_lon, fine_lon[:1, :])):
            raise ValueError("area-weighted observation operators need a regular fine lat/lon grid")
        fine_lat, fine_lon = fine_lat[:, 0], fine_lon[0, :]
    coarse_lat, coarse_lon = np.asarray(coarse_lat, np.float64), np.asarray(coarse_lon, np.float64)
    # The coarse longitudes in the fine grid's convention (within 180 degrees of its centre).
    centre = 0.5 * (fine_lon.min() + fine_lon.max())
    coarse_lon = np.mod(coarse_lon - centre + 180.0, 360.0) + centre - 180.0
    lat_order, lon_order = np.argsort(coarse_lat), np.argsort(coarse_lon)
    rows, kept_lat = _increasing(fine_lat, coarse_lat[lat_order], latitude=True)
    cols, kept_lon = _increasing(fine_lon, coarse_lon[lon_order], latitude=False)
    if not len(kept_lat) or not len(kept_lon):
        raise ValueError("the coarse grid has no cell at least half inside the fine domain")
    return SeparableOperator(rows, cols), (lat_order[kept_lat], lon_order[kept_lon])


def _increasing(fine: np.ndarray, coarse: np.ndarray, *, latitude: bool) -> tuple[np.ndarray, np.ndarray]:
    """``area_weights_1d`` for fine centres in either order (matrix columns in the given order)."""
    order = np.argsort(fine)
    matrix, kept = area_weights_1d(fine[order], coarse, latitude=latitude)
    out = np.zeros_like(matrix)
    out[:, order] = matrix
    return out, kept


def cell_count_weights(operator: SeparableOperator) -> np.ndarray:
    """(A, B, 1) weights sqrt(n_ab / max n) for a coarse operator whose cell ab averages n_ab fine
    cells (an effective count 1 / sum(w^2) for area weights). A partial block of one fine cell
    would otherwise take a step n times the interior's (diag(A A^T) = 1 / n_ab), and overshoot:
    weighted, every cell counts by its size, as in an area-weighted norm."""
    n_rows = 1.0 / np.sum(np.square(operator.rows), axis=1)
    n_cols = 1.0 / np.sum(np.square(operator.cols), axis=1)
    return np.sqrt(np.outer(n_rows / n_rows.max(), n_cols / n_cols.max()))[..., None]


def cos_lat_weights(lat: np.ndarray) -> np.ndarray:
    """(H, W, 1) weights cos(lat) / mean cos(lat): each pixel counts by its area."""
    w = np.cos(np.deg2rad(np.asarray(lat, np.float64)))
    return (w / w.mean())[..., None]


def _largest_eigenvalue(operator: SeparableOperator, weights, shape: tuple[int, int], iterations: int = 100) -> float:
    """lambda_max(A^T W^2 A) by power iteration (NumPy, once per observation)."""
    w2 = np.square(np.broadcast_to(np.asarray(weights, np.float64), (*operator.shape, 1)))
    v = np.random.default_rng(0).normal(size=(*shape, 1))
    value = 0.0
    for _ in range(iterations):
        u = w2 * np.einsum("ah,hwc,bw->abc", operator.rows, v, operator.cols)
        v_next = np.einsum("ah,abc,bw->hwc", operator.rows, u, operator.cols)
        value = float(np.linalg.norm(v_next))
        v = v_next / value
    return value


@dataclasses.dataclass(frozen=True)
class Observation:
    """y (values) = A(x0) (operator) + noise, compared with per-point ``weights`` W (broadcast
    against A(x0)); ``values`` may carry leading batch axes while the operator is shared.

    The loss is measured in units where A^T W^2 A has unit norm (divided by its largest
    eigenvalue, computed once): a gradient step of size 1/2 then removes the residual along the
    most observed direction exactly, so one guidance scale is stable for every operator and
    scale factor (a block average by K alone has norm 1/K^2, and a partial block at the domain
    edge or the projection of unified coordinates can have a larger one)."""

    operator: SeparableOperator
    values: jax.Array
    weights: np.ndarray | float = 1.0
    fine_shape: tuple[int, int] = (0, 0)
    norm: float | None = None  # lambda_max(A^T W^2 A); computed when not given (replace() keeps it)

    def __post_init__(self):
        if min(self.fine_shape) < 1 or self.fine_shape != (self.operator.rows.shape[1], self.operator.cols.shape[1]):
            raise ValueError(f"Observation.fine_shape {self.fine_shape} does not match the operator")
        if self.norm is None:
            object.__setattr__(self, "norm", _largest_eigenvalue(self.operator, self.weights, self.fine_shape))

    def loss(self, x0: jax.Array) -> jax.Array:
        """L = || W (A(x0) - y) ||^2 / lambda_max(A^T W^2 A)."""
        residual = jnp.asarray(self.weights, jnp.float32) * (self.operator(x0) - self.values)
        return jnp.sum(jnp.square(residual)) / self.norm


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    """How strongly the likelihood score steers (module docstring): ``kind`` "dps" (step
    ``scale`` = zeta times the normalised gradient) or "sda" (``scale`` times the Gaussian
    likelihood score with observation noise ``sigma_y`` and ``gamma``).

    With the loss normalised by lambda_max (``Observation``), sda at scale 1, sigma >> sigma_y and
    an identity network Jacobian moves D's residual along the most observed direction to zero;
    larger scales overshoot. Measured on the 500-step ERA5 UK prior (x4, block average, 8 Euler
    steps): coarse-scale MAE 3.86 K unguided, 0.18 K at scale 1, 0.04 K at 3; Chung's dps step
    at zeta = 1 reached only 3.68 K (its fixed-length step is small against a residual over a
    whole field). With 8 Heun steps, scale 3 diverged for the block average (MAE 4.5 K)."""

    kind: str = "dps"
    scale: float = 1.0
    sigma_y: float = 0.0
    gamma: float = 1.0
    # False: L in data units, not divided by lambda_max(A^T W^2 A), as in Chung et al.'s DPS and
    # the ZSSD paper's vanilla baseline: the block-average gradient then shrinks as 1 / K^2.
    normalized: bool = True

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"guidance schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.scale < 0 or self.sigma_y < 0 or self.gamma < 0:
            raise ValueError("guidance scale, sigma_y and gamma must be non-negative")
        if self.kind == "sda" and self.sigma_y == 0 and self.gamma == 0:
            raise ValueError("sda guidance needs sigma_y > 0 or gamma > 0 (its variance sigma_y^2 + gamma sigma^2)")

    def step(self, grad: jax.Array, loss: jax.Array, sigma: jax.Array) -> jax.Array:
        """The change of D(x; sigma) for grad_x L and L."""
        if self.kind == "dps":
            return self.scale * grad / (2.0 * jnp.sqrt(loss) + 1e-12)
        return self.scale * sigma**2 * grad / (2.0 * (self.sigma_y**2 + self.gamma * sigma**2))


def guided_denoiser(denoise: DenoiseFn, observation: Observation, schedule: GuidanceSchedule) -> DenoiseFn:
    """D_g(x; sigma) = D(x; sigma) - schedule.step(grad_x L, L, sigma), L = ||W (A(D(x; sigma)) - y)||^2
    (divided by lambda_max(A^T W^2 A) when ``schedule.normalized``)."""

    def loss_and_x0(x, sigma):
        x0 = denoise(x, sigma)
        loss = observation.loss(x0)
        return (loss if schedule.normalized else loss * observation.norm), x0

    def guided(x, sigma):
        (loss, x0), grad = jax.value_and_grad(loss_and_x0, has_aux=True)(x, sigma)
        return x0 - schedule.step(grad, loss, sigma)

    return guided
