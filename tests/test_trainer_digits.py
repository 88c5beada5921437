"""Acceptance: an unmodified digits classifier learns with MeZO through the Trainer, backprop banned."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


@pytest.mark.slow
def test_mezo_reaches_85_percent_on_digits_within_two_minutes(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders()
    model = DigitsClassifier(step_size=150)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(eps=1e-3)),
        max_epochs=400,
        max_time={"minutes": 2},
        **quiet_trainer_kwargs(),
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    elapsed = time.perf_counter() - start
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    print(f"digits MeZO: test accuracy {accuracy:.3f} after {trainer.global_step} steps in {elapsed:.1f} s")
    assert elapsed < 125
    assert accuracy >= 0.85
    # the scheduler ran: StepLR(step_size=150 epochs, gamma=0.5) halved the lr twice in 400 epochs
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-4 * 0.25)
