"""Perturbations of data-fed layers inside the principal subspace of their inputs.

The gradient of an ``nn.Linear`` weight is ``sum_n g_n x_n^T``: its rows lie in the span of the layer's inputs. When
those inputs are the data (an MLP's first layer on images or features), most of their energy sits in a few
principal directions: 97 % of Fashion-MNIST's pixel energy in 128 of 784. A perturbation ``a b^T`` whose ``b`` has
components outside that subspace changes the layer's outputs only through the small rest, so most of an isotropic
draw is spent on directions the loss barely sees. Drawing ``b`` inside the subspace (``b = P P^T b'`` with ``P``
the ``(in, r)`` orthonormal principal basis) keeps the output perturbation ``x . b`` almost unchanged and divides
the dimension the estimate has to cover by ``in / r``. Inside the subspace the noise is partially whitened
(:func:`principal_basis`).

A layer is *data-fed* when its input does not depend on any trained parameter: found once, by comparing its
inputs at the current weights with its inputs at a perturbed member's weights. Its basis comes from the
uncentered second moment of its inputs over the first batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: evaluations after which the bases are recomputed (then fixed): the moments of 1, 2, 4, 8 and 16 batches
OBSERVED_EVALUATIONS = (1, 2, 4, 8, 16)
#: the noise along principal direction ``i`` scales as ``lambda_i^-WHITENING`` (0: none, 0.5: full whitening);
#: 0.25 measured best on Fashion-MNIST (84.8 % at 3,000 steps against 83.6 % at 0 and 83.9 % at 0.5)
WHITENING = 0.25


def principal_basis(moment: Tensor, energy: float) -> tuple[Tensor, Tensor] | None:
    """The fewest principal directions holding ``energy`` of ``moment``'s trace, and the noise scale of each.

    The scales partially whiten the directions: a unit Gaussian ``s`` drawn as ``b = P (scales * s)`` moves the
    layer's outputs (``x . b``) by ``lambda_i^(1/2)`` along direction ``i`` instead of ``lambda_i``, so the few
    dominant directions (the mean image) do not drown the rest, and ``E[(x . b)^2]`` stays ``E[|x|^2]``, as for
    an isotropic ``b``: sigma keeps its meaning.

    Args:
        moment: a symmetric positive semi-definite ``(in, in)`` second moment of a layer's inputs.
        energy: the fraction of the trace to keep, in ``(0, 1]``.

    Returns:
        ``(P, scales)``: the orthonormal basis ``(in, r)`` and ``(r,)`` scales; ``None`` when the moment is zero
        or not finite.
    """
    if not bool(torch.isfinite(moment).all()):
        return None
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    total = float(values.sum())
    if total <= 0.0:
        return None
    kept = min(int((values.cumsum(0) < energy * total).sum()) + 1, moment.shape[0])
    values = values[:kept].clamp_min(total * 1e-12)
    weights = values.pow(-WHITENING)
    scales = weights * (total / float((values * weights.square()).sum())) ** 0.5
    return vectors[:, :kept].float().contiguous(), scales.float()


def _rows(value: Tensor) -> Tensor:
    """A float32 copy of a layer input as rows ``(rows, in)``."""
    return value.detach().reshape(-1, value.shape[-1]).float().clone()


def _fingerprint(value: Tensor) -> tuple[tuple[int, ...], float, float]:
    """Shape, sum and norm of a tensor in float64: equal for equal inputs, without keeping a copy."""
    value = value.detach()
    return (
        tuple(value.shape),
        float(value.sum(dtype=torch.float64)),
        float(torch.linalg.vector_norm(value, dtype=torch.float64)),
    )


@contextlib.contextmanager
def _pre_hooks(
    layers: Mapping[int, nn.Module], make_hook: Callable[[int], Callable[[nn.Module, tuple], None]]
) -> Iterator[None]:
    """Forward pre-hooks ``make_hook(index)`` on ``layers`` within the context."""
    handles = [module.register_forward_pre_hook(make_hook(index)) for index, module in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def tap_inputs(layers: Mapping[int, nn.Module]) -> Iterator[dict[int, list[Tensor]]]:
    """Within the context, every call of a layer keeps a float32 copy of its input rows ``(rows, in)``.

    Args:
        layers: the layers to watch, by weight index.

    Yields:
        The inputs of each layer's calls, in call order, by weight index.
    """
    seen: dict[int, list[Tensor]] = {index: [] for index in layers}

    def tap(index: int) -> Callable[[nn.Module, tuple], None]:
        return lambda module, args: seen[index].append(_rows(args[0]))

    with _pre_hooks(layers, tap):
        yield seen


class InputSubspaces:
    """The data-fed layers of a model, their inputs' second moments and the principal bases derived from them.

    Args:
        energy: fraction of the inputs' energy the basis keeps, in ``(0, 1]`` (see :func:`principal_basis`).
    """

    def __init__(self, energy: float) -> None:
        self.energy = float(energy)
        #: data-fed layers by weight index (``None``: not searched yet)
        self.layers: dict[int, nn.Module] | None = None
        self.moments: dict[int, Tensor] = {}
        self.rows: dict[int, int] = {}
        self.evaluations = 0
        #: bases computed from the latest moments, waiting for the end of the step (``commit``)
        self.pending: dict[int, tuple[Tensor, Tensor] | None] = {}
        #: the bases committed so far (what the algorithm draws with), by weight index
        self.installed: dict[int, tuple[Tensor, Tensor] | None] = {}

    def due(self) -> bool:
        """Count one evaluation of the population; ``True`` when its inputs should be observed."""
        self.evaluations += 1
        return self.evaluations in OBSERVED_EVALUATIONS and (self.layers is None or bool(self.layers))

    def search(
        self, candidates: Mapping[int, nn.Module], at_weights: Callable[[], None], perturbed: Callable[[], None]
    ) -> dict[int, list[Tensor]]:
        """Keep the candidates whose inputs are the same at perturbed weights (their input is the data).

        Args:
            candidates: ``nn.Linear`` layers with a trained weight, by weight index.
            at_weights: runs the training computation at the current weights.
            perturbed: runs it at one member's perturbed weights (with the same random state).

        Returns:
            The inputs of the data-fed layers (the same at both weights).
        """
        # the first pass keeps only fingerprints, the second copies the inputs of layers that still match: a
        # large model's activations are never all held at once
        fingerprints: dict[int, list[tuple]] = {index: [] for index in candidates}
        kept: dict[int, list[Tensor]] = {index: [] for index in candidates}
        unchanged = dict.fromkeys(candidates, True)

        def fingerprint(index: int) -> Callable[[nn.Module, tuple], None]:
            return lambda module, args: fingerprints[index].append(_fingerprint(args[0]))

        def compare(index: int) -> Callable[[nn.Module, tuple], None]:
            def hook(module: nn.Module, args: tuple) -> None:
                call = len(kept[index])
                if not unchanged[index] or call >= len(fingerprints[index]):
                    unchanged[index] = False
                elif _fingerprint(args[0]) != fingerprints[index][call]:
                    unchanged[index] = False
                    kept[index].clear()
                else:
                    kept[index].append(_rows(args[0]))

            return hook

        with _pre_hooks(candidates, fingerprint):
            at_weights()
        with _pre_hooks(candidates, compare):
            perturbed()
        self.layers = {
            index: module
            for index, module in candidates.items()
            if unchanged[index] and kept[index] and len(kept[index]) == len(fingerprints[index])
        }
        return {index: kept[index] for index in self.layers}

    def observe(self, inputs: Mapping[int, list[Tensor]]) -> None:
        """Add a batch's inputs to the moments and compute the bases that ``commit`` will install."""
        for index, calls in inputs.items():
            rows = torch.cat(calls)
            if not torch.isfinite(rows).all():
                continue  # a non-finite batch would poison the moment: skip it
            moment = rows.t() @ rows
            self.moments[index] = moment if index not in self.moments else self.moments[index] + moment
            self.rows[index] = self.rows.get(index, 0) + rows.shape[0]
            self.pending[index] = principal_basis(self.moments[index] / self.rows[index], self.energy)

    def commit(self) -> dict[int, tuple[Tensor, Tensor] | None]:
        """The bases computed since the last commit (by weight index), to install between two steps."""
        pending, self.pending = self.pending, {}
        self.installed.update(pending)
        if self.evaluations >= OBSERVED_EVALUATIONS[-1]:
            self.moments.clear()  # the bases are final: the moments are not needed any more
        return pending

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (checkpoints): tensors, lists and numbers only."""
        return {
            "layers": None if self.layers is None else sorted(self.layers),
            "evaluations": self.evaluations,
            "rows": dict(self.rows),
            "moments": dict(self.moments),
            "pending": {index: basis for index, basis in self.pending.items() if basis is not None},
            "installed": {index: basis for index, basis in self.installed.items() if basis is not None},
        }

    def load_state_dict(self, state: Mapping[str, Any], modules: Mapping[int, nn.Module]) -> None:
        """Continue from :meth:`state_dict`.

        Args:
            state: what :meth:`state_dict` returned.
            modules: the model's ``nn.Linear`` layers by weight index (the saved layers must be among them).
        """
        layers = state["layers"]
        missing = [index for index in layers or [] if index not in modules]
        if missing:
            raise ValueError(
                f"the checkpoint's input subspaces are for layers (parameter positions {missing}) this model does"
                " not have as nn.Linear weights: resume with the model and optimizer that saved it"
            )
        self.layers = None if layers is None else {index: modules[index] for index in layers}
        self.evaluations = int(state["evaluations"])
        self.rows = dict(state["rows"])
        self.moments = dict(state["moments"])
        self.pending = {index: tuple(basis) for index, basis in state["pending"].items()}  # type: ignore[misc]
        self.installed = {index: tuple(basis) for index, basis in state["installed"].items()}  # type: ignore[misc]


class InputSubspaceTracker:
    """Observes the data-fed layers' inputs on the evaluations that count and installs their bases in the algorithm.

    Args:
        energy: fraction of the inputs' energy the bases keep.
        layers: the candidate ``nn.Linear`` layers (unshared, with a trained weight), by weight index, as they
            are when asked (the parameters read outside their layers are known after the first step's probe).
        params: the trained parameters, in ``param_index`` order.
        algorithm: the estimator that draws noise in the bases (its ``set_input_basis``).
    """

    def __init__(
        self, energy: float, layers: Callable[[], Mapping[int, nn.Module]], params: Sequence[Tensor], algorithm: Any
    ) -> None:
        self.subspaces = InputSubspaces(energy)
        self.candidates = layers
        self.params = list(params)
        self.algorithm = algorithm

    def observe(self, at_weights: Callable[[], None], perturbed: Callable[[], None]) -> None:
        """On the evaluations that observe inputs, run the loss at the current weights and add the data-fed
        layers' inputs to their moments (the first time, after finding those layers). The new bases are installed
        when the optimizer step ends (:meth:`install`).

        Args:
            at_weights: runs the loss at the current weights.
            perturbed: runs it at one member's perturbed weights (the search for data-fed layers).
        """
        subspaces = self.subspaces
        if not subspaces.due():
            return
        if subspaces.layers is None:
            seen = subspaces.search(self.candidates(), at_weights, perturbed)
        else:
            with tap_inputs(subspaces.layers) as seen:
                at_weights()
        subspaces.observe(seen)

    def install(self) -> None:
        """Give the algorithm the bases computed since the last call (between optimizer steps)."""
        self._give(self.subspaces.commit())

    def state_dict(self) -> dict[str, Any]:
        return self.subspaces.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with a checkpoint's input subspaces: the same layers, moments and installed bases."""
        self.subspaces.load_state_dict(state, self.candidates())
        self._give(self.subspaces.installed)

    def _give(self, bases: Mapping[int, tuple[Tensor, Tensor] | None]) -> None:
        """Install ``bases`` (by parameter index) in the algorithm (``None`` restores isotropic noise)."""
        install = getattr(self.algorithm, "set_input_basis", None)
        for index, basis in bases.items() if install is not None else ():
            install(self.params[index], basis)
