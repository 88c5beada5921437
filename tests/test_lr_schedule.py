"""``GPTLanguageModel``'s learning-rate schedule: cosine decay over steps, or over the Trainer's time budget."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from lightning_nobp.models import GPTLanguageModel

from conftest import quiet_trainer_kwargs


def _tiny(**schedule: object) -> GPTLanguageModel:
    return GPTLanguageModel(preset="tiny", n_layer=1, n_embd=16, n_head=2, block_size=8, lr=1.0, **schedule)


def _attach(model: GPTLanguageModel, **trainer_kwargs: object) -> pl.Trainer:
    trainer = pl.Trainer(**quiet_trainer_kwargs(**trainer_kwargs))
    model.trainer = trainer
    return trainer


def test_decay_over_max_time_follows_the_time_spent_not_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny(decay_over_max_time=True, decay_steps=1000, min_lr_ratio=0.1)
    trainer = _attach(model, max_time={"seconds": 100})
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    spent = {"seconds": 0.0}
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": spent["seconds"])
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    expected = {25.0: 0.1 + 0.9 * 0.5 * (1 + 2**-0.5), 50.0: 0.55, 100.0: 0.1, 150.0: 0.1}
    for seconds, lr in expected.items():
        spent["seconds"] = seconds
        optimizer.step()
        scheduler.step()  # one step each: decay_steps=1000 would have barely moved the rate
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_decay_over_steps_is_unchanged() -> None:
    model = _tiny(decay_steps=4, min_lr_ratio=0.1)
    _attach(model, max_time={"seconds": 100})
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(k * torch.pi / 4)).item())
                                   for k in range(1, 5)] + [0.1])  # fmt: skip


def test_decay_over_max_time_without_a_budget_names_the_fix() -> None:
    model = _tiny(decay_over_max_time=True)
    _attach(model, max_steps=5)
    with pytest.raises(ValueError, match="max_time"):
        model.configure_optimizers()
