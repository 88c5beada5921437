"""Bad input gets a clear error naming the fix, and never corrupts the weights."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders


class WeightWatch(Callback):
    """Records, for every batch, whether the weights changed during it."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        after = list(pl_module.parameters())
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(after, self._before)))
        assert all(torch.isfinite(p).all() for p in after)


class PoisonedEvaluation(DigitsClassifier):
    """Returns a non-finite loss on chosen calls of training_step (counted over all evaluations)."""

    def __init__(self, poisoned_calls: set[int], value: float) -> None:
        super().__init__(lr=3e-4, momentum=0.9)
        self.poisoned_calls = poisoned_calls
        self.value = value
        self.calls = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.calls += 1
        return loss * self.value if self.calls in self.poisoned_calls else loss


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_perturbed_loss_skips_the_step_and_leaves_weights_untouched(value: float) -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    # calls: 1 probe, then 2 per step (official pass at +eps, the -eps pass); poison the -eps pass of step 3
    # and the official pass of step 5 (no input subspaces: their observation forwards would add calls)
    model = PoisonedEvaluation(poisoned_calls={1 + 2 * 2 + 2, 1 + 2 * 4 + 1}, value=value)
    watch = WeightWatch()
    strategy = NoBackpropStrategy(algorithm=MeZO(directions=1, input_subspace=None))
    trainer = pl.Trainer(
        strategy=strategy, max_steps=8, log_every_n_steps=1, callbacks=[watch], **quiet_trainer_kwargs()
    )
    trainer.fit(model, train)
    assert watch.changed == [True, True, False, True, False, True, True, True]
    assert strategy.skipped_steps == 2
    assert float(trainer.logged_metrics["nobp/skipped_steps"]) == 2


def test_a_non_finite_loss_inside_an_accumulation_window_skips_the_whole_step() -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    model = PoisonedEvaluation(poisoned_calls={1 + 2}, value=float("nan"))  # first micro-batch of step 1
    watch = WeightWatch()
    strategy = NoBackpropStrategy(algorithm=MeZO(directions=1, input_subspace=None))
    trainer = pl.Trainer(
        strategy=strategy, max_steps=3, accumulate_grad_batches=2, callbacks=[watch], **quiet_trainer_kwargs()
    )
    trainer.fit(model, train)
    assert watch.changed == [False, False, False, True, False, True]
    assert strategy.skipped_steps == 1


class ReturnsNone(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        return None


def test_training_step_returning_none_skips_the_step_as_lightning_does() -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders()
    watch = WeightWatch()
    trainer = pl.Trainer(strategy=NoBackpropStrategy(), max_steps=3, callbacks=[watch], **quiet_trainer_kwargs())
    trainer.fit(ReturnsNone(), train)
    assert watch.changed and not any(watch.changed)


class DictWithoutLoss(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        return {"value": super().training_step(batch, batch_idx)}


def test_a_dict_without_loss_is_refused() -> None:
    train, _ = digits_loaders()
    model = DictWithoutLoss()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(strategy=NoBackpropStrategy(), max_steps=2, **quiet_trainer_kwargs())
    with pytest.raises(MisconfigurationException, match="'loss' key needs to be present"):
        trainer.fit(model, train)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


class PerSampleLoss(DigitsClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


def test_a_non_scalar_loss_is_refused_with_the_fix() -> None:
    train, _ = digits_loaders()
    model = PerSampleLoss()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(strategy=NoBackpropStrategy(), max_steps=2, **quiet_trainer_kwargs())
    with pytest.raises(ValueError, match=r"scalar loss.*loss\.mean\(\)"):
        trainer.fit(model, train)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_fp16_mixed_precision_is_refused_at_setup_saying_why() -> None:
    train, _ = digits_loaders()
    scaler = torch.amp.GradScaler("cpu")
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(),
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
        max_steps=2,
        **quiet_trainer_kwargs(),
    )
    with pytest.raises(ValueError, match=r"16-mixed.*scaler.*bf16-mixed"):
        trainer.fit(DigitsClassifier(), train)


class ManualBackward(DigitsClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


def test_manual_backward_is_refused_with_the_closure_fix() -> None:
    train, _ = digits_loaders()
    trainer = pl.Trainer(strategy=NoBackpropStrategy(), max_steps=2, **quiet_trainer_kwargs())
    with pytest.raises(RuntimeError, match=r"optimizer\.step\(closure\)"):
        trainer.fit(ManualBackward(), train)


class ManualWithClosure(DigitsClassifier):
    """Manual optimization written the way the error message suggests."""

    def __init__(self) -> None:
        super().__init__(lr=3e-4)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch

        def closure():
            loss = F.cross_entropy(self(x), y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            return loss

        loss = optimizer.step(closure)
        self.log("train_loss", loss)


def test_manual_optimization_with_a_closure_trains(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders()
    model = ManualWithClosure()
    trainer = pl.Trainer(strategy=NoBackpropStrategy(), max_epochs=60, **quiet_trainer_kwargs())
    before = trainer.test(model, test, verbose=False)[0]["test_acc"]
    trainer.fit(model, train)
    after = trainer.test(model, test, verbose=False)[0]["test_acc"]
    assert trainer.global_step == 60 * 12
    assert after > before + 0.3


class Frozen(DigitsClassifier):
    def configure_optimizers(self):
        for p in self.parameters():
            p.requires_grad_(False)
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_with_no_trainable_parameters_is_refused() -> None:
    train, _ = digits_loaders()
    trainer = pl.Trainer(strategy=NoBackpropStrategy(), max_steps=2, **quiet_trainer_kwargs())
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer.fit(Frozen(), train)


def test_non_positive_eps_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="eps must be a positive"):
        NoBackpropStrategy(algorithm=MeZO(eps=0.0))
