"""``NoBackpropStrategy(cpu_tuning=CpuTuning())``: the objects of the process are frozen while training runs
(``gc.freeze``) and handed back when it ends, also after an exception; objects frozen by others are left alone."""

from __future__ import annotations

import gc

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_nobp import CpuTuning
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.gc_freeze import StartupObjectsFreeze

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


@pytest.fixture(autouse=True)
def nothing_frozen_around_each_test():
    assert gc.get_freeze_count() == 0
    yield
    gc.unfreeze()


class FreezeCount(Callback):
    def __init__(self, fail_at: int | None = None) -> None:
        self.counts: list[int] = []
        self.fail_at = fail_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts.append(gc.get_freeze_count())
        if trainer.global_step == self.fail_at:
            raise RuntimeError("the user's callback failed")


def _fit(strategy: NoBackpropStrategy, probe: FreezeCount) -> None:
    train, _ = digits_loaders(batch_size=64)
    trainer = pl.Trainer(strategy=strategy, max_steps=3, callbacks=[probe], **quiet_trainer_kwargs())
    trainer.fit(DigitsClassifier(), train)


def test_objects_are_frozen_while_training_and_released_after() -> None:
    probe = FreezeCount()
    _fit(NoBackpropStrategy(EggRoll(population=4), cpu_tuning=CpuTuning(freeze_startup_objects=True)), probe)
    assert len(probe.counts) == 3 and min(probe.counts) > 100_000  # the imported modules, functions, the model
    assert gc.get_freeze_count() == 0


def test_released_after_an_exception_and_untouched_when_switched_off() -> None:
    probe = FreezeCount(fail_at=1)
    with pytest.raises(RuntimeError, match="callback failed"):
        _fit(NoBackpropStrategy(EggRoll(population=4), cpu_tuning=CpuTuning(freeze_startup_objects=True)), probe)
    assert probe.counts[0] > 0 and gc.get_freeze_count() == 0
    probe = FreezeCount()
    _fit(NoBackpropStrategy(EggRoll(population=4)), probe)  # the default: the collector is left alone
    assert probe.counts == [0, 0, 0]


def test_objects_frozen_by_someone_else_stay_frozen() -> None:
    gc.freeze()
    theirs = gc.get_freeze_count()
    freezer = StartupObjectsFreeze()
    freezer.freeze()
    freezer.release()
    assert not freezer.frozen and gc.get_freeze_count() == theirs
