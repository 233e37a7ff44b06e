"""Cross-fitting the regression mean over time blocks, so the diffusion stage learns residuals
of the size they have on new data.

CorrDiff's diffusion stage learns the distribution of r = y - mu(x) over the training period
(Mardani et al. 2023, eq. 3). A regression network mu that fits its own training period better
than new data (the demo's: residual variance 0.0212 on training times, 0.0472 on validation
times) hands the diffusion stage residuals that are too small, and its ensembles come out
under-dispersed. Cross-fitting (as in double machine learning, Chernozhukov et al. 2018) removes
that bias: the training period is cut into blocks of ``block_hours``, block b belongs to fold
b mod K, and fold model k is the regression trained without fold k; the diffusion stage takes
each training sample's residual to the fold model that never saw it. Blocks rather than single
times, because neighbouring hours are nearly copies of each other; interleaved blocks rather
than K contiguous stretches, so every fold model sees every season of the period. Validation
and generation use the regression trained on everything.

    config.diffusion.cross_fit.folds = 4          # 0 = off
    config.diffusion.cross_fit.block_hours = 24
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jax_corrdiff.data.pipeline import DownscalingSource
from jax_corrdiff.diffusion.residual_mean import CrossFitMean
from jax_corrdiff.model_dir import SavedModel, load_model
from jax_corrdiff.models.factory import build_model


@dataclasses.dataclass(frozen=True)
class CrossFit:
    folds: int
    block_hours: float

    @classmethod
    def from_config(cls, config) -> CrossFit | None:
        """``config.diffusion.cross_fit`` when it is on (folds >= 2), after checking it; else None."""
        settings = config.diffusion.cross_fit
        folds, block_hours = int(settings.folds), float(settings.block_hours)
        if folds == 0:
            return None
        if folds < 2:
            raise ValueError(f"diffusion.cross_fit.folds must be 0 (off) or >= 2, got {folds}")
        if block_hours <= 0:
            raise ValueError(f"diffusion.cross_fit.block_hours must be > 0, got {block_hours}")
        if config.diffusion.mean != "regression":
            raise ValueError("diffusion.cross_fit needs diffusion.mean='regression' (it cross-fits the regression)")
        if config.diffusion.regression_model:
            raise ValueError(
                "diffusion.cross_fit trains its fold models in this workdir; it cannot take an external "
                f"diffusion.regression_model ({config.diffusion.regression_model})"
            )
        return cls(folds, block_hours)

    def labels(self, times: np.ndarray, origin: np.datetime64) -> np.ndarray:
        """The fold of each time: floor((time - origin) / block_hours) mod folds."""
        hours = (np.asarray(times, "datetime64[s]") - np.datetime64(origin, "s")) / np.timedelta64(3600, "s")
        return (np.floor(hours / self.block_hours).astype(np.int64) % self.folds).astype(np.int32)

    def label(self, train: DownscalingSource, valid: DownscalingSource) -> tuple[DownscalingSource, DownscalingSource]:
        """Both splits with each sample's fold, blocks counted from the first training time;
        every fold must hold some training samples."""
        origin = train.times.min()
        labels = self.labels(train.times, origin)
        counts = np.bincount(labels, minlength=self.folds)
        if counts.min() == 0:
            raise ValueError(
                f"diffusion.cross_fit: fold sample counts {counts.tolist()} -- the training period is too "
                f"short for {self.folds} folds of {self.block_hours} h blocks (lower block_hours or folds)"
            )
        return train.with_folds(labels), valid.with_folds(self.labels(valid.times, origin))


def folds_directory(workdir: str) -> str:
    """Where a workdir's fold models live (WORKDIR/regression/folds)."""
    return os.path.join(workdir, "regression", "folds")


def fold_directory(workdir: str, fold: int) -> str:
    """Where fold model ``fold`` trains and is exported (WORKDIR/regression/folds/<fold>)."""
    return os.path.join(folds_directory(workdir), str(fold))


def load_fold_models(workdir: str) -> list[SavedModel]:
    """The exported fold models of WORKDIR, in fold order (checked to be one complete set)."""
    folds_dir = folds_directory(workdir)
    if not os.path.isdir(folds_dir):
        raise FileNotFoundError(f"{folds_dir} does not exist: train the regression stage with diffusion.cross_fit on")
    count = len(os.listdir(folds_dir))
    saved = [load_model(os.path.join(fold_directory(workdir, k), "model")) for k in range(count)]
    for k, model in enumerate(saved):
        settings = model.source.get("cross_fit", {})
        if settings.get("fold") != k or settings.get("folds") != count or model.config != saved[0].config:
            raise ValueError(f"{fold_directory(workdir, k)}: not fold {k} of {count} like the others ({settings})")
    return saved


def fold_mean(saved: list[SavedModel]) -> tuple[CrossFitMean, dict]:
    """The fold models as one ``CrossFitMean`` and their variables stacked on a leading axis."""
    stacked = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *(s.variables for s in saved))
    return CrossFitMean(build_model(saved[0].config)), stacked
