"""Lightning's own demo modules train under NoBackpropStrategy, and their loss goes down.

The demos hard-code SGD with lr=0.1, a backprop learning rate. A MeZO estimate has about sqrt(d) times the norm
of the true gradient (d parameters), so at such a learning rate these runs clip the estimate by norm with the
Trainer's own ``gradient_clip_val``, as a user would; the modules themselves are unchanged. (BoringModel's
batch-size-1 SGD at lr 0.1 diverges even with backprop: its training loss rose from 79 to 4,600 in 4 epochs
here.)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader, TensorDataset

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO

from conftest import quiet_trainer_kwargs


class LossRecorder(Callback):
    """Keeps the training loss of every step (the value ``training_step`` returned)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self.losses.append(float(outputs["loss"]))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_boring_model_fits_and_its_loss_goes_down(no_backprop: None) -> None:
    """BoringModel trains on single samples with its own SGD(lr=0.1) and StepLR(gamma=0.1 per epoch).

    Averaging 16 directions per step and clipping at 0.5 tames the per-sample estimate; the loss over the whole
    dataset goes down (measured 1.34 -> 1.13, 1.42 -> 1.07, 0.97 -> 0.74 and 1.41 -> 1.14 for seeds 0-3).
    """
    pl.seed_everything(0)
    model = BoringModel()
    samples = torch.cat(list(model.train_dataloader()))

    def dataset_loss() -> float:
        with torch.no_grad():
            return float(model.loss(model(samples)))

    before = dataset_loss()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(eps=1e-3, directions=16)),
        max_epochs=3,
        limit_val_batches=2,
        gradient_clip_val=0.5,
        **quiet_trainer_kwargs(),
    )
    trainer.fit(model)  # dict output, SGD + StepLR, its own dataloaders, validation loop
    assert trainer.global_step == 3 * 64
    assert dataset_loss() < 0.9 * before


class OfflineTransformer(LightningTransformer):
    """The demo transformer, unchanged except that it does not download WikiText2 (tests run offline)."""

    def prepare_data(self) -> None:
        pass


def repeat_task(vocab_size: int = 8, length: int = 12, samples: int = 256) -> DataLoader:
    """Sequences of a few repeated tokens: the target is the input shifted by one."""
    generator = torch.Generator().manual_seed(0)
    period = torch.randint(0, vocab_size, (samples, 3), generator=generator)
    stream = period.repeat(1, (length + 1) // 3 + 1)[:, : length + 1]
    return DataLoader(TensorDataset(stream[:, :-1], stream[:, 1:]), batch_size=32, shuffle=True)


def test_lightning_transformer_demo_fits_and_its_loss_goes_down(no_backprop: None) -> None:
    pl.seed_everything(0)
    recorder = LossRecorder()
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(eps=1e-3)),
        max_epochs=10,
        gradient_clip_val=10.0,
        callbacks=[recorder],
        **quiet_trainer_kwargs(),
    )
    trainer.fit(OfflineTransformer(vocab_size=8), repeat_task())
    print(f"transformer demo: loss {mean(recorder.losses[:16]):.3f} -> {mean(recorder.losses[-16:]):.3f}")
    assert all(torch.isfinite(torch.tensor(recorder.losses)))
    assert mean(recorder.losses[-16:]) < mean(recorder.losses[:16]) - 0.05
