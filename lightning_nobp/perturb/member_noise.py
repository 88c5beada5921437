"""The members' perturbations as tensors: what one member, or a chunk of members evaluated together, adds to each
trained parameter.

Low-rank-capable weights (``nn.Linear``, ``nn.Embedding``) take their noise as factors ``(A, B)`` with ``E = A B^T``
(or ``(A_s, P)`` on a basis shared by the members: input-subspace noise of a data-fed layer); every other parameter
takes its dense noise. Noise is regenerated from the members' seeds by the algorithm (its caches make each seed's
draw happen once per step), or, for low-bit weights and (with fused kernels) dense float weights, from the
counter-based Philox streams the fused kernels use: a member evaluated on its own then computes each such layer
with a perturbed copy of that layer alone, written by one kernel (no noise tensor of the weight's size).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import Algorithm, Member, Population
from lightning_nobp.kernels.dense_update import FUSED_DTYPES, dense_perturbed
from lightning_nobp.kernels.perturbed_weight import perturbed_weight
from lightning_nobp.kernels.philox import philox_noise
from lightning_nobp.lowbit import is_low_bit, layout_of
from lightning_nobp.perturb.member_layers import Perturbation
from lightning_nobp.perturb.owners import ParameterOwners

#: the most bytes of dense noise per parameter :meth:`MemberNoise.prefetch` draws ahead
PREFETCH_DENSE_BYTES = 1024 * 1024
#: the most bytes of stacked dense noise a batched evaluation holds (more members are evaluated in chunks)
STACKED_NOISE_BYTES = 256 * 1024 * 1024

SeedNoise = list[tuple[int, list[int], "tuple[Tensor, Tensor] | Tensor"]]
"""The noise a chunk stacked per seed, by parameter: ``(param index, seeds, factors or dense noise)``."""


@dataclass
class ChunkNoise:
    """The perturbations of a chunk of members, stacked along a leading member dimension.

    Args:
        dense: float32 deltas ``(k, *param.shape)`` by parameter index.
        low_rank: factors by parameter index: ``(A (k, out, r), B (k, in, r))`` (scale and sign folded into
            ``A``), or ``(A (k, out, r), P (in, r))`` with one basis ``P`` for every member.
    """

    dense: dict[int, Tensor] = field(default_factory=dict)
    low_rank: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def flat(self) -> tuple[list[Tensor], list[int | None]]:
        """The tensors as a flat list and their ``vmap`` dimensions (a shared basis is not vmapped): ``vmap``'s
        argument handling is pytree work per leaf and per level of nesting, so flat is cheapest."""
        tensors: list[Tensor] = [self.dense[i] for i in self.dense]
        dims: list[int | None] = [0] * len(tensors)
        for a, b in self.low_rank.values():
            tensors += [a, b]
            dims += [0, None if b.dim() == 2 else 0]
        return tensors, dims

    def unflatten(self, values: Sequence[Tensor]) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """The inverse of :meth:`flat` applied to ``values`` (inside ``vmap``: one member's views)."""
        split = len(self.dense)
        factors = values[split:]
        low_rank = {index: (factors[2 * k], factors[2 * k + 1]) for k, index in enumerate(self.low_rank)}
        return dict(zip(self.dense, values[:split])), low_rank


class MemberNoise:
    """Draws the perturbations of members for their evaluation.

    Args:
        algorithm: the estimator whose noise the members carry.
        owners: the parameter-to-module map (which parameters take low-rank corrections).
        streamed_dense: draw the dense noise of bf16 and float32 weights from the fused kernels' Philox streams
            (see :attr:`streamed`).
    """

    def __init__(self, algorithm: Algorithm, owners: ParameterOwners, streamed_dense: bool = False) -> None:
        self.algorithm = algorithm
        self.owners = owners
        self.params = owners.params
        #: indices of the parameters stored in low bit (torchao subclasses): noise from Philox streams, fused updates
        self.low_bit = {index for index, param in enumerate(self.params) if is_low_bit(param)}
        #: dense float weights whose noise is the algorithm's Philox stream (``noise_stream``): perturbed copies and
        #: updates by the fused kernels (``lightning_nobp.kernels.dense_update``). Not with input subspaces, whose
        #: projected noise is no stream.
        self.streamed: set[int] = set()
        if streamed_dense and getattr(algorithm, "input_subspace", None) is None:
            self.streamed = {
                index
                for index, param in enumerate(self.params)
                if index not in self.low_bit
                and param.dtype in FUSED_DTYPES
                and param.is_contiguous()
                and not self._has_low_rank_factors(index)
                and algorithm.noise_stream(0, index, param) is not None
            }
        #: float32 bytes of one member's dense noise in a batched evaluation (``None``: not computed yet)
        self._dense_member_bytes: int | None = None
        #: whether no parameter takes low-rank factors, for the low-rank-capable set it was computed for
        self._dense_only: tuple[frozenset[int], bool] | None = None

    def _has_low_rank_factors(self, index: int) -> bool:
        param = self.params[index]
        return index in self.owners.low_rank_allowed and self.algorithm.low_rank_factors(0, index, param) is not None

    def stream_drawn(self, index: int) -> bool:
        """Whether parameter ``index``'s dense noise is its Philox stream (low-bit or streamed weights)."""
        return index in self.low_bit or index in self.streamed

    def dense(self, noise_seed: int, index: int) -> Tensor:
        """The float32 noise ``E`` of parameter ``index`` for one member seed.

        Low-bit and streamed parameters draw it from the algorithm's Philox stream (the one the fused kernels
        regenerate); the others from :meth:`Algorithm.noise`.
        """
        param = self.params[index]
        stream = self.algorithm.noise_stream(noise_seed, index, param) if self.stream_drawn(index) else None
        if stream is None:
            return self.algorithm.noise(noise_seed, index, param)
        seed, distribution = stream
        return philox_noise(seed, param.shape, distribution, param.device)

    def member(self, population: Population, member: Member, unperturbed: Collection[int] = ()) -> Perturbation:
        """One member's perturbation: low-rank factors where the layers take them, every other parameter's noise
        drawn when its layer runs (one layer at a time), low-bit weights through the fused kernel."""
        scale = population.sigma * member.sign
        low_rank = {}
        for index in sorted(self.owners.low_rank_allowed - set(unperturbed)):
            factors = self.algorithm.low_rank_factors(member.noise_seed, index, self.params[index])
            if factors is not None:
                a, b = factors
                low_rank[index] = (a * scale, b)

        def delta(index: int, stored: Tensor) -> Tensor:
            return self.dense(member.noise_seed, index).mul_(scale)

        def stream_value(index: int, stored: Tensor) -> Tensor | None:
            if not self.stream_drawn(index):
                return None
            stream = self.algorithm.noise_stream(member.noise_seed, index, stored)
            if stream is None:
                return None
            seed, distribution = stream
            gaussian = distribution == "gaussian"
            if index in self.streamed:  # one layer's perturbed copy, written by one kernel
                seeds = torch.tensor([seed], dtype=torch.int64)
                return dense_perturbed(stored, seeds, torch.tensor([scale], dtype=torch.float32), gaussian)
            return perturbed_weight(layout_of(stored), [seed], [scale], gaussian, stored.dtype)

        return Perturbation(
            low_rank=low_rank,
            delta_fn=delta,
            value_fn=stream_value if self.low_bit or self.streamed else None,
            unperturbed=frozenset(unperturbed),
        )

    def chunk(
        self,
        population: Population,
        members: Sequence[int],
        unperturbed: Collection[int] = (),
        kept: Collection[int] = (),
        seed_noise: SeedNoise | None = None,
    ) -> ChunkNoise:
        """The perturbations of ``members``, stacked along a leading member dimension.

        ``nn.Linear`` and ``nn.Embedding`` weights get low-rank factors ``(sigma sign A, B)`` when the algorithm has
        them (the layer adds ``(x B) A^T`` or ``A[x] B^T``); every other parameter gets its dense ``sigma sign E``.

        Args:
            population: the step's population.
            members: the member indices of the chunk.
            unperturbed: parameters left at their stored value.
            kept: parameters whose per-seed noise is appended to ``seed_noise`` (for per-row estimates).
            seed_noise: where the noise of ``kept`` parameters goes.
        """
        chosen = [population.members[i] for i in members]
        # each noise is drawn once per seed (antithetic twins share it), then spread to the members by one index
        seeds = list(dict.fromkeys(m.noise_seed for m in chosen))
        position = {seed: i for i, seed in enumerate(seeds)}
        spread = torch.tensor([position[m.noise_seed] for m in chosen])
        scales = torch.tensor([population.sigma * m.sign for m in chosen], dtype=torch.float32)
        noise = ChunkNoise()
        low_rank_allowed = self.owners.low_rank_allowed
        for index, param in enumerate(self.params):
            if index in unperturbed:
                continue
            members_of = spread.to(param.device)
            scale = scales.to(param.device)
            shared = self._shared_basis_factors(index, seeds, low_rank_allowed, kept)
            if shared is not None:  # B is the basis itself: one copy for every member (vmapped with in_dims None)
                coordinates, basis = shared
                noise.low_rank[index] = (coordinates[members_of].mul_(scale.view(-1, 1, 1)), basis)
                continue
            drawn = self.of_seeds(index, seeds, low_rank=index in low_rank_allowed)
            if index in kept and seed_noise is not None:
                seed_noise.append((index, seeds, drawn))
            if isinstance(drawn, tuple):
                a_seeds, b_seeds = drawn
                noise.low_rank[index] = (a_seeds[members_of].mul_(scale.view(-1, 1, 1)), b_seeds[members_of])
            else:
                noise.dense[index] = drawn[members_of].mul_(scale.view(-1, *([1] * param.dim())))
        return noise

    def _shared_basis_factors(
        self, index: int, seeds: Sequence[int], low_rank_allowed: set[int], kept: Collection[int]
    ) -> tuple[Tensor, Tensor] | None:
        """The algorithm's shared-basis factors of a low-rank-capable layer's dense noise (``(A (S, out, r),
        P (in, r))``), where they apply: not for low-bit weights, nor for noise kept for per-row estimates."""
        if index not in low_rank_allowed or index in self.low_bit or index in kept:
            return None
        return self.algorithm.shared_basis_factors(seeds, index, self.params[index])

    def of_seeds(self, index: int, seeds: Sequence[int], low_rank: bool) -> tuple[Tensor, Tensor] | Tensor:
        """Parameter ``index``'s noise for ``seeds``, stacked along a first dimension: the algorithm's low-rank
        factors ``(A, B)`` where allowed and available, else the dense ``E``."""
        param = self.params[index]
        if low_rank:
            factors = self.algorithm.stacked_low_rank_factors(seeds, index, param)
            if factors is not None:
                return factors
        if self.stream_drawn(index) and self.algorithm.noise_stream(seeds[0], index, param) is not None:
            return torch.stack([self.dense(seed, index) for seed in seeds])  # the kernels' Philox streams
        return self.algorithm.stacked_noise(seeds, index, param)

    def prefetch(
        self,
        population: Population,
        members: Sequence[int],
        window: Callable[[int], Sequence[Population]] | None = None,
    ) -> None:
        """Draw the noise of ``members`` now, one stack per parameter (the algorithm caches it), so that a single
        member's perturbation (the official training pass, the first step's probe) reads its noise from the stacks
        the batched evaluation uses instead of drawing it on its own first. The strategies call it at the start of
        every step: each noise is then drawn in the same company in a resumed run as in an uninterrupted one (a
        projection on an input basis is not bit-identical across batch sizes).

        Only low-rank factors and small dense noise are drawn ahead (at most ``PREFETCH_DENSE_BYTES`` per
        parameter); low-bit weights' noise comes from the kernels' streams and is not cached.

        Args:
            population: what ``algorithm.ask`` returned.
            members: the member indices this process evaluates.
            window: given a number of steps, the populations of that many consecutive steps around this one (the
                same populations in the same order on each of them, this step's among them; empty where the
                later steps cannot be foreseen): an algorithm may draw their noise together with this step's.
        """
        seeds = list(dict.fromkeys(population.members[i].noise_seed for i in members))
        if not seeds:
            return
        low_rank_allowed = self.owners.low_rank_allowed
        wanted = [
            (index, param, index in low_rank_allowed, 4 * param.numel() * len(seeds) <= PREFETCH_DENSE_BYTES)
            for index, param in enumerate(self.params)
            if not self.stream_drawn(index)
        ]

        def window_seeds(steps: int) -> list[int]:
            assert window is not None
            chosen = (step.members[i].noise_seed for step in window(steps) for i in members)
            return list(dict.fromkeys(chosen))

        self.algorithm.prefetch_noise(seeds, wanted, window_seeds if window is not None else None)

    def one_member_at_a_time(self) -> bool:
        """Whether members are best evaluated one at a time, each layer perturbed when it runs: when a batched
        chunk would stack dense noise for the whole model (no parameter takes low-rank factors and the dense
        noise comes from the fused kernels' streams: MeZO, OpenES), or when one member's dense noise alone
        exceeds the budget."""
        allowed = frozenset(self.owners.low_rank_allowed)  # shrinks when the probe finds outside reads
        if self._dense_only is None or self._dense_only[0] != allowed:
            self._dense_only = (allowed, not any(self._has_low_rank_factors(index) for index in allowed))
        return (self._dense_only[1] and bool(self.streamed)) or self.members_within_budget() == 1

    def members_within_budget(self) -> int:
        """How many members' dense noise fits in ``STACKED_NOISE_BYTES`` (at least 1): a batched evaluation
        stacks one dense copy per member of every parameter without low-rank factors (MeZO's and OpenES's
        noise), which must not turn a large model's inference-sized memory into a population-sized one."""
        if self._dense_member_bytes is None:
            low_rank_allowed = self.owners.low_rank_allowed
            self._dense_member_bytes = sum(
                4 * param.numel()
                for index, param in enumerate(self.params)
                if index not in low_rank_allowed or self.algorithm.low_rank_factors(0, index, param) is None
            )
        return max(1, STACKED_NOISE_BYTES // max(self._dense_member_bytes, 1))
