"""Fashion-MNIST with EggRoll through the Trainer (skipped when the Debian dataset is not installed)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.data import fashion_mnist_available, load_fashion_mnist
from lightning_nobp.data.digits import batched_loader

from conftest import quiet_trainer_kwargs
from user_models import DigitsClassifier

pytestmark = pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist"
)


class FashionClassifier(DigitsClassifier):
    """The same user module, MLP 784-256-10 with Adam."""

    def __init__(self) -> None:
        super().__init__(lr=3e-3, hidden=256)
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@pytest.mark.slow
def test_eggroll_reaches_80_percent_on_fashion_mnist(no_backprop: None) -> None:
    pl.seed_everything(0)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    model = FashionClassifier()
    strategy = NoBackpropStrategy(algorithm=EggRoll(population=256, sigma=1e-2, population_chunk=32))
    trainer = pl.Trainer(strategy=strategy, max_steps=700, max_time={"minutes": 4}, **quiet_trainer_kwargs())
    start = time.perf_counter()
    trainer.fit(model, batched_loader(train, 256, shuffle=True))
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, batched_loader(test, 2048, shuffle=False), verbose=False)[0]["test_acc"]
    print(f"Fashion-MNIST EggRoll: test accuracy {accuracy:.3f} after {trainer.global_step} steps in {seconds:.1f} s")
    assert accuracy >= 0.80


def test_missing_dataset_names_the_install_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
