"""The unmodified digits classifier trained by EggRoll with low-bit weights, against the same run in bf16."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch

from lightning_nobp import EstimatorExtras
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
            algorithm=EggRoll(population=512, sigma=1e-2, extras=EstimatorExtras(per_row_estimates=False)),
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


def _fabric_fp8_steps(steps: int) -> list[torch.Tensor]:
    """A few EggRoll steps of a small fp8 MLP in Fabric; the stored fp8 codes of its weights afterwards."""
    import lightning as L
    import torch.nn.functional as F

    fabric = L.Fabric(
        accelerator="cpu",
        devices=1,
        strategy=FabricNoBackpropStrategy(algorithm=EggRoll(population=8), direct_step="normalized"),
        plugins=[FabricLowBitPrecision("fp8_e4m3")],
    )
    fabric.seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    inner = model.module if hasattr(model, "module") else model
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(steps):

        def closure() -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            return loss

        optimizer.step(closure)
    return [layout_of(inner[i].weight).qdata.view(torch.uint8).clone() for i in (0, 2)]


def test_a_step_updates_every_fp8_weight_in_one_launch(monkeypatch: pytest.MonkeyPatch, no_backprop: None) -> None:
    """The update of a step reaches the low-bit kernel once for all fp8 weights, with the bits of the twin's
    weight-by-weight route (the Triton kernel runs in the interpreter here, as on CUDA)."""
    from lightning_nobp.kernels import lowbit_update
    from lightning_nobp.kernels.triton_support import interpreting

    if not interpreting():
        pytest.skip("needs Triton with TRITON_INTERPRET=1")
    twin = _fabric_fp8_steps(2)
    launches: list[int] = []
    kernel = lowbit_update.triton_grouped_update

    def counted(layouts, terms, seeds) -> None:
        launches.append(len(layouts))
        kernel(layouts, terms, seeds)

    monkeypatch.setattr(lowbit_update, "use_triton", lambda device: True)
    monkeypatch.setattr(lowbit_update, "triton_grouped_update", counted)
    fused = _fabric_fp8_steps(2)
    assert launches == [2, 2]  # one launch per step, both fp8 weights in it
    assert all(torch.equal(a, b) for a, b in zip(fused, twin))
