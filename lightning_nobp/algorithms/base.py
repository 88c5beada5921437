"""The ask/tell interface shared by every forward-only algorithm, with no dependency on Lightning.

One optimizer step is: ``ask`` for a population (which perturbations to evaluate), evaluate the loss of each
member, ``tell`` the fitness vector and receive one coefficient per member. The gradient estimate is then
``sum_i coefficients[i] * sign_i * E(noise_seed_i)``, where ``E`` is the algorithm's noise for each parameter,
regenerated from the seed whenever it is needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_nobp.algorithms.counter_noise import sample_direction

__all__ = ["Algorithm", "Estimate", "Member", "Population", "sample_direction", "weighted_factor_columns"]

#: largest stack of member noise (bytes) :meth:`Algorithm.combine` forms at once; larger weights sum member by member
COMBINE_STACK_BYTES = 64 * 1024 * 1024


def weighted_factor_columns(a: Tensor, b: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Stacked low-rank factors as two wide matrices whose product is ``sum_k weights[k] A_k B_k^T``.

    Args:
        a: ``(K, out, r)``: every member's ``A``.
        b: ``(K, in, r)``: every member's ``B``.
        weights: ``(K,)``: each member's coefficient (folded into ``A``).

    Returns:
        ``(out, K r)`` and ``(in, K r)``; member ``k`` owns columns ``k r`` to ``(k + 1) r``.
    """
    scaled_a = (a * weights.view(-1, 1, 1)).permute(1, 0, 2).reshape(a.shape[1], -1)
    return scaled_a, b.permute(1, 0, 2).reshape(b.shape[1], -1)


@dataclass(frozen=True)
class Member:
    """One perturbed copy of the weights: ``theta + sigma * sign * E(noise_seed)``.

    Args:
        noise_seed: the counter-derived seed that regenerates this member's noise ``E``.
        sign: ``+1.0`` or ``-1.0``; antithetic pairs share ``noise_seed`` and differ in sign.
    """

    noise_seed: int
    sign: float = 1.0


@dataclass(frozen=True)
class Population:
    """The members to evaluate for one (micro-)batch and the perturbation scale.

    Args:
        members: the members, in the order their fitness values are expected by ``tell``.
        sigma: the perturbation scale (MeZO's ``eps``, ES's ``sigma``).
    """

    members: tuple[Member, ...]
    sigma: float

    def __len__(self) -> int:
        return len(self.members)

    def groups(self) -> list[int]:
        """For every member, the index of its noise group (consecutive members sharing a seed: antithetic pairs)."""
        labels: list[int] = []
        previous: int | None = None
        for member in self.members:
            if member.noise_seed != previous:
                previous = member.noise_seed
                labels.append(labels[-1] + 1 if labels else 0)
            else:
                labels.append(labels[-1])
        return labels


@dataclass
class Estimate:
    """What ``tell`` returns: per-member coefficients of the gradient estimate and statistics to log.

    Args:
        coefficients: tensor ``[P]``; the gradient estimate is ``sum_i coefficients[i] * sign_i * E_i``.
            ``None`` means the step must be skipped (for example a non-finite fitness).
        dropped_members: members left out of the estimate because their fitness was not finite.
        stats: scalars worth logging (without the ``nobp/`` prefix); tensors from :meth:`Algorithm.tell_on_device`.
        applies: from :meth:`Algorithm.tell_on_device` only: a boolean tensor on the fitness's device, false when the
            step must be skipped (the host does not know: the update is gated by it on the device).
    """

    coefficients: Tensor | None
    dropped_members: int | Tensor = 0
    stats: dict[str, float | Tensor] = field(default_factory=dict)
    applies: Tensor | None = None

    @property
    def skipped(self) -> bool:
        """Whether the step is skipped, as far as the host knows (a device-side estimate is gated instead)."""
        return self.coefficients is None


