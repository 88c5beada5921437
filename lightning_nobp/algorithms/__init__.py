"""Forward-only estimators with an ask/tell interface, independent of Lightning."""

from lightning_nobp.algorithms.base import Algorithm, Estimate, Member, Population, sample_direction
from lightning_nobp.algorithms.extras import EstimatorExtras
from lightning_nobp.algorithms.evolution import EggRoll, EvolutionStrategy, OpenES
from lightning_nobp.algorithms.forward_gradient import ForwardGradient
from lightning_nobp.algorithms.local import ForwardForward, LocalLearning, MonoForward, quietest_features
from lightning_nobp.algorithms.mezo import MeZO
from lightning_nobp.algorithms.seeds import derive_seed

__all__ = [
    "Algorithm",
    "EggRoll",
    "EstimatorExtras",
    "Estimate",
    "EvolutionStrategy",
    "ForwardForward",
    "ForwardGradient",
    "LocalLearning",
    "MonoForward",
    "MeZO",
    "OpenES",
    "Member",
    "Population",
    "derive_seed",
    "quietest_features",
    "sample_direction",
]
