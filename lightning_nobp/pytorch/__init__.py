"""Trainer adapters: the strategy (and, later, the precision plugin) users pass to ``lightning.Trainer``."""

from lightning_nobp.pytorch.strategy import NoBackpropStrategy

__all__ = ["NoBackpropStrategy"]
