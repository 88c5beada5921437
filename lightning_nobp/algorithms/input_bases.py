"""``InputBases``: noise of data-fed weights drawn inside the principal subspace of their inputs.

The estimator finds the layers fed by the data and their inputs' principal bases
(``lightning_nobp.perturb.input_subspace``) and installs them here between steps; the algorithm then projects the
input side of those weights' noise on them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_nobp.algorithms.counter_noise import derive_seeds, sample_directions
from lightning_nobp.algorithms.noise_cache import NoiseCache
from lightning_nobp.algorithms.noise_requests import NoiseRequest
from lightning_nobp.algorithms.seeds import derive_seed


def check_input_subspace(owner: str, value: object) -> float | None:
    """``value`` as a kept-energy fraction, or ``None``; a clear error otherwise.

    Args:
        owner: the algorithm's class name, for the message.
        value: the ``input_subspace`` argument.
    """
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(
            f"{owner}(input_subspace={value!r}): the kept energy must be a fraction in (0, 1], e.g. 0.97, or None"
            " to perturb data-fed layers in every direction"
        )
    return float(value)


class InputBases:
    """Mixin of algorithms whose noise can be drawn inside an input subspace (set ``input_subspace`` and
    ``noise_cache`` in ``__init__``, then draw dense noise with :meth:`_dense_stack` and pass low-rank input factors
    through :meth:`_in_input_subspace`)."""

    input_subspace: float | None
    noise_cache: NoiseCache
    #: where dense noise comes from (``lightning_nobp.algorithms.counter_noise.sample_directions``): ``"counter"``
    #: for populations, ``"generator"`` for algorithms that draw one or a few directions a step
    noise_source: str = "generator"

    @property
    def input_bases(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Installed bases ``(P (in, r) orthonormal, scales (r,))`` by ``id(weight)``."""
        bases = self.__dict__.get("_input_bases")
        if bases is None:
            bases = self.__dict__["_input_bases"] = {}
        return bases

    def __getstate__(self) -> dict:
        # the bases are keyed by the identity of this process's weights: meaningless elsewhere (re-observed there)
        return {key: value for key, value in self.__dict__.items() if key != "_input_bases"}

    def set_input_basis(self, param: Tensor, basis: tuple[Tensor, Tensor] | None) -> None:
        """Draw ``param``'s noise inside an input subspace from now on: the input side ``B'`` of its noise becomes
        ``P (scales * P^T B')`` (``lightning_nobp.perturb.input_subspace.principal_basis``).

        Called between steps (noise drawn earlier is forgotten); ``None`` restores isotropic noise.

        Args:
            param: the weight (a matrix ``(out, in)``).
            basis: ``(P, scales)``: an orthonormal ``(in, r)`` basis and the ``(r,)`` noise scale along each column.
        """
        if basis is None:
            self.input_bases.pop(id(param), None)
        else:
            directions, scales = basis
            self.input_bases[id(param)] = (directions.to(param.device, torch.float32), scales.to(param.device))
        self.noise_cache.clear()

    def _in_input_subspace(self, param: Tensor, columns: Tensor) -> Tensor:
        """``P diag(scales) P^T columns`` for a weight with an input basis, else ``columns``.

        Args:
            param: the weight.
            columns: ``(S, in, k)``: the input-side factors of ``S`` members, projected together.
        """
        basis = self.input_bases.get(id(param))
        if basis is None:
            return columns
        directions, scales = basis
        # one pair of matrix products over all members' columns side by side: a (in, r) basis broadcast against
        # (S, in, k) would be copied once per member, which is much slower
        members, features, rank = columns.shape
        side_by_side = columns.transpose(0, 1).reshape(features, members * rank)
        coordinates = (directions.t() @ side_by_side).mul_(scales.view(-1, 1))
        projected = directions @ coordinates
        return projected.view(features, members, rank).transpose(0, 1).contiguous()

    def _draw_dense(self, seeds: Sequence[int] | Tensor, param: Tensor, distribution: str = "gaussian") -> Tensor:
        """Dense noises shaped like ``param`` (no input basis), one per (derived) seed, stacked ``(S, *shape)``."""
        return sample_directions(seeds, param.shape, param.device, distribution, self.noise_source)

    def _streams(self, seeds: Sequence[int], param_index: int, device: torch.device) -> list[int] | Tensor:
        """The stream seeds ``derive_seed(seed, param_index)`` of ``seeds``, in the form ``noise_source`` draws."""
        if self.noise_source == "counter":  # vectorized: many seeds
            return derive_seeds(seeds, param_index, device)
        return [derive_seed(seed, param_index) for seed in seeds]

    def _coordinate_stack(
        self, seeds: Sequence[int], param_index: int, param: Tensor, distribution: str = "gaussian"
    ) -> Tensor:
        """The input-subspace coordinates of ``param``'s dense noise, ``(S, out, r)`` scaled by the basis' scales
        (a new tensor): each seed's noise is ``coordinates P^T`` (cached; absent seeds drawn together)."""
        request = self._coordinate_request(seeds, param_index, param, distribution)
        (stacked,) = self.noise_cache.get_stacked(
            request.keys, lambda missing: request.draw([seeds[i] for i in missing])
        )
        return stacked

    def _coordinate_request(
        self, seeds: Sequence[int], param_index: int, param: Tensor, distribution: str = "gaussian"
    ) -> NoiseRequest:
        """How the coordinates :meth:`_coordinate_stack` caches come from ``param``'s noise streams."""
        shape, device = param.shape, param.device  # read once: slow on tensor subclasses (low-bit weights)
        directions, scales = self.input_bases[id(param)]
        rank = directions.shape[1]
        keys = self.noise_cache.keys(("coordinates", param_index, shape, device, distribution), seeds)
        return NoiseRequest(
            keys,
            param_index,
            shape[0] * rank,
            lambda drawn: (drawn.view(-1, shape[0], rank).mul_(scales),),
            device,
            distribution,
            self.noise_source,
        )

    def _subspace_factors(
        self, seeds: Sequence[int], param_index: int, param: Tensor, distribution: str = "gaussian"
    ) -> tuple[Tensor, Tensor] | None:
        """A weight's dense input-subspace noise as factors: ``E_s = A_s P^T`` with ``A_s`` the scaled coordinates
        ``(S, out, r)`` and the basis ``P (in, r)`` shared by every seed; ``None`` without a basis.

        A batched population then computes ``x W^T + (x P) A_s^T``: the data's ``x P`` once for all members
        instead of a whole ``W + E_s`` per member (``PopulationEstimator``'s shared-basis factors)."""
        basis = self.input_bases.get(id(param))
        if basis is None or param.dim() != 2:
            return None
        return self._coordinate_stack(seeds, param_index, param, distribution), basis[0]

    def _dense_request(self, seeds: Sequence[int], param_index: int, param: Tensor) -> NoiseRequest:
        """How ``param``'s Gaussian dense noise for ``seeds`` comes from counter-based streams (the entries
        :meth:`_dense_stack` caches, or their input-subspace coordinates), for drawing several parameters' noise
        together (``draw_requests``)."""
        if id(param) in self.input_bases:
            return self._coordinate_request(seeds, param_index, param)
        shape, device = param.shape, param.device  # read once: slow on tensor subclasses (low-bit weights)
        keys = self.noise_cache.keys(("dense", param_index, shape, device, "gaussian"), seeds)
        return NoiseRequest(keys, param_index, shape.numel(), lambda drawn: (drawn.view(-1, *shape),), device)

    def _dense_stack(
        self, seeds: Sequence[int], param_index: int, param: Tensor, distribution: str = "gaussian"
    ) -> Tensor:
        """The dense noise of ``param`` for every member seed, stacked ``(S, *param.shape)`` (a new tensor).

        Each seed's noise is drawn from ``derive_seed(seed, param_index)`` and cached; the seeds absent from the
        cache are drawn and projected together.
        """
        shape, device = param.shape, param.device  # read once: slow on tensor subclasses (low-bit weights)
        keys = self.noise_cache.keys(("dense", param_index, shape, device, distribution), seeds)

        def draw_many(missing: list[int]) -> tuple[Tensor]:
            chosen = [seeds[i] for i in missing]
            basis = self.input_bases.get(id(param))
            if basis is not None:  # inside the input subspace: its coordinates (drawn once), then P^T
                coordinates = self._coordinate_stack(chosen, param_index, param, distribution)
                return (torch.matmul(coordinates, basis[0].t()).reshape(len(chosen), *shape),)
            return (self._draw_dense(self._streams(chosen, param_index, device), param, distribution),)

        (stacked,) = self.noise_cache.get_stacked(keys, draw_many)
        return stacked
