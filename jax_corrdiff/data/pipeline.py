"""Grain input pipeline over a prepared store.

Samples are dicts of float32 NumPy arrays, normalized, NHWC:
    target      (H, W, C_out)     (not on sources ``without_target``)
    img_lr      (H, W, C_in + C_static)   [inputs | static], the conditioning image
    time_index  int64, index into the prepared store's time axis (to find the time again)
    time_features (4,)  cyclic (valid) time, ``data.calendar.cyclic_time_features``
    fold        int32, the sample's cross-fitting fold (only on sources ``with_folds``)
    regression_mean (H, W, C_out)  the frozen regression's mean of the sample (only on sources
                ``with_regression_means``, ``training.regression_means``)
Batches add a leading batch axis; eval batches also carry ``mask`` (B,) bool.

Training iterator = one global sample order, range(N) -> shuffle(seed) -> repeat (a new
permutation every epoch), cut into global batches of batch_size * process_count; process p reads
rows [p * batch_size, (p + 1) * batch_size) of each (only its own samples) -> batch(drop_remainder)
-> to_iter_dataset (read threads) [-> mp_prefetch]. The global batch k is therefore the same for
any process count (2 processes x 2 devices train like 1 x 4). Batches are cut before
``to_iter_dataset``, so batch k holds the same samples whatever the thread or worker count, and
the iterator state is one position: its
``get_state()`` is a small JSON-able dict, and ``set_state`` on a fresh iterator built with the
same arguments continues with exactly the batches the first would have produced.

Saving that state inside an Orbax checkpoint (Grain registers the handler when Orbax is present):
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data_iter=grain.checkpoint.CheckpointSave(train_iter)))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=grain.checkpoint.CheckpointRestore(train_iter)))  # restores train_iter in place
The handler writes ``process_<i>-of-<n>.json`` per process (i, n from ``jax.process_index/count``).
"""

from __future__ import annotations

import copy

import grain
import numpy as np

from jax_corrdiff.data.calendar import TIME_FEATURES, cyclic_time_features
from jax_corrdiff.data.errors import DataError
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.store import PreparedStore


class DownscalingSource:
    """Random-access source (grain ``RandomAccessDataSource`` protocol) over one split.

    ``split`` is "train" or "valid" (the periods of the data config the store was built from).
    The normalizer must describe the store's channels (e.g. from ``compute_stats``/``load_stats``,
    or from a checkpoint). Picklable: Zarr handles open lazily in each worker.
    A store built from forecast inputs (``data.lead_times``) also gives each sample
    ``lead_time_label`` (int32, index into ``lead_times``); ``lead_time_labels`` holds them all.
    """

    def __init__(self, store_path: str, split: str, normalizer: Normalizer):
        self._store = PreparedStore(store_path)
        store = self._store
        for group, ours in (
            ("target", store.target_channels),
            ("input", store.input_channels),
            ("static", store.static_channels),
        ):
            theirs = getattr(normalizer, f"{group}_channels")
            if tuple(theirs) != tuple(ours):
                raise DataError(
                    f"{store_path}: normalizer {group} channels {list(theirs)} differ from the store's {list(ours)}"
                )
        self.indices = store.split_indices(split)
        self.times = store.times[self.indices]
        self._time_features = cyclic_time_features(store.times)
        self.lat, self.lon = store.lat, store.lon
        self.data_config = store.config
        self.target_channels = store.target_channels
        self.img_lr_channels = store.input_channels + store.static_channels
        self._normalizer = normalizer
        self._static = normalizer.normalize_static(store.static).astype(np.float32)
        # Forecast inputs: the lead-time label of each sample (None for analysis inputs).
        self.lead_times = store.lead_times
        self.lead_time_labels = None if store.lead_time_labels is None else store.lead_time_labels[self.indices]
        self.folds = None  # cross-fitting fold of each sample (``with_folds``)
        self.regression_means_path = None  # (T, H, W, C_out) .npy by store index (``with_regression_means``)
        self._regression_means = None  # its memory map, opened on first read in each process
        self.reads_target = True  # False: samples leave ``target`` out (``without_target``)

    def __getstate__(self):
        return {**self.__dict__, "_regression_means": None}

    @property
    def store_identity(self) -> dict:
        """What identifies the prepared store's samples: its config hash, input fingerprint and
        sample count (``data.store``)."""
        attrs = self._store.attrs
        return {
            "config_hash": attrs["config_hash"],
            "input_fingerprint": attrs["input_fingerprint"],
            "samples": self.store_length,
        }

    @property
    def store_length(self) -> int:
        """Samples in the whole prepared store (both splits): the rows of a regression-means file."""
        return len(self._store.times)

    def with_folds(self, folds: np.ndarray) -> DownscalingSource:
        """A copy whose samples carry ``fold`` (one int per sample, in this source's order)."""
        folds = np.asarray(folds, np.int32)
        if folds.shape != (len(self),):
            raise ValueError(f"{self!r}: {folds.shape[0]} fold labels for {len(self)} samples")
        labelled = copy.copy(self)
        labelled.folds = folds
        return labelled

    def with_regression_means(self, path: str) -> DownscalingSource:
        """A copy whose samples carry ``regression_mean``: row ``time_index`` of the float32
        (store samples, H, W, C_out) array in the .npy file ``path``."""
        means = np.load(path, mmap_mode="r")
        expected = (self.store_length, *self.shape, len(self.target_channels))
        if means.shape != expected or means.dtype != np.float32:
            raise DataError(f"{path}: {means.dtype} {means.shape} regression means, expected float32 {expected}")
        carrying = copy.copy(self)
        carrying.regression_means_path, carrying._regression_means = path, None
        return carrying

    def without_target(self) -> DownscalingSource:
        """A copy whose samples leave out ``target``, which the store then does not read: for
        passes that need only a model's inputs (the regression means)."""
        inputs_only = copy.copy(self)
        inputs_only.reads_target = False
        return inputs_only

    def without_fold(self, fold: int) -> DownscalingSource:
        """A copy without the samples of ``fold`` (the training data of that fold's model)."""
        if self.folds is None:
            raise ValueError(f"{self!r} has no fold labels (with_folds)")
        keep = self.folds != fold
        subset = copy.copy(self)
        subset.indices, subset.times, subset.folds = self.indices[keep], self.times[keep], self.folds[keep]
        if self.lead_time_labels is not None:
            subset.lead_time_labels = self.lead_time_labels[keep]
        return subset

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        t = int(self.indices[i])
        sample = {"time_index": np.int64(t), "time_features": self._time_features[t]}
        if self.reads_target:
            target, inputs = self._store.read([t])
            sample["target"] = self._normalizer.normalize_target(target[0]).astype(np.float32)
        else:
            inputs = self._store.read_inputs([t])
        sample["img_lr"] = self._normalizer.img_lr(inputs[0], self._static)
        if self.lead_time_labels is not None:
            sample["lead_time_label"] = np.int32(self.lead_time_labels[i])
        if self.folds is not None:
            sample["fold"] = self.folds[i]
        if self.regression_means_path is not None:
            if self._regression_means is None:
                self._regression_means = np.load(self.regression_means_path, mmap_mode="r")
            sample["regression_mean"] = np.array(self._regression_means[t])
        return sample

    def __repr__(self) -> str:
        return f"DownscalingSource({self._store.path!r}, {len(self)} samples)"


