"""The training view of a dataset: prepared store, normalization, Grain iterators, channels."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.pipeline import DownscalingSource, make_eval_iterator, make_train_iterator
from jax_corrdiff.data.prepare import PREPARED_DIR, data_config_dict, ensure_prepared
from jax_corrdiff.mesh import to_global

# Batch entries the steps consume (time_index stays on the host).
STEP_KEYS = ("target", "img_lr", "lead_time_label", "mask")


def _step_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in STEP_KEYS}


@dataclasses.dataclass
class TrainingData:
    store_path: str
    normalizer: Normalizer
    train_source: DownscalingSource
    valid_source: DownscalingSource
    data_config: dict
    worker_count: int = 0

    @classmethod
    def open(cls, config, workdir: str) -> TrainingData:
        """Prepare (once, offline: regrid + statistics) into WORKDIR/prepared, then open.

        Process 0 prepares; the others wait for it, then open the same store.
        """
        cache = os.path.join(workdir, PREPARED_DIR)
        if jax.process_index() == 0:
            ensure_prepared(config.data, cache)
        multihost_utils.sync_global_devices("jax_corrdiff: prepared data")
        store, normalizer = ensure_prepared(config.data, cache)
        return cls(
            store,
            normalizer,
            DownscalingSource(store, "train", normalizer),
            DownscalingSource(store, "valid", normalizer),
            data_config=data_config_dict(config.data),
            worker_count=int(config.data.worker_count),
        )

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.train_source.shape)

    @property
    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        return self.train_source.lat, self.train_source.lon

    @property
    def target_channels(self) -> tuple[str, ...]:
        return tuple(self.train_source.target_channels)

    @property
    def condition_channels(self) -> tuple[str, ...]:
        """Channels of img_lr: the coarse inputs, then the static fields."""
        return tuple(self.train_source.img_lr_channels)

    @property
    def normalization(self) -> dict:
        return self.normalizer.to_dict()

    def residual_pairs(self) -> list[list[int]]:
        """(target channel, img_lr channel) for targets that are also coarse inputs (same name):
        the global residual connection of China 3 km CorrDiff."""
        inputs = list(self.normalizer.input_channels)
        return [[i, inputs.index(name)] for i, name in enumerate(self.target_channels) if name in inputs]

    def channel_metadata(self) -> dict:
        return {"target": list(self.target_channels), "img_lr": list(self.condition_channels)}

    def train_iterator(self, batch_size: int, seed: int):
        return make_train_iterator(
            self.train_source,
            batch_size=batch_size,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=self.worker_count,
        )

    def next_train_batch(self, iterator, mesh) -> dict:
        return to_global(_step_batch(next(iterator)), mesh)

    def validation_loss(self, eval_step, params, constants, frozen, mesh, batch_size: int, max_batches: int) -> float:
        """Mean per-sample loss over the first ``max_batches`` validation batches."""
        iterator = make_eval_iterator(
            self.valid_source,
            batch_size=batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        total, count = 0.0, 0.0
        for _, batch in zip(range(max_batches), iterator):
            loss_sum, n = eval_step(params, constants, to_global(_step_batch(batch), mesh), frozen)
            total, count = total + loss_sum, count + n
        return float(np.asarray(total) / max(float(np.asarray(count)), 1.0))
