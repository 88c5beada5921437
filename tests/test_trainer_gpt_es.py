"""EggRoll's defaults train a small byte-level GPT written as a plain LightningModule (batched population path)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.models import GPT, GPTConfig

from conftest import quiet_trainer_kwargs


class TinyLanguageModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(GPTConfig.preset("tiny", block_size=16))

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def periodic_bytes(samples: int = 512, length: int = 17) -> TensorDataset:
    """Sequences that repeat a random 4-byte word: predictable after the first word."""
    generator = torch.Generator().manual_seed(0)
    words = torch.randint(97, 123, (samples, 4), generator=generator)
    return TensorDataset(words.repeat(1, length // 4 + 1)[:, :length])


def test_eggroll_defaults_train_a_tiny_gpt(no_backprop: None) -> None:
    pl.seed_everything(0)
    model = TinyLanguageModel()
    data = periodic_bytes()
    loader = DataLoader(data, batch_size=32, shuffle=True)

    tokens = data.tensors[0]

    def mean_loss() -> float:
        with torch.no_grad():
            logits = model.model(tokens[:, :-1])
            return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))

    before = mean_loss()
    strategy = NoBackpropStrategy(algorithm=EggRoll())  # population 64, rank 1, sigma 1e-2
    trainer = pl.Trainer(strategy=strategy, max_steps=30, **quiet_trainer_kwargs())
    trainer.fit(model, loader)
    after = mean_loss()
    print(f"tiny GPT EggRoll: loss {before:.3f} -> {after:.3f}")
    estimator = strategy.engine.estimator(trainer.optimizers[0], [model])
    assert estimator.batching is True  # the whole population ran through vmap
    assert after < before - 0.5
