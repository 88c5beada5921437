"""A training step may return a reward to maximise: a non-differentiable accuracy trains a classifier."""

from __future__ import annotations

import lightning as L
import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, MeZO
from lightning_nobp.fabric import NoBackpropStrategy as FabricNoBackpropStrategy
from lightning_nobp.perturb.objective import objective_of

from conftest import quiet_trainer_kwargs
from user_models import digits_loaders


class AccuracyRewardDigits(pl.LightningModule):
    """A digits MLP whose training step returns each sample's 0/1 accuracy as its reward (no gradient exists)."""

    def __init__(self, log_cross_entropy: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.log_cross_entropy = log_cross_entropy

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        if self.log_cross_entropy:
            self.log("train_ce", F.cross_entropy(logits, y))
        return {"reward": (logits.argmax(-1) == y).float()}

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_an_accuracy_reward_trains_a_classifier(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, test = digits_loaders(batch_size=256)
    model = AccuracyRewardDigits()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=EggRoll(population=64)),
        max_epochs=10,
        log_every_n_steps=1,
        **quiet_trainer_kwargs(),
    )
    before = trainer.test(model, test, verbose=False)[0]["test_acc"]
    trainer.fit(model, train)
    assert 0.0 <= float(trainer.callback_metrics["nobp/reward"]) <= 1.0  # logged, an accuracy
    after = trainer.test(model, test, verbose=False)[0]["test_acc"]
    print(f"accuracy reward: test accuracy {before:.3f} -> {after:.3f}")  # measured 0.078 -> 0.45 in 60 steps
    assert after > 0.3 and after > 2 * before


def test_a_reward_beside_a_logged_cross_entropy_trains_every_layer_on_the_reward(no_backprop: None) -> None:
    """The per-row estimates follow the loss rows the objective is made of: a reward has none, so a cross-entropy
    computed for logging finds no row-local layer and leaves no layer unperturbed (nothing follows it)."""
    train, _ = digits_loaders(batch_size=256)
    strategy = NoBackpropStrategy(algorithm=EggRoll(population=8))
    trainer = pl.Trainer(strategy=strategy, max_steps=2, **quiet_trainer_kwargs())
    trainer.fit(AccuracyRewardDigits(log_cross_entropy=True), train)
    estimator = next(iter(strategy.engine._estimators.values()))
    assert estimator.rows.row_local == [] and estimator.rows.unperturbed_indices() == set()


def test_a_fabric_closure_may_return_a_reward(no_backprop: None) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=FabricNoBackpropStrategy(algorithm=MeZO()))
    fabric.seed_everything(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-2)
    model, optimizer = fabric.setup(model, optimizer)
    x = torch.randn(64, 8)
    target = x.sum(dim=1, keepdim=True)

    def reward() -> torch.Tensor:
        return -(model(x) - target).abs().mean()  # negative absolute error: higher is better

    start = float(reward())
    for _ in range(40):
        optimizer.step(lambda: {"reward": reward()})
    assert float(reward()) > start + 0.3 * abs(start)


@pytest.mark.parametrize(
    ("output", "match"),
    [
        ({"loss": torch.tensor(1.0), "reward": torch.tensor(1.0)}, "both 'loss' and 'reward'"),
        ({"reward": torch.ones(2, 3)}, "one value per sample"),
        ({"reward": 0.5}, "tensor operations"),
    ],
)
def test_a_malformed_reward_is_refused_with_the_fix(output: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        objective_of(output)


def test_a_reward_is_minimised_as_its_negative_mean() -> None:
    assert float(objective_of({"reward": torch.tensor([1.0, 0.0, 0.5, 0.5])})) == -0.5
    assert float(objective_of({"loss": torch.tensor(2.0)})) == 2.0
