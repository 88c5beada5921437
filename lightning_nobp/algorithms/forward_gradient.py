"""Forward gradient (Baydin et al. 2022): an unbiased gradient estimate from forward-mode directional derivatives.

For each direction ``v`` (regenerated from its seed) one forward-mode pass (a JVP, no tape, no backward) gives the
directional derivative ``d = grad L . v``; the estimate ``d * v`` is unbiased for ``grad L`` when ``E[v v^T] = I``
(Gaussian or Rademacher ``v``), and is averaged over the step's directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import Algorithm, Estimate, Member, Population, sample_direction
from lightning_nobp.algorithms.seeds import derive_seed

DISTRIBUTIONS = ("gaussian", "rademacher")
MODES = ("weight",)


class ForwardGradient(Algorithm):
    """Forward gradient: ``mean over directions of (grad L . v) v``, from forward-mode passes only.

    The "fitness" that ``tell`` receives is not a loss but the directional derivative of the loss along each
    member's direction (``uses_jvp`` is ``True``): the strategies evaluate it with ``torch.func.jvp`` through the
    user's unmodified training step. Compared with MeZO the derivative is exact (no finite-difference ``eps``, no
    cancellation in low precision); one JVP costs about two or three forwards and holds one layer's direction
    and tangent activations at a time.

    Args:
        directions: random directions per micro-batch; their estimates are averaged. Several directions are
            evaluated together in one batched pass (``torch.func.vmap``) where the user's code allows it.
        mode: ``"weight"``: the directions perturb the trainable parameters (every kind of layer). Activity
            perturbation (Ren et al. 2023) is not implemented yet.
        distribution: ``"gaussian"`` or ``"rademacher"`` directions (both unbiased).
        direction_chunk: directions evaluated together in one batched pass (bounds memory; ``None``: all).
    """

    def __init__(
        self,
        directions: int = 1,
        mode: str = "weight",
        distribution: str = "gaussian",
        direction_chunk: int | None = None,
    ) -> None:
        if not (isinstance(directions, int) and directions >= 1):
            raise ValueError(f"ForwardGradient(directions={directions!r}): directions must be an integer >= 1")
        if mode not in MODES:
            raise ValueError(
                f"ForwardGradient(mode={mode!r}): only mode='weight' is implemented (activity perturbation is not)"
            )
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"ForwardGradient(distribution={distribution!r}): choose one of {DISTRIBUTIONS}")
        if direction_chunk is not None and not (isinstance(direction_chunk, int) and direction_chunk >= 1):
            raise ValueError(
                f"ForwardGradient(direction_chunk={direction_chunk!r}): the chunk must be a positive integer or None"
            )
        self.directions = directions
        self.mode = mode
        self.distribution = distribution
        self.direction_chunk = direction_chunk

    def __repr__(self) -> str:
        return f"ForwardGradient(directions={self.directions}, mode={self.mode!r}, distribution={self.distribution!r})"

    @property
    def uses_jvp(self) -> bool:
        return True

    @property
    def population_chunk(self) -> int | None:
        return self.direction_chunk

    def ask(self, step_seed: int) -> Population:
        members = tuple(Member(derive_seed(step_seed, direction), +1.0) for direction in range(self.directions))
        return Population(members, sigma=1.0)

    def tell(self, population: Population, fitness: Tensor) -> Estimate:
        """``fitness`` holds the directional derivatives ``grad L . v_i``; the coefficients are their mean weights."""
        derivatives = fitness.detach().to(torch.float64)
        if not bool(torch.isfinite(derivatives).all()):
            return Estimate(None, dropped_members=len(population))
        stats = {"directional_derivative": float(derivatives.abs().mean())}
        return Estimate((derivatives / len(population)).to(torch.float32), stats=stats)

    def noise(self, noise_seed: int, param_index: int, param: Tensor) -> Tensor:
        return sample_direction(derive_seed(noise_seed, param_index), param.shape, param.device, self.distribution)
