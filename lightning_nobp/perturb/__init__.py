"""Perturbed evaluation of unmodified modules (weights never written) and the population step core."""

from lightning_nobp.perturb.estimator import PopulationEstimator, RngSnapshot, scalar_loss
from lightning_nobp.perturb.forward import ParameterOwners, ParameterReadProbe, PerturbedForward

__all__ = [
    "ParameterOwners",
    "ParameterReadProbe",
    "PerturbedForward",
    "PopulationEstimator",
    "RngSnapshot",
    "scalar_loss",
]
