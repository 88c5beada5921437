"""The unmodified digits classifier trained by EggRoll with low-bit weights, against the same run in bf16."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch

from lightning_nobp import LowBitPrecision, NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.fabric import LowBitPrecision as FabricLowBitPrecision
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy
from lightning_nobp.lowbit import is_low_bit, layout_of

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders

EPOCHS = 30  # 180 steps of 256 examples


def fit_digits(weights: str, **precision_kwargs) -> tuple[float, float, DigitsClassifier]:
    """Same seeds, data order and steps for every format; returns (test accuracy, seconds, model)."""
    pl.seed_everything(0)
    train, test = digits_loaders(batch_size=256)
    model = DigitsClassifier(lr=3e-3, momentum=0.0, step_size=10**9)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(
            # the bar compares weight formats with the same estimator: per-row estimates off for all of them
            algorithm=EggRoll(population=512, sigma=1e-2, per_row_estimates=False),
            direct_step="normalized",
        ),
        plugins=[LowBitPrecision(weights, **precision_kwargs)],
        max_epochs=EPOCHS,
        **quiet_trainer_kwargs(),
    )
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, test, verbose=False)[0]["test_acc"]
    print(f"digits EggRoll {weights}: test accuracy {accuracy:.4f} after {trainer.global_step} steps, {seconds:.1f} s")
    return accuracy, seconds, model


@pytest.fixture(scope="module")
def bf16_accuracy() -> float:
    return fit_digits("bf16")[0]


@pytest.mark.slow
def test_fp8_weights_train_within_two_points_of_bf16(bf16_accuracy: float, no_backprop: None) -> None:
    accuracy, seconds, model = fit_digits("fp8_e4m3")
    assert layout_of(model.net[0].weight).kind == "fp8_e4m3"
    assert accuracy >= 0.93 and seconds < 240
    assert accuracy >= bf16_accuracy - 0.02


@pytest.mark.slow
def test_nvfp4_weights_train_within_five_points_of_bf16(bf16_accuracy: float, no_backprop: None) -> None:
    accuracy, _, model = fit_digits("nvfp4")
    assert layout_of(model.net[0].weight).kind == "nvfp4"
    assert accuracy >= bf16_accuracy - 0.05


@pytest.mark.slow
def test_int8_lattice_training_reaches_85_percent(no_backprop: None) -> None:
    accuracy, _, model = fit_digits("int8_lattice", lattice_threshold=1.0)
    weight = layout_of(model.net[0].weight)
    assert weight.kind == "int8" and int(weight.qdata.abs().max()) <= 127
    assert accuracy >= 0.85


def test_fabric_trains_fp8_weights_with_an_optimizer_built_before_setup(no_backprop: None) -> None:
    import lightning as L
    import torch.nn.functional as F

    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        strategy=FabricNoBackpropStrategy(algorithm=EggRoll(population=32), direct_step="normalized"),
        plugins=[FabricLowBitPrecision("fp8_e4m3")],
    )
    fabric.launch()
    fabric.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)  # built before setup: points at the fp32 weights
    model, optimizer = fabric.setup(model, optimizer)
    assert is_low_bit(model.module[0].weight if hasattr(model, "module") else model[0].weight)
    train, test = digits_loaders(batch_size=256)
    losses = []
    for _ in range(6):
        for x, y in train:
            x, y = fabric.to_device((x, y))

            def closure() -> torch.Tensor:
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss)
                return loss

            losses.append(float(optimizer.step(closure)))
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5  # learning (36 steps of a fresh MLP)
