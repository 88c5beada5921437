"""BatchNorm's running statistics come from the official passes only, as with backprop."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import ExecutionOptions
from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll, ForwardGradient, MeZO

from conftest import quiet_trainer_kwargs


class SmallCNN(pl.LightningModule):
    """A LightningModule with BatchNorm, written as for backprop."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 8 * 8, 10),
            nn.BatchNorm1d(10),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def loader():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=generator), torch.randint(0, 10, (32,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


@pytest.mark.parametrize(
    "algorithm",
    [
        EggRoll(population=8, rank=1, sigma=1e-2, extras=None),
        MeZO(eps=1e-3, directions=2, input_subspace=None),
        # at their defaults the first step also tests the layers (per-row estimates: 1 + 2 forwards per candidate
        # layer) and searches for data-fed layers (input subspaces: 2 forwards): none of these may touch them
        EggRoll(population=8, rank=1, sigma=1e-2),
        MeZO(eps=1e-3, directions=2),
        ForwardGradient(directions=4),  # forward-mode JVPs: BatchNorm's in-place update would break them
    ],
    ids=["eggroll", "mezo", "eggroll-defaults", "mezo-defaults", "forward-gradient"],
)
def test_members_leave_running_statistics_to_the_official_pass(algorithm) -> None:
    torch.manual_seed(0)
    module = SmallCNN()
    official = copy.deepcopy(module)
    strategy = NoBackpropStrategy(algorithm=algorithm, execution=ExecutionOptions(reuse_official_pass=False))
    pl.Trainer(strategy=strategy, max_steps=1, **quiet_trainer_kwargs()).fit(module, loader())
    with torch.no_grad():  # what one backprop-style training forward of the batch does to the statistics
        official.train()
        official(next(iter(loader()))[0])
    for (name, buffer), expected in zip(module.named_buffers(), official.buffers()):
        assert torch.equal(buffer, expected), name
    assert int(module.net[1].num_batches_tracked) == 1
    assert strategy.engine._estimators  # the members were evaluated


def test_a_reused_official_pass_never_writes_perturbed_statistics() -> None:
    """MeZO with one direction reuses the official pass as a member where it spares a forward, except in a model
    with running statistics: they must come from the unperturbed weights (as with backprop)."""
    torch.manual_seed(0)
    module = SmallCNN()
    official = copy.deepcopy(module)
    strategy = NoBackpropStrategy(algorithm=MeZO(eps=1e-2, directions=1, input_subspace=None))  # reuse: automatic
    pl.Trainer(strategy=strategy, max_steps=1, **quiet_trainer_kwargs()).fit(module, loader())
    with torch.no_grad():
        official.train()
        official(next(iter(loader()))[0])
    for (name, buffer), expected in zip(module.named_buffers(), official.buffers()):
        assert torch.equal(buffer, expected), name
    plain = NoBackpropStrategy(algorithm=MeZO(directions=1))
    assert plain.official_pass_is_a_member(2)  # without such layers the pass is reused (one forward less)


class MetricInTrainingStep(SmallCNN):
    """Updates a torchmetrics accuracy in training_step, as many modules do."""

    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.train_acc = MulticlassAccuracy(10, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.train_acc(logits, y)
        return F.cross_entropy(logits, y)


@pytest.mark.parametrize("input_subspace", [None, 0.97], ids=["isotropic", "input-subspace"])
def test_members_leave_metric_states_to_the_official_pass(input_subspace: float | None) -> None:
    """Also the input subspaces' extra forwards of the first step (the search for data-fed layers)."""
    torch.manual_seed(0)
    module = MetricInTrainingStep()
    initial = copy.deepcopy(module)
    strategy = NoBackpropStrategy(
        algorithm=MeZO(eps=1e-3, directions=2, input_subspace=input_subspace),
        execution=ExecutionOptions(reuse_official_pass=False),
    )
    pl.Trainer(strategy=strategy, max_steps=1, **quiet_trainer_kwargs()).fit(module, loader())
    assert module.train_acc._update_count == 1  # the official pass only (not 1 + 4 members)
    x, y = next(iter(loader()))
    with torch.no_grad():
        initial.train()
        initial.train_acc(initial(x), y)
    assert torch.equal(module.train_acc.tp, initial.train_acc.tp)
