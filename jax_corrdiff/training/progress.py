"""Training progress on process 0: terminal lines, TensorBoard scalars, ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
from tensorboardX import SummaryWriter

log = logging.getLogger("jax_corrdiff")


class Progress:
    """Terminal progress (step, samples/s, loss, ETA), TensorBoard scalars and a
    ``metrics.jsonl`` history (one JSON object per logged step), on process 0."""

    def __init__(self, stage: str, directory: str, start: int, total: int, global_batch: int):
        self.stage, self.start, self.total, self.batch = stage, start, total, global_batch
        self.t0 = self.t_last = time.time()
        self.step_last = start
        self.writer = self.history = None
        if jax.process_index() == 0:
            self.writer = SummaryWriter(os.path.join(directory, "tensorboard"))
            self.history = open(os.path.join(directory, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{self.stage}/{name}", value, step)
            self.writer.flush()
            self.history.write(json.dumps({"step": step, **values}) + "\n")
            self.history.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        rate = (step - self.step_last) * self.batch / max(now - self.t_last, 1e-9)
        elapsed_steps = step - self.start
        eta = (now - self.t0) / max(elapsed_steps, 1) * (self.total - step)
        self.t_last, self.step_last = now, step
        log.info(
            "%s step %d/%d | %.1f samples/s | loss %.5f | grad norm %.3g | lr %.3g | ETA %s",
            self.stage,
            step,
            self.total,
            rate,
            metrics["loss"],
            metrics["grad_norm"],
            metrics["learning_rate"],
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
        if metrics["nonfinite_grads"]:
            log.warning(
                "%s step %d: %d non-finite gradient entries were zeroed", self.stage, step, metrics["nonfinite_grads"]
            )
        self.scalars(step, {**metrics, "samples_per_second": rate})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.history.close()
