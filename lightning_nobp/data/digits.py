"""``DigitsDataModule``: scikit-learn's 8x8 handwritten digits (1,797 images, ships with scikit-learn)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The digits as float32 features in [0, 1] (64 per image) and int64 labels, split once at random.

    Args:
        test_fraction: share of the 1,797 images held out for testing (0.2 gives 360).
        seed: seed of the split, so every method sees the same test set.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(features[train], labels[train]), TensorDataset(features[test], labels[test])


class RowBatches(TensorDataset):
    """A ``TensorDataset`` that also takes a whole batch of row numbers as one index (a list, as a ``BatchSampler``
    yields), and gathers those rows with one ``index_select`` per tensor.

    Indexing a tensor with a Python list converts the list element by element, which is several times slower than
    one ``index_select`` for a batch of the digits' rows and shows in every small training step. The rows and
    their order are the same.
    """

    def __getitem__(self, index: Any) -> tuple[Tensor, ...]:
        if isinstance(index, list):
            rows = torch.from_numpy(np.asarray(index, dtype=np.int64))
            return tuple(tensor.index_select(0, rows.to(tensor.device)) for tensor in self.tensors)
        return super().__getitem__(index)


def batched_loader(dataset: TensorDataset, batch_size: int, shuffle: bool, num_workers: int = 0) -> DataLoader:
    """A DataLoader that indexes an in-memory ``TensorDataset`` once per batch instead of once per sample
    (through :class:`RowBatches`, which shares the dataset's tensors).

    For small in-memory datasets per-sample indexing and collation cost more than a forward pass.

    Args:
        dataset: the in-memory dataset.
        batch_size: samples per batch; the last batch may be smaller.
        shuffle: draw a new random order every epoch.
        num_workers: DataLoader worker processes.
    """
    rows = RowBatches(*dataset.tensors)
    order = RandomSampler(rows) if shuffle else SequentialSampler(rows)
    return DataLoader(
        rows, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None, num_workers=num_workers
    )


class DigitsDataModule(pl.LightningDataModule):
    """sklearn digits with an 80/20 train/test split; the test split doubles as validation set.

    Args:
        batch_size: training batch size.
        test_fraction: share of images held out for validation and testing.
        split_seed: seed of the train/test split.
        num_workers: DataLoader worker processes (0 is fastest for this tiny dataset).
    """

    def __init__(self, batch_size: int = 128, test_fraction: float = 0.2, split_seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.test_set = load_digits_split(self.test_fraction, self.split_seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return batched_loader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return batched_loader(self.test_set, 512, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
