"""``MetricTimeline``: a callback recording validation metrics against training seconds and forward passes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def forwards_per_micro_batch(trainer: pl.Trainer) -> int:
    """Loss evaluations per training micro-batch: the strategy's population (and official pass), else one."""
    engine = getattr(trainer.strategy, "engine", None)
    if engine is None:
        return 1
    members = int(engine.algorithm.forwards_per_step)
    reused = trainer.strategy.official_pass_is_a_member(members)
    return members + (0 if reused else 1)


class MetricTimeline(Callback):
    """Write one JSON record per validation run: step, training seconds, forward passes and the ``val_*`` metrics.

    Training seconds exclude the time spent validating, so a forward-only run and its backprop twin are compared on
    the time they spent training. Forward passes count the loss evaluations of the training steps: the population
    (plus the official pass when it is not reused) under ``NoBackpropStrategy``, one per micro-batch otherwise (a
    backprop step also runs one backward pass, about two forwards of compute).

    Args:
        path: the JSON file, rewritten after every validation run.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.forwards = 0
        self._forwards_per_step = 1
        self._started = 0.0
        self._validation_started = 0.0
        self._validation_seconds = 0.0

    def _training_seconds(self) -> float:
        return time.perf_counter() - self._started - self._validation_seconds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records, self.forwards, self._validation_seconds = [], 0, 0.0
        self._forwards_per_step = forwards_per_micro_batch(trainer)
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.forwards += self._forwards_per_step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validation_seconds += time.perf_counter() - self._validation_started
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        self.records.append(
            dict(step=trainer.global_step, seconds=self._training_seconds(), forwards=self.forwards, **metrics)
        )
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.records, indent=1))
