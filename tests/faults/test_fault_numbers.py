"""Numbers that go bad: bursts of NaN/inf losses, inf in the data, a flat fitness, losses of 1e30, low-bit weights
pushed past their format's range. The weights never become non-finite, skipped steps are counted and logged, and
training goes on once the numbers recover."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor

import fault_worker
from conftest import quiet_trainer_kwargs
from lightning_nobp import LowBitPrecision, NoBackpropStrategy
from lightning_nobp.data import load_digits_split
from lightning_nobp.lowbit import is_low_bit
from lightning_nobp.lowbit.formats import inner_tensors, layout_of

BURST = {2, 3, 4}  # the optimizer steps whose numbers go bad
STEPS = 8


def values(param: Tensor) -> Tensor:
    """A weight's values in float32 (low-bit weights dequantized)."""
    return (param.dequantize() if is_low_bit(param) else param.detach()).float()


def stored(param: Tensor) -> list[Tensor]:
    """A weight's stored tensors (low-bit: data and scales)."""
    return list(inner_tensors(param).values()) if is_low_bit(param) else [param.detach()]


class WeightWatch(pl.Callback):
    """After every batch: the weights are finite (checked on their stored bytes too), and how much they moved."""

    def __init__(self) -> None:
        self.changed: list[bool] = []
        self.largest_change: list[float] = []
        self._before: list[Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = [values(p).clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        after = [values(p) for p in pl_module.parameters()]
        for param in pl_module.parameters():
            for tensor in stored(param):
                assert torch.isfinite(tensor.float()).all(), f"non-finite weight after step {trainer.global_step}"
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(after, self._before)))
        self.largest_change.append(max(float((a - b).abs().max()) for a, b in zip(after, self._before)))


class BadNumbers(fault_worker.TinyMLP):
    """The loss of every evaluation during ``BURST`` steps is multiplied by ``factor`` (or, with ``flat``, replaced
    by a constant: every member gets the same fitness)."""

    def __init__(self, factor: float = 1.0, flat: bool = False, optimizer: str = "sgd", lr: float = 1e-2) -> None:
        super().__init__(optimizer, lr)
        self.factor, self.flat = factor, flat

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step not in BURST:
            return loss
        return loss * 0.0 + 1.0 if self.flat else loss * self.factor


def fit(
    model: pl.LightningModule,
    algorithm: str,
    poison: dict[str, Any] | None = None,
    weights: str = "fp32",
    **strategy_kwargs: Any,
) -> tuple[pl.Trainer, NoBackpropStrategy, WeightWatch]:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    train, _ = load_digits_split()
    loader = fault_worker.ResumableBatches(*train.tensors, batch_size=128, poison=poison)
    gradient_clip_val = strategy_kwargs.pop("gradient_clip_val", None)
    strategy = NoBackpropStrategy(algorithm=fault_worker.make_algorithm(algorithm), **strategy_kwargs)
    watch = WeightWatch()
    trainer = pl.Trainer(
        strategy=strategy,
        plugins=[] if weights == "fp32" else [LowBitPrecision(weights)],
        max_steps=STEPS,
        log_every_n_steps=1,
        gradient_clip_val=gradient_clip_val,
        callbacks=[watch],
        **quiet_trainer_kwargs(),
    )
    trainer.fit(model, loader)
    return trainer, strategy, watch


def moved_outside_the_burst() -> list[bool]:
    """For every step, whether the weights should change: everywhere but during the burst."""
    return [step not in BURST for step in range(STEPS)]


