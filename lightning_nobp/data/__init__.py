"""DataModules used by the recipes; every dataset installs offline."""

from lightning_nobp.data.byte_text import ByteTextDataModule
from lightning_nobp.data.digits import DigitsDataModule, load_digits_split
from lightning_nobp.data.sentiment import SentimentDataModule
from lightning_nobp.data.fashion_mnist import FashionMNISTDataModule, fashion_mnist_available, load_fashion_mnist

__all__ = [
    "ByteTextDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "SentimentDataModule",
    "fashion_mnist_available",
    "load_digits_split",
    "load_fashion_mnist",
]
