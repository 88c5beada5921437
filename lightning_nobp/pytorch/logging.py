"""Helpers to call a LightningModule's ``training_step`` again without duplicating its logs, and to log ours."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_nobp.perturb.objective import objective_of


def _discard(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Shadow ``module.log``/``log_dict`` with no-ops, so extra evaluations of ``training_step`` log nothing."""
    module.__dict__["log"] = _discard
    module.__dict__["log_dict"] = _discard
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def loss_from_step_output(output: Any) -> Tensor | None:
    """The loss inside a ``training_step`` output: the tensor itself, ``output["loss"]``, or ``-mean(reward)`` for a
    ``{"reward": r}`` output (``lightning_nobp.perturb.objective``); ``None`` if absent."""
    return objective_of(output)


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether the logger writes this step's values (Lightning's own ``log_every_n_steps`` decision).

    ``self.log`` can cost more per call than a small model's forward pass, so the strategy
    logs its own metrics only on the steps that reach the logger (the progress bar shows the latest values).
    """
    return trainer._logger_connector.should_update_logs


def log_step_metrics(module: pl.LightningModule, metrics: Mapping[str, float], prog_bar: frozenset[str]) -> None:
    """Log ``metrics`` at this training step from outside ``training_step`` (e.g. from ``Strategy.backward``).

    Args:
        module: the LightningModule being trained.
        metrics: names and values to log.
        prog_bar: the names that also go to the progress bar.
    """
    previous = module._current_fx_name
    module._current_fx_name = "training_step"
    try:
        for name, value in metrics.items():
            module.log(name, float(value), on_step=True, on_epoch=False, prog_bar=name in prog_bar, batch_size=1)
    finally:
        module._current_fx_name = previous
