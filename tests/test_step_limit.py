"""The step limit: a backprop-tuned learning rate moves no tensor by more than the bound, small steps are untouched."""

from __future__ import annotations

import math
import warnings

import lightning as L
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy
from lightning_nobp.perturb.step_limit import FULL_BOUND_WEIGHTS, NORM_FLOOR, check_step_limit, size_scaled_limit

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier, digits_loaders

LIMIT = 0.05


def fabric_steps(
    optimizer_class: type[torch.optim.Optimizer],
    lr: float,
    step_limit: float | None,
    update: str | None = None,
    direct_step: str = "sgd",
    algorithm: object | None = None,
    steps: int = 3,
    hidden: int = 32,
    **optimizer_kwargs: float,
) -> tuple[list[list[torch.Tensor]], FabricNoBackpropStrategy]:
    """A few steps of a small MLP in Fabric; the float32 weights before each step and after the last."""
    strategy = FabricNoBackpropStrategy(
        algorithm=algorithm or MeZO(), update=update, direct_step=direct_step, step_limit=step_limit
    )
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=strategy)
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    optimizer = optimizer_class(model.parameters(), lr=lr, **optimizer_kwargs)
    model, optimizer = fabric.setup(model, optimizer)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    history = [[p.detach().float().clone() for p in model.parameters()]]
    for _ in range(steps):

        def closure() -> torch.Tensor:
            loss = F.cross_entropy(model(x), y)
            fabric.backward(loss)
            return loss

        optimizer.step(closure)
        history.append([p.detach().float().clone() for p in model.parameters()])
    return history, strategy


def relative_changes(history: list[list[torch.Tensor]]) -> list[float]:
    """Every step's change of every tensor over the bound's reference (its norm, at least the floor)."""
    ratios = []
    for before, after in zip(history, history[1:]):
        for old, new in zip(before, after):
            reference = max(float(old.norm()), NORM_FLOOR * math.sqrt(old.numel()))
            ratios.append(float((new - old).norm()) / reference)
    return ratios


@pytest.mark.parametrize("update", ["grad", "direct"])
@pytest.mark.parametrize("algorithm", ["mezo", "eggroll"])
def test_a_backprop_learning_rate_moves_no_tensor_past_the_bound(update: str, algorithm: str, no_backprop) -> None:
    make = {"mezo": lambda: MeZO(), "eggroll": lambda: EggRoll(population=8)}[algorithm]
    with pytest.warns(UserWarning, match="step limit scaled down"):
        history, strategy = fabric_steps(torch.optim.SGD, 1.0, LIMIT, update=update, algorithm=make())
    changes = relative_changes(history)
    assert max(changes) <= LIMIT * 1.01  # bf16-free float32 weights: the bound holds to rounding
    assert max(changes) >= LIMIT * 0.9  # and the limit acted: lr 1.0 asks for far more
    assert strategy.engine.step_limited > 0
    unlimited, _ = fabric_steps(torch.optim.SGD, 1.0, None, update=update, algorithm=make())
    assert max(relative_changes(unlimited)) > 10 * LIMIT  # what the same run does without the limit


