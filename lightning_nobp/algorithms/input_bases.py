"""``InputBases``: noise of data-fed weights drawn inside the principal subspace of their inputs.

The estimator finds the layers fed by the data and their inputs' principal bases
(``lightning_nobp.perturb.input_subspace``) and installs them here between steps; the algorithm then projects the
input side of those weights' noise on them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import sample_direction
from lightning_nobp.algorithms.noise_cache import NoiseCache


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
    ``noise_cache`` in ``__init__``, then draw dense noise with :meth:`_draw_dense` and pass low-rank input factors
    through :meth:`_in_input_subspace`)."""

    input_subspace: float | None
    noise_cache: NoiseCache

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
        """``P diag(scales) P^T columns`` for a weight with an input basis (``columns``: ``(in, k)``), else
        ``columns``."""
        basis = self.input_bases.get(id(param))
        if basis is None:
            return columns
        directions, scales = basis
        return directions @ (directions.t() @ columns).mul_(scales.view(-1, 1))

    def _draw_dense(self, seed: int, param: Tensor, distribution: str = "gaussian") -> Tensor:
        """A dense noise shaped like ``param``, drawn from ``seed``: inside the input subspace where ``param`` has
        one (the ``(out, r)`` coordinates drawn, then ``coordinates diag(scales) P^T``), else everywhere."""
        basis = self.input_bases.get(id(param))
        if basis is None:
            return sample_direction(seed, param.shape, param.device, distribution)
        directions, scales = basis
        coordinates = sample_direction(
            seed, torch.Size((param.shape[0], directions.shape[1])), param.device, distribution
        )
        return (coordinates.mul_(scales) @ directions.t()).reshape(param.shape)