READ_THREADS = 4  # threads reading samples in each process (or worker)
# Grain's default buffer (500 elements) is sized for small records; ours are whole batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * READ_THREADS)


class _GlobalOrderRows:
    """Local position j of process p -> the sample at global position
    (j // batch_size) * global_batch + p * batch_size + j % batch_size of the shuffled order."""

    def __init__(self, source, order, batch_size: int, process_index: int, process_count: int):
        self._source, self._order = source, order
        self._batch, self._offset = batch_size, process_index * batch_size
        self._global_batch = batch_size * process_count

    def __call__(self, j: int) -> dict:
        row, col = divmod(int(j), self._batch)
        return self._source[int(self._order[row * self._global_batch + self._offset + col])]


def make_train_iterator(
    source,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's rows of each global batch (``batch_size`` is
    per process; the global batch is ``batch_size * process_count``).

    All processes shuffle the same global order (``seed``, a new permutation every epoch) and
    process ``process_index`` takes rows ``[process_index * batch_size, (process_index + 1) *
    batch_size)`` of every global batch, so the concatenation over processes (in process order,
    the order of ``jax.devices()`` and so of the mesh) does not depend on ``process_count``.
    Batches run across epoch boundaries, so ``drop_remainder`` never loses samples of an epoch.
    ``worker_count > 0`` moves reading into that many processes (``mp_prefetch``).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if len(source) == 0:
        raise ValueError(f"no training samples ({source!r})")
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
    local_length = len(order) // (batch_size * process_count) * batch_size
    rows = _GlobalOrderRows(source, order, batch_size, process_index, process_count)
    ds = grain.MapDataset.range(local_length).map(rows).batch(batch_size, drop_remainder=True)
    it_ds = ds.to_iter_dataset(_READ_OPTIONS)
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


class _PadToLength:
    """Index i -> the shard's sample i with mask True, or a zero sample with mask False past its end."""

    def __init__(self, shard, blank: dict):
        self._shard, self._blank = shard, blank

    def __call__(self, i: int) -> dict:
        if i < len(self._shard):
            return {**self._shard[i], "mask": np.bool_(True)}
        return dict(self._blank)


def make_eval_iterator(
    source,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """One deterministic pass over this process's shard, in order, in fixed-shape batches.

    Every process yields ceil(ceil(N / process_count) / batch_size) batches (the largest
    shard's count), so processes stay in step; slots past a shard's end are zero samples with
    ``mask`` False and ``time_index`` -1. Averaging scores with ``mask`` counts every sample once.
    """
    shard = grain.MapDataset.source(source)[process_index::process_count]
    per_process = -(-len(source) // process_count)
    n_batches = -(-per_process // batch_size)
    h, w = source.shape
    target_shape = (h, w, len(source.target_channels))
    blank = {
        "img_lr": np.zeros((h, w, len(source.img_lr_channels)), np.float32),
        "time_index": np.int64(-1),
        "time_features": np.zeros(len(TIME_FEATURES), np.float32),
        "mask": np.bool_(False),
    }
    if source.reads_target:
        blank["target"] = np.zeros(target_shape, np.float32)
    if source.lead_time_labels is not None:
        blank["lead_time_label"] = np.int32(0)  # a valid label; the slot is masked out
    if source.folds is not None:
        blank["fold"] = np.int32(0)
    if source.regression_means_path is not None:
        blank["regression_mean"] = np.zeros(target_shape, np.float32)
    ds = grain.MapDataset.range(n_batches * batch_size).map(_PadToLength(shard, blank)).batch(batch_size)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))
