"""Fabric adapters, named like their Trainer twins (as in ``lightning.fabric``)."""

from lightning_nobp.fabric.precision import LowBitPrecision
from lightning_nobp.fabric.strategy import NoBackpropStrategy

__all__ = ["LowBitPrecision", "NoBackpropStrategy"]