class Algorithm(ABC):
    """Base class of forward-only estimators (ask/tell), free of any training framework.

    Subclasses define which members a step evaluates (``ask``), how fitness becomes coefficients (``tell``)
    and the noise of one parameter (``noise``).
    """

    @abstractmethod
    def ask(self, step_seed: int) -> Population:
        """Return the population to evaluate for the micro-batch identified by ``step_seed``."""

    def tell_on_device(self, population: Population, fitness: Tensor) -> Estimate | None:
        """:meth:`tell` without any host synchronisation, where the algorithm has such a form: coefficients always
        a tensor on the fitness's device (zeros for a skipped step), :attr:`Estimate.applies` the skip decision,
        statistics as tensors. ``None`` (the default): only :meth:`tell` exists.

        Args:
            population: what :meth:`ask` returned.
            fitness: the members' losses ``[P]`` on the device.
        """
        return None

    @abstractmethod
    def tell(self, population: Population, fitness: Tensor) -> Estimate:
        """Turn the fitness (loss, lower is better) of every member into gradient-estimate coefficients."""

    @abstractmethod
    def noise(self, noise_seed: int, param_index: int, param: Tensor) -> Tensor:
        """Regenerate the noise ``E`` of one parameter for one member seed, in float32, shaped like ``param``."""

    def combine(self, weights: Mapping[int, float], param_index: int, param: Tensor) -> Tensor:
        """``sum over seeds of weights[seed] * E(seed)`` for one parameter, in float32.

        The update of every step goes through this. Subclasses with structured noise (low-rank factors)
        override it to form the sum without materialising one ``E`` per member.

        Args:
            weights: coefficient of each noise seed (antithetic members already merged).
            param_index: the parameter's position in the trained parameter list.
            param: the parameter (for shape, device).
        """
        seeds = [seed for seed, weight in weights.items() if weight != 0.0]
        if not seeds:
            return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        coefficients = torch.tensor([weights[seed] for seed in seeds], dtype=torch.float32, device=param.device)
        shared = self.shared_basis_factors(seeds, param_index, param)
        if shared is not None:  # E_s = A_s P^T: (sum_s w_s A_s) P^T, no per-member matrix
            factors, basis = shared
            combined = (coefficients @ factors.view(len(seeds), -1)).view(factors.shape[1:])
            return (combined @ basis.t()).view(param.shape)
        if len(seeds) * param.numel() * 4 > COMBINE_STACK_BYTES:  # a large weight: one member's noise at a time
            total = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            for seed in seeds:
                total.add_(self.noise(seed, param_index, param), alpha=weights[seed])
            return total
        stacked = self.stacked_noise(seeds, param_index, param)
        return (coefficients @ stacked.view(len(seeds), -1)).view(param.shape)

    def stacked_noise(self, noise_seeds: Sequence[int], param_index: int, param: Tensor) -> Tensor:
        """The noise ``E`` of one parameter for several member seeds, stacked ``(S, *param.shape)`` in float32.

        Equal to stacking :meth:`noise` of every seed (the default does exactly that); algorithms override it to
        draw a whole population's noise with a few batched operations.

        Args:
            noise_seeds: the members' noise seeds.
            param_index: the parameter's position in the trained parameter list.
            param: the parameter (for shape, device).
        """
        return torch.stack([self.noise(seed, param_index, param) for seed in noise_seeds])

    def stacked_low_rank_factors(
        self, noise_seeds: Sequence[int], param_index: int, param: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """:meth:`low_rank_factors` of several member seeds, stacked: ``(A (S, out, r), B (S, in, r))``, or ``None``
        for dense noise. The default stacks the per-seed factors; overrides draw them together."""
        factors = [self.low_rank_factors(seed, param_index, param) for seed in noise_seeds]
        if not factors or any(f is None for f in factors):
            return None
        return torch.stack([f[0] for f in factors]), torch.stack([f[1] for f in factors])  # type: ignore[index]

    def prefetch_noise(
        self,
        noise_seeds: Sequence[int],
        params: Sequence[tuple[int, Tensor, bool, bool]],
        window: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        """Draw (and keep, where the algorithm caches noise) the noise of several parameters for ``noise_seeds``
        ahead of the step's evaluations. The default draws one parameter at a time; algorithms that can draw
        several together override it.

        Args:
            noise_seeds: the members' noise seeds.
            params: ``(index, param, low_rank, dense_allowed)``: the parameter's position and the parameter,
                whether its low-rank factors are wanted (where it has them), and whether its dense noise may be
                drawn (small enough) otherwise.
            window: given a number of steps, the noise seeds of the steps around this one that are drawn together
                with it (see ``EvolutionStrategy.prefetch_noise``); the default ignores it.
        """
        for index, param, low_rank, dense_allowed in params:
            if low_rank and self.stacked_low_rank_factors(noise_seeds, index, param) is not None:
                continue
            if dense_allowed:
                self.stacked_noise(noise_seeds, index, param)

    def shared_basis_factors(
        self, noise_seeds: Sequence[int], param_index: int, param: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Dense noise that lies in a basis shared by every seed, as factors ``(A (S, out, r), P (in, r))`` with
        ``E_s = A_s P^T`` (input-subspace noise of a data-fed weight), or ``None`` (the default). The estimator
        then evaluates a population's layer as ``x W^T + (x P) A_s^T``, with ``x P`` computed once."""
        return None

    def noise_stream(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[int, str] | None:
        """The counter-based stream ``(seed, distribution)`` of this parameter's dense noise, or ``None``.

        Low-bit weights regenerate their noise inside fused kernels from a Philox stream (element ``i`` of the
        flattened parameter at offset ``i``) instead of calling :meth:`noise`: an algorithm that returns a stream
        here promises that its noise is that stream's distribution (``"gaussian"`` or ``"rademacher"``), scaled by
        one. ``None`` (the default, and for low-rank noise) makes the kernels use :meth:`noise` /
        :meth:`low_rank_factors` instead.
        """
        return None

    def low_rank_factors(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[Tensor, Tensor] | None:
        """Factors ``(A, B)`` with ``E = A B^T`` for a matrix parameter, or ``None`` for dense noise.

        Layers that can (``nn.Linear``) then compute ``x W^T + sigma (x B) A^T`` instead of forming ``W + sigma E``.
        The factors may be shared with the algorithm's noise cache: do not modify them in place.
        """
        return None

    @property
    def population_chunk(self) -> int | None:
        """Members evaluated together in one batched forward (``None``: all of this process's members)."""
        return None

    @property
    def shards_population(self) -> bool:
        """Whether several processes split the members between them (ES) or all evaluate every member (MeZO).

        Sharded members are evaluated on their process's data; unsharded fitness is averaged over processes.
        """
        return False

    @property
    def uses_jvp(self) -> bool:
        """Whether ``tell`` takes directional derivatives ``grad L . E_i`` (one forward-mode pass per member,
        ``ForwardGradient``) instead of losses at perturbed weights."""
        return False

    @property
    def forwards_per_step(self) -> int:
        """Loss evaluations per micro-batch (the population size)."""
        return len(self.ask(0))
