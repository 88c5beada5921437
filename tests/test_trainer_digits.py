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


def test_batched_loader_yields_the_rows_a_per_sample_index_would_in_the_same_order() -> None:
    import torch
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    from lightning_nobp.data import load_digits_split
    from lightning_nobp.data.digits import RowBatches, batched_loader

    train, _ = load_digits_split()
    torch.manual_seed(3)
    batches = list(batched_loader(train, 256, shuffle=True))
    torch.manual_seed(3)
    plain = DataLoader(train, sampler=BatchSampler(RandomSampler(train), 256, drop_last=False), batch_size=None)
    expected = list(plain)
    assert [len(x) for x, _ in batches] == [256] * 5 + [len(train) - 5 * 256]
    for (x, y), (x_expected, y_expected) in zip(batches, expected, strict=True):
        assert torch.equal(x, x_expected) and torch.equal(y, y_expected)
    rows = RowBatches(*train.tensors)
    assert torch.equal(rows[7][0], train[7][0]) and int(rows[7][1]) == int(train[7][1])
