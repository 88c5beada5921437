"""Fitness shaping: turn raw losses into the weights of an evolution-strategies gradient estimate."""

from __future__ import annotations

import torch
from torch import Tensor

FITNESS_SHAPINGS = ("centered_rank", "zscore", "sign", None)


def average_ranks(keys: Tensor) -> Tensor:
    """0-based ranks of ``keys``, tied keys sharing the mean of their ranks (all equal: all ``(n - 1) / 2``), so
    members with the same fitness get the same weight; on the device, no host synchronisation."""
    ordered = keys.sort().values
    below = torch.searchsorted(ordered, keys)
    up_to = torch.searchsorted(ordered, keys, right=True)
    return (below + up_to - 1).to(keys.dtype) / 2


def centered_ranks(fitness: Tensor) -> Tensor:
    """Ranks scaled to [-0.5, 0.5] (ties share their mean rank, so an all-equal fitness gives zeros): invariant to
    any monotone change of the loss."""
    return average_ranks(fitness) / max(fitness.numel() - 1, 1) - 0.5


def zscore(fitness: Tensor) -> Tensor:
    """``(f - mean) / std``; all zeros when every member has the same fitness."""
    std = fitness.std(unbiased=False)
    if float(std) == 0.0:
        return torch.zeros_like(fitness)
    return (fitness - fitness.mean()) / std


def antithetic_signs(fitness: Tensor) -> Tensor:
    """Per antithetic pair ``(+, -)``: ``+0.5 * sign(f+ - f-)`` for the ``+`` member and the opposite for ``-``.

    With each member's noise carrying its sign, both members then push the estimate the same way (EGGROLL's
    integer fitness, 1.6 bits per pair).
    """
    signs = torch.sign(fitness[0::2] - fitness[1::2]) * 0.5
    shaped = torch.empty_like(fitness)
    shaped[0::2], shaped[1::2] = signs, -signs
    return shaped


def shape_fitness_masked(fitness: Tensor, usable: Tensor, shaping: str | None) -> Tensor:
    """:func:`shape_fitness` of the usable members without leaving the device (no host synchronisation): the
    others get 0. With every member usable, the same values as :func:`shape_fitness`.

    Args:
        fitness: the losses of the members, ``[P]``.
        usable: booleans ``[P]``; with ``"sign"``, both members of a pair usable or neither.
        shaping: one of ``FITNESS_SHAPINGS``.
    """
    count = usable.sum().to(fitness.dtype)
    zeros = torch.zeros_like(fitness)
    if shaping == "centered_rank":
        keyed = torch.where(usable, fitness, torch.full_like(fitness, float("inf")))  # the unusable rank last
        return torch.where(usable, average_ranks(keyed) / (count - 1).clamp_min(1) - 0.5, zeros)
    if shaping == "sign":
        return torch.where(usable, antithetic_signs(torch.where(usable, fitness, zeros)), zeros)
    values = torch.where(usable, fitness, zeros)
    mean = values.sum() / count.clamp_min(1)
    centered = torch.where(usable, fitness - mean, zeros)
    if shaping is None:
        return centered
    if shaping == "zscore":
        std = (centered.square().sum() / count.clamp_min(1)).sqrt()
        return torch.where(std > 0, centered / torch.where(std > 0, std, torch.ones_like(std)), zeros)
    raise ValueError(f"unknown fitness shaping {shaping!r}: choose one of {FITNESS_SHAPINGS}")


def shape_fitness(fitness: Tensor, shaping: str | None) -> Tensor:
    """Apply one of ``FITNESS_SHAPINGS`` to a fitness vector (losses: lower is better).

    Args:
        fitness: the losses of the members, ``[P]``; with ``"sign"`` ordered as antithetic pairs ``(+, -)``.
        shaping: ``"centered_rank"``, ``"zscore"``, ``"sign"`` or ``None`` (the raw losses minus their mean).
    """
    if shaping == "centered_rank":
        return centered_ranks(fitness)
    if shaping == "zscore":
        return zscore(fitness)
    if shaping == "sign":
        return antithetic_signs(fitness)
    if shaping is None:
        return fitness - fitness.mean()
    raise ValueError(f"unknown fitness shaping {shaping!r}: choose one of {FITNESS_SHAPINGS}")
