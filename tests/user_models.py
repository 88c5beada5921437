"""LightningModules written the way users write them (nothing specific to forward-only training)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class DigitsClassifier(pl.LightningModule):
    """MLP 64-128-10 with cross-entropy, ``self.log``, SGD and a StepLR schedule."""

    def __init__(self, lr: float = 3e-4, momentum: float = 0.9, hidden: int = 128, step_size: int = 100) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.step_size, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def digits_loaders(batch_size: int = 128, shuffle: bool = True):
    from lightning_nobp.data import load_digits_split
    from lightning_nobp.data.digits import batched_loader

    train, test = load_digits_split()
    return batched_loader(train, batch_size, shuffle=shuffle), batched_loader(test, 512, shuffle=False)
