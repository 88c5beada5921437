"""DataModules used by the recipes; every dataset installs offline."""

from lightning_nobp.data.arithmetic import ArithmeticDataModule, exact_match
from lightning_nobp.data.byte_text import ByteTextDataModule
from lightning_nobp.data.digits import DigitsDataModule, load_digits_split
from lightning_nobp.data.sentiment import SentimentDataModule
from lightning_nobp.data.fashion_mnist import FashionMNISTDataModule, fashion_mnist_available, load_fashion_mnist

__all__ = [
    "ArithmeticDataModule",
    "ByteTextDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "SentimentDataModule",
    "fashion_mnist_available",
    "load_digits_split",
    "exact_match",
    "load_fashion_mnist",
]
