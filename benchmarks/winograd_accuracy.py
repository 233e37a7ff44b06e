"""How far Winograd's F(4x4, 3x3) lands from exact, against XLA's float32 convolutions.

Backs the accuracy figures of ``jax_corrdiff/models/conv3x3.py`` with two measurements:

1. One 4 x 4 output tile of a C-channel correlation of normal random numbers, computed in float32
   as  A^T [sum_c (G g_c G^T) . (B^T d_c B)] A  with the matrices of the Cook-Toom construction
   (Lavin & Gray 2016, section 4) for a set of interpolation points and infinity, against the
   float64 sum: median and largest error over the trials, relative to the tile's largest value.
   Lavin & Gray's points 0, +-1, +-2 against 0, +-1, 1/2, -2 (Barabasz et al. 2020), which the
   module uses; the construction must return the module's own matrices for those, or this stops.
2. The input and kernel gradients of whole layers, ``conv3x3_cpu_gradients`` and XLA's float32
   convolution, each against a float64 reference computed with NumPy, as the largest error
   relative to the largest value.

    python benchmarks/winograd_accuracy.py --out benchmarks/results/winograd_accuracy_cpu.json
"""

import argparse

import harness
import jax
import numpy as np

from jax_corrdiff.models import conv3x3

TILE, TAPS = 4, 3
MODULE_POINTS = (0, 1, -1, 0.5, -2)
POINT_SETS = {"Lavin & Gray: 0, 1, -1, 2, -2": (0, 1, -1, 2, -2), "module: 0, 1, -1, 1/2, -2": MODULE_POINTS}
# (batch, height, width, in channels), out channels: the full-width Taiwan UNet's Winograd layers.
LAYERS = (((2, 64, 64, 128), 128), ((2, 64, 64, 256), 128), ((2, 32, 32, 256), 256))