@pytest.mark.parametrize("update", ["grad", "direct"])
def test_the_bound_shrinks_as_one_over_sqrt_weights_beyond_the_full_bound_size(update: str, no_backprop) -> None:
    """A model of 21,508 weights gets ``LIMIT * sqrt(10,000 / 21,508)``: its limited steps are mostly noise."""
    hidden = 1024
    weights = 16 * hidden + hidden + hidden * 4 + 4
    bound = LIMIT * math.sqrt(FULL_BOUND_WEIGHTS / weights)
    assert size_scaled_limit(LIMIT, weights) == pytest.approx(bound)
    assert size_scaled_limit(LIMIT, FULL_BOUND_WEIGHTS // 2) == LIMIT  # small models keep the full bound
    with pytest.warns(UserWarning, match=f"more than {bound:.3g} of their norm"):
        history, strategy = fabric_steps(torch.optim.SGD, 1.0, LIMIT, update=update, hidden=hidden)
    changes = relative_changes(history)
    assert max(changes) <= bound * 1.01
    assert max(changes) >= bound * 0.9  # the limit acted at the scaled bound, not at LIMIT
    assert strategy.engine.step_limited > 0


@pytest.mark.parametrize("update", ["grad", "direct"])
def test_a_head_estimated_from_per_row_losses_keeps_the_full_bound(update: str, no_backprop) -> None:
    """EggRoll's per-row head estimate is mostly signal: the head gets ``LIMIT``, the perturbation-estimated first
    layer (17,408 weights) the bound scaled to its own count."""
    hidden = 1024
    scaled = size_scaled_limit(LIMIT, 16 * hidden + hidden)
    with pytest.warns(UserWarning, match=f"more than {scaled:.3g} of their norm"):
        history, strategy = fabric_steps(
            torch.optim.SGD, 1.0, LIMIT, update=update, algorithm=EggRoll(population=8), hidden=hidden
        )
    (estimator,) = strategy.engine._estimators.values()
    assert estimator.rows.kept_indices() == {2, 3}  # the head's weight and bias
    per_tensor = [relative_changes([[b[i]] for b in history]) for i in range(4)]
    assert max(per_tensor[0] + per_tensor[1]) <= scaled * 1.01
    assert max(per_tensor[2]) <= LIMIT * 1.01
    assert max(per_tensor[2]) >= LIMIT * 0.9  # limited at the full bound, far above the first layer's
    assert LIMIT * 0.9 > scaled * 1.01  # the two bounds are told apart


@pytest.mark.parametrize("update", ["grad", "direct"])
def test_sgd_with_momentum_is_bounded_per_estimate(update: str, no_backprop) -> None:
    with pytest.warns(UserWarning, match="step limit"):
        history, _ = fabric_steps(torch.optim.SGD, 1.0, LIMIT, update=update, momentum=0.5)
    assert max(relative_changes(history)) <= LIMIT * (1 + 0.5 + 0.25) * 1.01  # the buffer sums bounded estimates


def test_the_normalized_direct_step_is_left_alone(no_backprop) -> None:
    """Its ``lr`` is each weight's step already (as with Adam): the limit does not rescale it, even at lr 0.1."""
    limited, strategy = fabric_steps(torch.optim.SGD, 0.1, LIMIT, update="direct", direct_step="normalized")
    free, _ = fabric_steps(torch.optim.SGD, 0.1, None, update="direct", direct_step="normalized")
    assert all(torch.equal(a, b) for a, b in zip(limited[-1], free[-1]))
    assert max(relative_changes(limited)) > LIMIT  # it did move more than the bound
    assert strategy.engine.step_limited == 0


@pytest.mark.parametrize("update", ["grad", "direct"])
def test_small_steps_are_left_exactly_as_they_were(update: str, no_backprop) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the limit never acts, so it never warns
        limited, strategy = fabric_steps(torch.optim.SGD, 1e-4, LIMIT, update=update)
    free, _ = fabric_steps(torch.optim.SGD, 1e-4, None, update=update)
    assert all(torch.equal(a, b) for a, b in zip(limited[-1], free[-1]))
    assert strategy.engine.step_limited == 0
    assert not all(torch.equal(a, b) for a, b in zip(limited[0], limited[-1]))  # the run did train


def test_adam_steps_are_never_limited(no_backprop) -> None:
    """Adam's change of a weight is bounded by its lr already: the limit leaves it alone, even at lr 0.3."""
    limited, strategy = fabric_steps(torch.optim.Adam, 0.3, LIMIT, update="direct")
    free, _ = fabric_steps(torch.optim.Adam, 0.3, None, update="direct")
    assert all(torch.equal(a, b) for a, b in zip(limited[-1], free[-1]))
    assert max(relative_changes(limited)) > LIMIT  # it did move more than the bound
    assert strategy.engine.step_limited == 0


def test_the_trainer_logs_how_many_tensors_were_limited(no_backprop) -> None:
    pl.seed_everything(0)
    train, _ = digits_loaders(batch_size=128)
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO()),  # the default limit
        max_steps=3,
        log_every_n_steps=1,
        **quiet_trainer_kwargs(),
    )
    with pytest.warns(UserWarning, match="lower the learning rate"):
        trainer.fit(DigitsClassifier(lr=1.0, momentum=0.0), train)
    assert trainer.callback_metrics["nobp/step_limited"] == 4  # both weights and both biases


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_a_bad_step_limit_is_refused_with_the_fix(bad: object) -> None:
    with pytest.raises((TypeError, ValueError), match="step_limit"):
        check_step_limit(bad)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError), match="step_limit"):
        NoBackpropStrategy(algorithm=MeZO(), step_limit=bad)  # type: ignore[arg-type]


def test_lr_find_runs_under_the_strategy_and_its_suggestion_trains(no_backprop, tmp_path) -> None:
    """Lightning's learning-rate finder sweeps the forward-only estimate's learning rate, restores the weights it
    started from, and its suggestion trains the model."""
    from lightning.pytorch.tuner import Tuner

    pl.seed_everything(0)
    train, test = digits_loaders(batch_size=128)
    model = DigitsClassifier(lr=0.1, momentum=0.0)
    start = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=EggRoll(population=32)),
        max_epochs=8,
        default_root_dir=tmp_path,
        **quiet_trainer_kwargs(),
    )
    finder = Tuner(trainer).lr_find(model, train_dataloaders=train, min_lr=1e-5, max_lr=1.0, num_training=40)
    suggestion = finder.suggestion()
    assert suggestion is not None and 1e-5 <= suggestion <= 1.0
    assert model.hparams.lr == suggestion  # the finder set it, as with backprop
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))  # the sweep's steps were undone
    losses = [loss for loss in finder.results["loss"] if math.isfinite(loss)]
    assert len(losses) == 40  # every step of the sweep gave a finite loss (the step limit holds the large rates)
    trainer = pl.Trainer(strategy=NoBackpropStrategy(algorithm=EggRoll(population=32)), max_epochs=4,
                         **quiet_trainer_kwargs())  # fmt: skip
    before = trainer.test(model, test, verbose=False)[0]["test_acc"]
    trainer.fit(model, train)
    assert trainer.test(model, test, verbose=False)[0]["test_acc"] > before + 0.1
