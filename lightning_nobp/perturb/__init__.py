"""Perturbed evaluation of unmodified modules (weights never written) and the population step core."""

from lightning_nobp.perturb.estimator import EstimatorOptions, PopulationEstimator, RngSnapshot, scalar_loss
from lightning_nobp.perturb.member_layers import MemberLayers, Perturbation
from lightning_nobp.perturb.owners import ParameterOwners, ParameterReadProbe
from lightning_nobp.perturb.row_estimates import RowEstimateOptions

__all__ = [
    "EstimatorOptions",
    "MemberLayers",
    "ParameterOwners",
    "ParameterReadProbe",
    "Perturbation",
    "PopulationEstimator",
    "RngSnapshot",
    "RowEstimateOptions",
    "scalar_loss",
]
