"""Per-channel normalization: statistics, the ``Normalizer`` and its JSON form.

Every channel c is centred and scaled, x' = (x - mean_c) / std_c, with mean and (population)
std over all training times and grid points. A channel whose std is below ``STD_EPS`` carries
no usable variation (a land-sea mask that is all land, precipitation that is zero all month);
dividing by its tiny std would blow float noise up, so its std is set to 1 and it normalizes to
about zero instead.

Channels with a transform (``data.transforms``) are transformed first and their statistics are
those of the transformed values: x' = (T(x) - mean_c) / std_c, inverted as T^-1(x' std_c + mean_c).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from jax_corrdiff.data.transforms import ChannelTransform, apply_per_channel, parse_transforms

STD_EPS = 1e-6


class RunningMoments:
    """Per-channel count, mean and M2 = sum (x - mean)^2, accumulated block by block.

    Blocks are merged with Chan, Golub & LeVeque's update: for n = n_a + n_b, d = mean_b - mean_a,
        mean = mean_a + d n_b / n,    M2 = M2_a + M2_b + d^2 n_a n_b / n.
    Unlike sum(x^2) - n mean^2 this does not cancel for fields like 280 K +- 5 K.
    """

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def update(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        x = block.reshape(-1, block.shape[-1]).astype(np.float64)
        n_b = x.shape[0]
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.count + n_b
        d = mean_b - self.mean
        self.mean = self.mean + d * n_b / n
        self.m2 = self.m2 + m2_b + d**2 * self.count * n_b / n
        self.count = n

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return self.mean.astype(np.float32), np.where(std < STD_EPS, 1.0, std).astype(np.float32)


def _vec(values) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1)


@dataclasses.dataclass(frozen=True, eq=False)
class Normalizer:
    """Means and stds for the target, input and static channels (float32 vectors, channel order
    as in the prepared store). Methods broadcast over the last (channel) axis and work on NumPy
    and JAX arrays alike."""

    target_channels: tuple[str, ...]
    target_mean: np.ndarray
    target_std: np.ndarray
    input_channels: tuple[str, ...]
    input_mean: np.ndarray
    input_std: np.ndarray
    static_channels: tuple[str, ...] = ()
    static_mean: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    static_std: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    # channel name -> ChannelTransform (target and input channels of that name alike)
    transforms: dict[str, ChannelTransform] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for group in ("target", "input", "static"):
            names = tuple(getattr(self, f"{group}_channels"))
            object.__setattr__(self, f"{group}_channels", names)
            for stat in ("mean", "std"):
                vec = _vec(getattr(self, f"{group}_{stat}"))
                if vec.shape != (len(names),):
                    raise ValueError(f"Normalizer: {group}_{stat} has {vec.size} values for {len(names)} channels")
                object.__setattr__(self, f"{group}_{stat}", vec)

    def normalize_target(self, x):
        return (apply_per_channel(x, self.target_channels, self.transforms) - self.target_mean) / self.target_std

    def denormalize_target(self, x):
        return apply_per_channel(x * self.target_std + self.target_mean, self.target_channels, self.transforms, True)

    def normalize_inputs(self, x):
        return (apply_per_channel(x, self.input_channels, self.transforms) - self.input_mean) / self.input_std

    def denormalize_inputs(self, x):
        return apply_per_channel(x * self.input_std + self.input_mean, self.input_channels, self.transforms, True)

    def normalize_static(self, x):
        return (x - self.static_mean) / self.static_std

    def img_lr(self, inputs: np.ndarray, normalized_static: np.ndarray) -> np.ndarray:
        """The conditioning image the data layer delivers: [normalized coarse inputs | static
        fields], float32 with ``inputs``' leading shape. ``normalized_static`` (H, W, C_static)
        is normalized once by the caller (``normalize_static``) and broadcast here."""
        static = np.broadcast_to(normalized_static, (*inputs.shape[:-1], normalized_static.shape[-1]))
        return np.concatenate([self.normalize_inputs(inputs), static], axis=-1).astype(np.float32)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists of floats), e.g. to store inside a checkpoint."""
        groups = {
            group: {
                "channels": list(getattr(self, f"{group}_channels")),
                "mean": [float(v) for v in getattr(self, f"{group}_mean")],
                "std": [float(v) for v in getattr(self, f"{group}_std")],
            }
            for group in ("target", "input", "static")
        }
        return groups | ({"transforms": transforms_dict(self.transforms)} if self.transforms else {})

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        kwargs = {}
        for group in ("target", "input", "static"):
            g = d.get(group, {"channels": [], "mean": [], "std": []})
            kwargs.update({f"{group}_channels": g["channels"], f"{group}_mean": g["mean"], f"{group}_std": g["std"]})
        return cls(**kwargs, transforms=parse_transforms(d.get("transforms", {})))


def transforms_dict(transforms: dict[str, ChannelTransform]) -> dict[str, dict]:
    return {c: dataclasses.asdict(t) for c, t in transforms.items()}


def save_stats(
    path: str, normalizer: Normalizer, *, config_hash: str, input_fingerprint: str, train_period: Sequence[str]
) -> None:
    """Write ``stats.json``: the normalizer plus the data-config hash, input-file fingerprint and
    period it came from."""
    record = {
        "config_hash": config_hash,
        "input_fingerprint": input_fingerprint,
        "train_period": list(train_period),
        "normalizer": normalizer.to_dict(),
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def load_stats(path: str) -> Normalizer:
    with open(path) as f:
        return Normalizer.from_dict(json.load(f)["normalizer"])
