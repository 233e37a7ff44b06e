"""Grain input pipeline over a prepared store.

Samples are dicts of float32 NumPy arrays, normalized, NHWC:
    target      (H, W, C_out)
    img_lr      (H, W, C_in + C_static)   [inputs | static], the conditioning image
    time_index  int64, index into the prepared store's time axis (to find the time again)
Batches add a leading batch axis; eval batches also carry ``mask`` (B,) bool.

Training iterator = MapDataset.source -> shard [process_index::process_count] -> shuffle(seed)
-> repeat (a new permutation every epoch) -> batch(drop_remainder) -> to_iter_dataset (read
threads) [-> mp_prefetch]. Batches are cut before ``to_iter_dataset``, so batch k holds the same
samples whatever the thread or worker count, and the iterator state is one position: its
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

import grain
import numpy as np

from jax_corrdiff.data.errors import DataError
from jax_corrdiff.data.normalization import Normalizer
from jax_corrdiff.data.prepare import PreparedStore


class DownscalingSource:
    """Random-access source (grain ``RandomAccessDataSource`` protocol) over one split.

    ``split`` is "train" or "valid" (the periods of the data config the store was built from).
    The normalizer must describe the store's channels (e.g. from ``compute_stats``/``load_stats``,
    or from a checkpoint). Picklable: Zarr handles open lazily in each worker.
    """

    def __init__(self, store_path: str, split: str, normalizer: Normalizer):
        self._store = PreparedStore(store_path)
        store = self._store
        for group, ours in (("target", store.target_channels), ("input", store.input_channels),
                            ("static", store.static_channels)):
            theirs = getattr(normalizer, f"{group}_channels")
            if tuple(theirs) != tuple(ours):
                raise DataError(f"{store_path}: normalizer {group} channels {list(theirs)} differ from the "
                                f"store's {list(ours)}")
        self.indices = store.split_indices(split)
        self.times = store.times[self.indices]
        self.lat, self.lon = store.lat, store.lon
        self.target_channels = store.target_channels
        self.img_lr_channels = store.input_channels + store.static_channels
        self._normalizer = normalizer
        self._static = normalizer.normalize_static(store.static).astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return self.lat.shape

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        t = int(self.indices[i])
        target, inputs = self._store.read([t])
        img_lr = np.concatenate([self._normalizer.normalize_inputs(inputs[0]), self._static], axis=-1)
        return {
            "target": self._normalizer.normalize_target(target[0]).astype(np.float32),
            "img_lr": img_lr.astype(np.float32),
            "time_index": np.int64(t),
        }

    def __repr__(self) -> str:
        return f"DownscalingSource({self._store.path!r}, {len(self)} samples)"


def _read_options(read_threads: int) -> grain.ReadOptions:
    # Grain's default buffer (500 elements) is sized for small records; ours are whole batches.
    return grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2, 2 * read_threads))


def make_train_iterator(
    source,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 4,
) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's shard (``batch_size`` is per process).

    Each process takes samples ``process_index::process_count`` (disjoint shards). Batches run
    across epoch boundaries, so ``drop_remainder`` never loses samples of an epoch.
    ``worker_count > 0`` moves reading into that many processes (``mp_prefetch``).
    """
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(f"process {process_index} of {process_count} has no training samples ({source!r})")
    ds = ds.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    it_ds = ds.to_iter_dataset(_read_options(read_threads))
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
    read_threads: int = 4,
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
    blank = {
        "target": np.zeros((h, w, len(source.target_channels)), np.float32),
        "img_lr": np.zeros((h, w, len(source.img_lr_channels)), np.float32),
        "time_index": np.int64(-1),
        "mask": np.bool_(False),
    }
    ds = grain.MapDataset.range(n_batches * batch_size).map(_PadToLength(shard, blank)).batch(batch_size)
    return iter(ds.to_iter_dataset(_read_options(read_threads)))