@pytest.mark.parametrize("algorithm", ["mezo", "eggroll", "openes", "fgrad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_burst_of_non_finite_losses_is_skipped_counted_logged_and_training_resumes(
    algorithm: str, value: float, faults: Any
) -> None:
    faults.inject(f"{value} loss", len(BURST))
    trainer, strategy, watch = fit(BadNumbers(factor=value), algorithm)
    assert watch.changed == moved_outside_the_burst()  # frozen during the burst, learning before and after
    assert int(strategy.skipped_steps) == len(BURST)
    assert float(trainer.logged_metrics["nobp/skipped_steps"]) == len(BURST)
    assert trainer.global_step == STEPS


@pytest.mark.parametrize("algorithm", ["mezo", "eggroll"])
def test_inf_in_the_data_is_skipped_and_training_resumes(algorithm: str, faults: Any) -> None:
    faults.inject("inf in the data", len(BURST))
    poison = {"ranks": [0], "batches": sorted(BURST), "value": "inf"}
    trainer, strategy, watch = fit(fault_worker.TinyMLP(), algorithm, poison=poison)
    assert watch.changed == moved_outside_the_burst()
    assert int(strategy.skipped_steps) == len(BURST)
    assert float(trainer.logged_metrics["nobp/skipped_steps"]) == len(BURST)


@pytest.mark.parametrize(
    "algorithm",
    [
        "mezo",
        "fgrad",
        "openes",  # z-score shaping: all zeros for equal fitness
        "eggroll",  # centered ranks: tied members share their mean rank, so equal fitness gives zeros
    ],
)
def test_a_flat_fitness_moves_no_weight_and_is_not_a_failure(algorithm: str, faults: Any) -> None:
    """Every member scores the same: no direction is better than another, so no step (and no 0/0 anywhere)."""
    faults.inject("all-equal fitness", len(BURST))
    trainer, strategy, watch = fit(BadNumbers(flat=True), algorithm)  # the watch fails on any non-finite weight
    assert int(strategy.skipped_steps) == 0  # not an error: the estimate is zero
    assert watch.changed == moved_outside_the_burst()


@pytest.mark.parametrize(
    "algorithm, optimizer, options",
    [
        ("mezo", "adam", {}),  # Adam's step is bounded by its lr whatever the loss
        # the user's clipping bounds SGD (a 1e30 estimate's float32 norm overflows to inf: the clipped step is zero)
        ("mezo", "sgd", {"gradient_clip_val": 1.0, "step_limit": None}),
        ("eggroll", "sgd", {"direct_step": "normalized", "update": "direct"}),  # rank shaping: scale-free
    ],
)
def test_losses_of_1e30_keep_the_weights_finite_and_the_steps_bounded(
    algorithm: str, optimizer: str, options: dict[str, Any], faults: Any
) -> None:
    faults.inject("1e30 loss", len(BURST))
    lr = 1e-2
    trainer, strategy, watch = fit(BadNumbers(factor=1e30, optimizer=optimizer, lr=lr), algorithm, **options)
    after_burst = watch.changed[max(BURST) + 1:]
    assert watch.changed[: min(BURST)] and all(watch.changed[: min(BURST)]) and all(after_burst)  # learning goes on
    assert int(strategy.skipped_steps) == 0  # 1e30 is finite: not a skipped step
    # no weight moves by more than a few learning rates in one step (Adam: lr / sqrt(1 - beta2) at worst)
    assert max(watch.largest_change) <= 32 * lr, watch.largest_change


@pytest.mark.parametrize("weights", ["fp8_e4m3", "nvfp4"])
def test_low_bit_weights_pushed_past_their_range_saturate_instead_of_becoming_nan(weights: str, faults: Any) -> None:
    """A learning rate of 1e4 drives every weight far beyond what its format and scale can hold."""
    faults.inject(f"{weights} saturation", STEPS)
    model = BadNumbers(optimizer="sgd", lr=1e4)
    before = {name: values(p).abs().max() for name, p in model.named_parameters()}
    trainer, strategy, watch = fit(model, "mezo", weights=weights, step_limit=None)
    # the watch checked every stored tensor (data and scales) for NaN and inf after every step
    assert watch.changed[0]
    low_bit = {name: p for name, p in model.named_parameters() if is_low_bit(p)}
    assert low_bit and all(layout_of(p).kind == weights for p in low_bit.values())
    grown = [name for name, p in low_bit.items() if values(p).abs().max() > 10 * before[name]]
    assert grown, "the low-bit weights were not pushed far: the test injected nothing"
