"""The training view of a dataset: prepared store, normalization, Grain iterators per split."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.pipeline import DownscalingSource, make_eval_iterator, make_train_iterator
from jax_corrdiff.data.prepare import ensure_prepared
from jax_corrdiff.data.store import PREPARED_DIR
from jax_corrdiff.distributed import barrier
from jax_corrdiff.training.cross_fit import CrossFit

# Batch entries the steps consume (time_index stays on the host).
STEP_KEYS = ("target", "img_lr", "lead_time_label", "time_features", "mask", "fold", "regression_mean")


def step_batch(batch: dict) -> dict:
    """The entries of a pipeline batch that the jitted steps take."""
    return {k: v for k, v in batch.items() if k in STEP_KEYS}


@dataclasses.dataclass
class TrainingData:
    normalizer: Normalizer
    train_source: DownscalingSource
    valid_source: DownscalingSource
    data_config: dict  # the prepared store's data config (paths resolved)
    worker_count: int = 0

    @classmethod
    def open(cls, config, workdir: str) -> TrainingData:
        """Prepare ``config.data`` (once, offline: regrid + statistics) into WORKDIR/prepared, then open it.

        Args:
            config: the run config (its ``data`` section is used).
            workdir: the run's work directory.

        Process 0 prepares; the others wait for it, then open the same store. With
        ``diffusion.cross_fit`` on, every sample carries its cross-fitting fold.
        """
        cache = os.path.join(workdir, PREPARED_DIR)
        if jax.process_index() == 0:
            ensure_prepared(config.data, cache)
        barrier("prepared data")
        store, normalizer = ensure_prepared(config.data, cache)
        train, valid = DownscalingSource(store, "train", normalizer), DownscalingSource(store, "valid", normalizer)
        cross_fit = CrossFit.from_config(config)
        if cross_fit is not None and len(train):
            train, valid = cross_fit.label(train, valid)
        return cls(normalizer, train, valid, data_config=train.data_config, worker_count=int(config.data.worker_count))

    def with_regression_means(self, path: str) -> TrainingData:
        """This data with every sample carrying its row of the regression-means file ``path``
        (``training.regression_means``)."""
        return dataclasses.replace(
            self,
            train_source=self.train_source.with_regression_means(path),
            valid_source=self.valid_source.with_regression_means(path),
        )

    def without_fold(self, fold: int) -> TrainingData:
        """This data with the training samples of cross-fitting ``fold`` left out (validation kept)."""
        return dataclasses.replace(self, train_source=self.train_source.without_fold(fold))

    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        return self.train_source.lat, self.train_source.lon

    @property
    def lead_time_steps(self) -> int:
        """How many lead-time labels the samples carry (0 for analysis inputs)."""
        return len(self.train_source.lead_times)

    def train_iterator(self, batch_size: int, seed: int):
        """Endless shuffled batches of ``batch_size`` (this process's share of the global batch)."""
        return make_train_iterator(
            self.train_source,
            batch_size=batch_size,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=self.worker_count,
        )

    def valid_iterator(self, batch_size: int):
        """One pass over this process's validation samples, masked to a fixed batch shape."""
        return make_eval_iterator(
            self.valid_source,
            batch_size=batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
