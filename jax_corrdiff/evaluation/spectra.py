"""Radially averaged power spectrum of 2-D fields on a regular grid.

Normalisation: for a field f on an ny x nx grid with 2-D DFT F (``numpy.fft.fft2``), the power
of mode (ky, kx) is |F(ky, kx)|^2 / (nx ny)^2, so by Parseval the power of all modes adds up
to the mean square of the field, mean(f^2) (units: the field's units squared). Modes are
binned by their radial wavenumber rounded to the nearest integer, and the spectrum P(k) is the
mean power of the modes in bin k; hence sum_k P(k) * mode_count(k) = mean(f^2).

Wavenumber: k = n sqrt((kx/nx)^2 + (ky/ny)^2) with kx, ky the integer DFT frequencies and
n = min(nx, ny): cycles per n grid lengths (cycles per domain for a square grid), assuming
equal grid spacing in x and y. The wavelength of bin k is n/k grid lengths. Taking the
shorter side makes the DFT lattice spacing at most 1 in both directions, so every unit-wide
bin holds modes of both directions; with the longer side, the coarser direction's modes fall
only in every other bin or so and the spectrum of a non-square grid zigzags. Shells are
complete up to the Nyquist wavenumber n/2 (bins beyond hold only the corner modes).

No window and no detrending: they would break the Parseval identity above, and the spectra
are compared between truth and predictions on the same grid, where the leakage from the
non-periodic domain edges is the same kind for all of them.
"""

from __future__ import annotations

import numpy as np


def radial_wavenumbers(ny: int, nx: int) -> np.ndarray:
    """(ny, nx) radial wavenumber of each DFT mode, in cycles per min(nx, ny) grid lengths."""
    n = min(nx, ny)
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.fftfreq(nx)[None, :]
    return n * np.sqrt(kx**2 + ky**2)


def radial_bins(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin index of each DFT mode, flattened (ny * nx,); number of modes in each bin (K,))."""
    bins = np.rint(radial_wavenumbers(ny, nx)).astype(np.int64).ravel()
    return bins, np.bincount(bins)


def radial_power_spectrum(fields: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of each 2-D field in ``fields`` (..., ny, nx).

    Returns (wavenumber (K,), power (..., K), mode_count (K,)), K = number of integer bins,
    normalised as in the module docstring. Fields must be finite.
    """
    fields = np.asarray(fields, dtype=np.float64)
    ny, nx = fields.shape[-2:]
    power = np.abs(np.fft.fft2(fields)) ** 2 / float(nx * ny) ** 2
    bins, mode_count = radial_bins(ny, nx)
    n_bins = len(mode_count)
    flat_power = power.reshape(-1, ny * nx)
    # One bincount over all fields: offset each field's bins by field_index * n_bins.
    offsets = (np.arange(flat_power.shape[0]) * n_bins)[:, None]
    summed = np.bincount(
        (bins[None, :] + offsets).ravel(), weights=flat_power.ravel(), minlength=flat_power.shape[0] * n_bins
    )
    averaged = summed.reshape(flat_power.shape[0], n_bins) / mode_count
    return np.arange(n_bins), averaged.reshape(*fields.shape[:-2], n_bins), mode_count


def nyquist_wavenumber(ny: int, nx: int) -> int:
    """Largest wavenumber whose shell is complete: min(nx, ny) // 2."""
    return min(nx, ny) // 2


def fine_scale_band(ny: int, nx: int) -> np.ndarray:
    """The top third of the resolved wavenumbers: bins k with 2/3 k_N < k <= k_N, k_N the
    Nyquist wavenumber (wavelengths of 2 to 3 grid lengths), where a generative downscaler
    must create the detail the coarse input lacks."""
    k_nyquist = nyquist_wavenumber(ny, nx)
    k = np.arange(k_nyquist + 1)
    return k[3 * k > 2 * k_nyquist]


def fine_scale_power_ratio(power: np.ndarray, truth_power: np.ndarray, ny: int, nx: int) -> float:
    """Mean radial power of a prediction over ``fine_scale_band`` divided by the truth's
    (spectra from ``radial_power_spectrum`` on the same ny x nx grid): 1 when the finest
    resolved scales carry their true variance, < 1 when they are too smooth."""
    band = fine_scale_band(ny, nx)
    truth_band = float(np.mean(np.asarray(truth_power)[band]))
    if not truth_band > 0:
        return float("nan")
    return float(np.mean(np.asarray(power)[band]) / truth_band)
