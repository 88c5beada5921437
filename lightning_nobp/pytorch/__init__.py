"""Trainer adapters: the strategy and the precision plugin users pass to ``lightning.Trainer``."""

from lightning_nobp.pytorch.precision import LowBitPrecision
from lightning_nobp.pytorch.strategy import NoBackpropStrategy

__all__ = ["LowBitPrecision", "NoBackpropStrategy"]
