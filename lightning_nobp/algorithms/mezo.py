"""MeZO: two-sided SPSA, the memory-efficient zeroth-order optimizer of Malladi et al. (2023).

For each direction ``z`` (regenerated from its seed, never stored) the loss is evaluated at ``theta + eps*z`` and
``theta - eps*z``; the projected gradient ``g = (L+ - L-) / (2 eps)`` gives the estimate ``g * z``, averaged over
the step's directions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import Algorithm, Estimate, Member, Population
from lightning_nobp.algorithms.input_bases import InputBases, check_input_subspace
from lightning_nobp.algorithms.noise_cache import NoiseCache
from lightning_nobp.algorithms.seeds import derive_seed, derive_seed_range

DISTRIBUTIONS = ("gaussian", "rademacher")


class MeZO(InputBases, Algorithm):
    """Two-sided simultaneous-perturbation (SPSA) gradient estimate from forward passes only.

    Args:
        eps: perturbation scale; the loss is evaluated at ``theta +- eps * z``. Must be positive.
            ``1e-3`` suits fp32/bf16 models whose weights are of order 0.01 to 1.
        directions: random directions per micro-batch; their estimates are averaged (2 forwards each, evaluated
            together in one batched forward where the model allows it). With a user's Adam, the step size is set
            by the lr, so averaging directions buys a cleaner step for little more time: 8 (the default) did better
            than 1 (the MeZO paper's setting, still the choice for a large model on a few hundred steps) on
            Fashion-MNIST and digits at equal training time (``benchmarks/comparisons/peers.py``; figures in
            ``docs/results.md``).
        distribution: ``"gaussian"`` (MeZO's choice) or ``"rademacher"`` (entries +-1).
        input_subspace: for layers fed directly by the data (an MLP's first layer), project the rows of ``z``
            on the principal subspace of their inputs holding this fraction of the inputs' energy (estimated over
            the first 16 batches), where the gradient lies; ``None`` keeps ``z`` in every direction. One process
            only.
    """

    def __init__(
        self,
        eps: float = 1e-3,
        directions: int = 8,
        distribution: str = "gaussian",
        input_subspace: float | None = 0.97,
    ) -> None:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"MeZO(eps={eps!r}): eps must be a positive finite number, e.g. eps=1e-3")
        if not (isinstance(directions, int) and directions >= 1):
            raise ValueError(f"MeZO(directions={directions!r}): directions must be an integer >= 1")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"MeZO(distribution={distribution!r}): choose one of {DISTRIBUTIONS}")
        self.eps = float(eps)
        self.directions = directions
        self.distribution = distribution
        self.input_subspace = check_input_subspace("MeZO", input_subspace)
        #: each direction is drawn once per step (its +, - evaluations and the update reuse it)
        self.noise_cache = NoiseCache()

    def __repr__(self) -> str:
        return (
            f"MeZO(eps={self.eps}, directions={self.directions}, distribution={self.distribution!r},"
            f" input_subspace={self.input_subspace})"
        )

    def ask(self, step_seed: int) -> Population:
        members: list[Member] = []
        for seed in derive_seed_range(step_seed, count=self.directions):
            members += [Member(seed, +1.0), Member(seed, -1.0)]
        return Population(tuple(members), sigma=self.eps)

    def tell_on_device(self, population: Population, fitness: Tensor) -> Estimate:
        fitness = fitness.detach().to(torch.float64)
        applies = torch.isfinite(fitness).all()
        safe = torch.where(torch.isfinite(fitness), fitness, torch.zeros_like(fitness))
        loss_plus, loss_minus = safe[0::2], safe[1::2]
        projected = (loss_plus - loss_minus) / (2.0 * self.eps)
        per_member = (projected / (2 * self.directions)).repeat_interleave(2)
        per_member[1::2] *= -1.0
        coefficients = torch.where(applies, per_member, torch.zeros_like(per_member))
        stats = {"projected_grad": projected.abs().mean(), "loss_spread": (loss_plus - loss_minus).abs().mean()}
        dropped = torch.where(applies, 0, len(population)).to(torch.int64)
        return Estimate(coefficients.to(torch.float32), dropped_members=dropped, stats=stats, applies=applies)

    def tell(self, population: Population, fitness: Tensor) -> Estimate:
        fitness = fitness.detach().to(torch.float64)
        if not bool(torch.isfinite(fitness).all()):
            return Estimate(None, dropped_members=len(population))
        loss_plus, loss_minus = fitness[0::2], fitness[1::2]
        projected = (loss_plus - loss_minus) / (2.0 * self.eps)  # one scalar per direction
        # each member's sign is applied when its noise is regenerated: +c z and -(-c) z both add c z
        per_member = (projected / (2 * self.directions)).repeat_interleave(2)
        per_member[1::2] *= -1.0
        stats = {
            "projected_grad": float(projected.abs().mean()),
            "loss_spread": float((loss_plus - loss_minus).abs().mean()),
        }
        return Estimate(per_member.to(torch.float32), stats=stats)

    def noise(self, noise_seed: int, param_index: int, param: Tensor) -> Tensor:
        return self._dense_stack([noise_seed], param_index, param, self.distribution)[0]

    def stacked_noise(self, noise_seeds: Sequence[int], param_index: int, param: Tensor) -> Tensor:
        return self._dense_stack(noise_seeds, param_index, param, self.distribution)

    def shared_basis_factors(
        self, noise_seeds: Sequence[int], param_index: int, param: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        return self._subspace_factors(noise_seeds, param_index, param, self.distribution)

    def noise_stream(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[int, str] | None:
        if id(param) in self.input_bases:
            return None  # projected noise is not a Philox stream: kernels use `noise`
        return derive_seed(noise_seed, param_index), self.distribution
