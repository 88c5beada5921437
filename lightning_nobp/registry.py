"""Registers the string aliases (``"nobp_mezo"``, ...) in Lightning's Trainer and Fabric strategy registries.

Lightning has no entry points for strategies: the aliases exist once ``lightning_nobp`` has been imported.
"""

from __future__ import annotations


def register_strategies() -> None:
    """Register every ``nobp_*`` alias with the Trainer's and Fabric's registries (idempotent)."""
    from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_REGISTRY
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_nobp.fabric.strategy import NoBackpropStrategy as FabricNoBackpropStrategy
    from lightning_nobp.pytorch.strategy import NoBackpropStrategy

    NoBackpropStrategy.register_strategies(StrategyRegistry)
    FabricNoBackpropStrategy.register_strategies(FABRIC_REGISTRY)
