"""Resumable training checkpoints (Orbax CheckpointManager, one step per folder, async, keep-N):
state/   TrainState (params, EMA, optimizer state, step)
data/    the Grain iterator state, so a resumed run sees the same sample stream
meta/    JSON: run config, model config, normalization statistics
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp


class TrainingCheckpoints:
    """Periodic, asynchronous, keep-N training checkpoints of state + data iterator + metadata."""

    def __init__(self, directory: str, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        """Restore into ``abstract_state``'s structure and shardings; the iterator in place."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
