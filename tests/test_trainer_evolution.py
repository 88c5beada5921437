"""EggRoll and OpenES through the Trainer on an unmodified digits classifier, backprop banned."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

from lightning_nobp import EstimatorExtras, ExecutionOptions
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, OpenES

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


class AdamDigits(DigitsClassifier):
    """The same user module with Adam, the usual optimizer for ES estimates."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(lr=lr)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def fit_and_test(algorithm, max_epochs: int, **kwargs) -> tuple[float, float, pl.Trainer, dict]:
    pl.seed_everything(0)
    train, test = digits_loaders(batch_size=256)
    model = AdamDigits(**kwargs)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=algorithm),
        max_epochs=max_epochs,
        max_time={"minutes": 3},
        log_every_n_steps=5,
        **quiet_trainer_kwargs(),
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    logged = dict(trainer.logged_metrics)
    return trainer.test(model, test, verbose=False)[0]["test_acc"], seconds, trainer, logged


@pytest.mark.slow
def test_eggroll_reaches_95_percent_on_digits_within_three_minutes(no_backprop: None) -> None:
    accuracy, seconds, trainer, logged = fit_and_test(EggRoll(population=64, rank=1, sigma=1e-2), max_epochs=70)
    print(f"digits EggRoll: test accuracy {accuracy:.3f} after {trainer.global_step} steps in {seconds:.1f} s")
    assert seconds < 185 and accuracy >= 0.95
    for name in ("fitness_mean", "fitness_std", "fitness_best", "update_norm", "members_per_second"):
        assert f"nobp/{name}" in logged, name
    assert float(logged["nobp/fitness_best"]) <= float(logged["nobp/fitness_mean"])
    assert float(logged["nobp/forwards_per_step"]) == 65  # the members, batched, and the unperturbed official pass


@pytest.mark.slow
def test_openes_also_learns_digits(no_backprop: None) -> None:
    accuracy, seconds, trainer, _ = fit_and_test(OpenES(population=30, sigma=0.05), max_epochs=30, lr=1e-2)
    print(f"digits OpenES: test accuracy {accuracy:.3f} after {trainer.global_step} steps in {seconds:.1f} s")
    assert accuracy >= 0.8


class NaNMember(AdamDigits):
    """Returns NaN on one chosen evaluation (counted over all calls of training_step)."""

    def __init__(self, poisoned_call: int) -> None:
        super().__init__()
        self.poisoned_call = poisoned_call
        self.calls = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.calls += 1
        return loss * float("nan") if self.calls == self.poisoned_call else loss


def test_a_nan_member_drops_its_pair_and_the_step_goes_on() -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders(batch_size=256)
    model = NaNMember(poisoned_call=1 + 8 + 4)  # probe, step 0 (8 members), then member 3 of step 1
    # one member per call, so that the poisoned call is exactly one member
    strategy = NoBackpropStrategy(
        algorithm=EggRoll(population=8, extras=EstimatorExtras(input_subspace=None)),
        execution=ExecutionOptions(population_batching=False),
    )
    trainer = pl.Trainer(strategy=strategy, max_steps=3, log_every_n_steps=1, **quiet_trainer_kwargs())
    dropped: list[float] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
            dropped.append(float(trainer.logged_metrics["nobp/dropped_members"]))

    trainer.callbacks.append(Spy())
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, train)
    assert dropped == [0.0, 2.0, 0.0]
    assert strategy.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("alias, cls", [("nobp_eggroll", EggRoll), ("nobp_openes", OpenES)])
def test_es_aliases(alias: str, cls: type) -> None:
    assert alias in StrategyRegistry
    trainer = pl.Trainer(strategy=alias, **quiet_trainer_kwargs(max_steps=1))
    assert isinstance(trainer.strategy, NoBackpropStrategy) and isinstance(trainer.strategy.algorithm, cls)
