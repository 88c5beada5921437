"""``FashionMNISTDataModule``: Zalando's Fashion-MNIST (60,000 / 10,000 images) from the Debian package.

The data is read from the IDX files that ``apt-get install dataset-fashion-mnist`` puts under
``/usr/share/datasets/fashion-mnist``; nothing is downloaded.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nobp.data.digits import batched_loader

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = (
    "Fashion-MNIST is not installed: run `apt-get install dataset-fashion-mnist` (or `apt-get download"
    " dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR` and pass root=DIR/usr/share/datasets/"
    "fashion-mnist)."
)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) into a uint8 array of its declared shape."""
    raw = gzip.open(path).read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_available(root: Path | str = DEFAULT_ROOT) -> bool:
    """Whether the four IDX files are present under ``root``."""
    return all((Path(root) / name).is_file() for pair in FILES.values() for name in pair)


def load_fashion_mnist(split: str, root: Path | str = DEFAULT_ROOT) -> TensorDataset:
    """One split as float32 features in [0, 1] (784 per image) and int64 labels.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: folder of the IDX files.
    """
    if not fashion_mnist_available(root):
        raise FileNotFoundError(f"{INSTALL_HINT} Looked in {root}.")
    images, labels = (read_idx(Path(root) / name) for name in FILES[split])
    features = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return TensorDataset(features, torch.from_numpy(labels.astype(np.int64)))


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST with the official split; the test split doubles as validation set.

    Args:
        batch_size: training batch size.
        root: folder of the IDX files (the Debian package's by default).
        num_workers: DataLoader worker processes (0 is fastest for in-memory tensors).
    """

    def __init__(self, batch_size: int = 256, root: str = str(DEFAULT_ROOT), num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.root = root
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        if not fashion_mnist_available(self.root):
            raise FileNotFoundError(f"{INSTALL_HINT} Looked in {self.root}.")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = load_fashion_mnist("train", self.root)
            self.test_set = load_fashion_mnist("test", self.root)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return batched_loader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return batched_loader(self.test_set, 2048, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