def cook_toom(points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B^T, G and A^T of F(4x4, 3x3) for finite interpolation points a_j and infinity (float64).

    Row j of A^T's transpose holds the powers of a_j, row j of G the powers over
    prod_{l != j} (a_j - a_l); infinity takes the highest power alone. B^T is the solution of
    sum_j A^T[i, j] G[j, k] B^T[j, s] = [s == i + k], which makes A^T [(G g) . (B^T d)] the
    correlation of d with g."""
    points = np.asarray(points, np.float64)
    n = TILE + TAPS - 1
    a_t, g = np.zeros((TILE, n)), np.zeros((n, TAPS))
    for j, point in enumerate(points):
        a_t[:, j] = point ** np.arange(TILE)
        g[j] = point ** np.arange(TAPS) / np.prod([point - other for other in points if other != point])
    a_t[TILE - 1, n - 1] = g[n - 1, TAPS - 1] = 1.0
    equations = np.zeros((TILE, TAPS, n, n, n))  # (i, k, s) x flattened B^T[j, s']
    for s in range(n):
        equations[:, :, s, :, s] = np.einsum("ij,jk->ikj", a_t, g)
    targets = np.zeros((TILE, TAPS, n))
    for i in range(TILE):
        for k in range(TAPS):
            targets[i, k, i + k] = 1.0
    equations, targets = equations.reshape(-1, n * n), targets.ravel()
    b_t = np.linalg.lstsq(equations, targets, rcond=None)[0]
    if np.abs(equations @ b_t - targets).max() > 1e-9:
        raise ValueError(f"points {points} give no exact F(4x4, 3x3)")
    return b_t.reshape(n, n), g, a_t


def check_module_matrices() -> None:
    """Stop unless the construction gives ``conv3x3``'s own B^T, G and A^T for its points."""
    constructed = cook_toom(MODULE_POINTS)
    module = (conv3x3._B_T, conv3x3._G, conv3x3._A_T)
    if not all(np.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(constructed, module, strict=True)):
        raise ValueError("the Cook-Toom construction does not give conv3x3's matrices for its points")


def relative_error(actual, exact: np.ndarray) -> float:
    """Largest error relative to the largest exact value."""
    return float(np.abs(np.asarray(actual, np.float64) - exact).max() / np.abs(exact).max())


def tile_errors(points, channels: int, trials: int, seed: int = 0) -> dict:
    """Errors of float32 tiles against the float64 correlation, relative to each tile's largest value."""
    b_t, g, a_t = (m.astype(np.float32) for m in cook_toom(points))
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(trials):
        d, kernel = rng.standard_normal((channels, 6, 6)), rng.standard_normal((channels, 3, 3))
        windows = np.lib.stride_tricks.sliding_window_view(d, (3, 3), axis=(1, 2))  # (c, 4, 4, 3, 3)
        exact = np.einsum("cijkl,ckl->ij", windows, kernel)
        u = np.einsum("pk,ckl,ql->cpq", g, kernel.astype(np.float32), g)
        v = np.einsum("pk,ckl,ql->cpq", b_t, d.astype(np.float32), b_t)
        tile = a_t @ (u * v).sum(0, dtype=np.float32) @ a_t.T
        errors.append(relative_error(tile, exact))
    return {"median": float(np.median(errors)), "max": float(np.max(errors))}


def exact_gradients(x: np.ndarray, kernel: np.ndarray, cotangent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Input and kernel gradients of the zero-padded 3 x 3 correlation, in float64."""
    x, kernel, cotangent = (np.asarray(a, np.float64) for a in (x, kernel, cotangent))
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    padded_gradient = np.zeros_like(padded)
    kernel_gradient = np.zeros_like(kernel)
    for i in range(3):
        for j in range(3):
            window = padded[:, i : i + h, j : j + w]
            kernel_gradient[i, j] = np.einsum("bhwc,bhwo->co", window, cotangent)
            padded_gradient[:, i : i + h, j : j + w] += cotangent @ kernel[i, j].T
    return padded_gradient[:, 1:-1, 1:-1], kernel_gradient


def layer_errors(shape, out_channels: int, seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], shape)
    kernel = jax.random.normal(keys[1], (3, 3, shape[-1], out_channels))
    cotangent = jax.random.normal(keys[2], (*shape[:3], out_channels))
    exact = exact_gradients(x, kernel, cotangent)
    row = {"shape": list(shape), "out_channels": out_channels, "seed": seed}
    for name, convolution in (("winograd", conv3x3.conv3x3_cpu_gradients), ("xla", conv3x3.direct_conv3x3)):
        gradients = jax.jit(lambda x, k, c, f=convolution: jax.vjp(f, x, k)[1](c))(x, kernel, cotangent)
        row[f"{name}_input_gradient"] = relative_error(gradients[0], exact[0])
        row[f"{name}_kernel_gradient"] = relative_error(gradients[1], exact[1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=128, help="channels summed in one tile")
    parser.add_argument("--trials", type=int, default=200, help="random tiles per point set")
    parser.add_argument("--seeds", type=int, default=2, help="random draws per layer")
    parser.add_argument("--out", help="results JSON")
    args = parser.parse_args()
    for option in ("channels", "trials", "seeds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1, not {getattr(args, option)}")

    check_module_matrices()
    tiles = {name: tile_errors(points, args.channels, args.trials) for name, points in POINT_SETS.items()}
    for name, errors in tiles.items():
        print(f"tile, {args.channels} channels, points {name}: median {errors['median']:.2e}, max {errors['max']:.2e}")
    layers = []
    for shape, out_channels in LAYERS:
        for seed in range(args.seeds):
            layers.append(layer_errors(shape, out_channels, seed))
            print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in layers[-1].items()}, flush=True)
    if args.out:
        harness.write_results(
            args.out,
            {
                "machine": harness.describe_machine(),
                "tile_channels": args.channels,
                "tile_trials": args.trials,
                "tiles": tiles,
                "layers": layers,
            },
        )


if __name__ == "__main__":
    main()
