"""``PopulationEstimator``: one optimizer's ask/evaluate/tell step over its parameters, framework-free.

It composes the parts that each do one job: the member layers installed on the user's modules
(:mod:`~lightning_nobp.perturb.member_layers`), the members' noise (:mod:`~lightning_nobp.perturb.member_noise`),
their evaluation (:mod:`~lightning_nobp.perturb.evaluation`), per-row estimates
(:mod:`~lightning_nobp.perturb.row_estimates`), input subspaces (:mod:`~lightning_nobp.perturb.input_subspace`)
and the update (:mod:`~lightning_nobp.perturb.update`). It knows parameters, modules, a loss callable and an
:class:`~lightning_nobp.algorithms.Algorithm`, and nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nobp.algorithms.base import Algorithm, Member, Population
from lightning_nobp.kernels.dense_update import FUSED_DTYPES
from lightning_nobp.perturb.direct_step import DirectHyperparameters
from lightning_nobp.perturb.evaluation import (
    LossFn,
    MemberEvaluation,
    MemberInputs,
    RngSnapshot,
    first_member,
    loss_context,
)
from lightning_nobp.perturb.input_subspace import InputSubspaceTracker
from lightning_nobp.perturb.member_layers import MemberLayers
from lightning_nobp.perturb.member_noise import MemberNoise
from lightning_nobp.perturb.owners import ParameterOwners, ParameterReadProbe
from lightning_nobp.perturb.row_estimates import RowEstimateOptions, RowEstimates
from lightning_nobp.perturb.update import EstimateWriter


def _plain_spelling(algorithm: Algorithm) -> str:
    """How the user asks for ``algorithm`` without per-row estimates and input subspaces."""
    name = type(algorithm).__name__
    return f"{name}(..., extras=None)" if hasattr(algorithm, "extras") else f"{name}(..., input_subspace=None)"


@dataclass(frozen=True)
class EstimatorOptions:
    """What an estimator does besides the algorithm's plain estimate (the engine derives them from the algorithm).

    Args:
        rows: per-row estimates of row-local layers and the exact head gradient.
        input_subspace: kept-energy fraction of the data-fed layers' input subspaces (``None``: off).
        compile: evaluate chunks of members under ``torch.compile``.
        fused: update bf16/float32 weights with the fused dense kernel and draw their dense noise from its Philox
            streams (one layer's perturbed copy at a time; ``lightning_nobp.kernels.dense_update``).
    """

    rows: RowEstimateOptions = field(default_factory=RowEstimateOptions)
    input_subspace: float | None = None
    compile: bool = False
    fused: bool = False

    @classmethod
    def of(
        cls, algorithm: Algorithm, processes: int = 1, compile: bool = False, fused: bool = False
    ) -> EstimatorOptions:
        """The options an algorithm asks for (``per_row_estimates``, ``input_subspace``, ...).

        Per-row estimates and input subspaces need every member's losses on one process; with several processes
        the plain estimate is used.

        Args:
            algorithm: the estimator.
            processes: how many processes share the population.
            compile: evaluate chunks of members under ``torch.compile``.
            fused: the fused dense kernels for bf16/float32 weights (see the class).
        """
        one_process = processes == 1
        rows = RowEstimateOptions(
            enabled=one_process
            and bool(getattr(algorithm, "per_row_estimates", False))
            and bool(getattr(algorithm, "antithetic", False)),
            embeddings=bool(getattr(algorithm, "per_row_embeddings", False)),
            max_outputs=getattr(algorithm, "per_row_max_outputs", None),
            exact_head=bool(getattr(algorithm, "exact_head_gradient", False)),
        )
        energy = getattr(algorithm, "input_subspace", None)
        if not one_process:
            turned_off = [
                name
                for name, asked in (
                    ("per_row_estimates", getattr(algorithm, "per_row_estimates", False)
                     and getattr(algorithm, "antithetic", False)),
                    (f"input_subspace={energy}", energy is not None),
                )
                if asked
            ]
            if turned_off:
                warnings.warn(
                    f"{type(algorithm).__name__} with {processes} processes: {', '.join(turned_off)} turned off (they"
                    " need every member's losses and inputs on one process; each process sees only its members and"
                    " the scalar fitness values are all they exchange), so the estimate is the plain one and"
                    " differs from a one-process run. Set them off explicitly to silence this"
                    f" ({_plain_spelling(algorithm)}).",
                    stacklevel=2,
                )
        return cls(rows=rows, input_subspace=energy if one_process else None, compile=compile, fused=fused)


def scalar_loss(value: object, where: str) -> Tensor:
    """Check that ``value`` is a one-element tensor loss and return it as a 0-dim tensor.

    It is not detached: evaluations run under ``torch.no_grad()`` already, and forward-mode tangents
    (``ForwardGradient``) must survive.

    Args:
        value: what the user's code returned as its loss.
        where: the name of the user's function, for the error message.
    """
    if value is None:
        raise RuntimeError(
            f"{where} returned None during a perturbed evaluation although the unperturbed pass returned a loss."
            " NoBackpropStrategy re-evaluates the loss at perturbed weights: compute it the same way on every call."
        )
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{where} must return a loss tensor (or a dict with a 'loss' tensor), got {type(value).__name__}"
        )
    if value.numel() != 1:
        raise ValueError(
            f"{where} returned a loss of shape {tuple(value.shape)}; forward-only training needs a scalar loss."
            " Reduce it first, e.g. `loss = loss.mean()`."
        )
    return value.reshape(())


class PopulationEstimator:
    """Runs one step of an algorithm's ask/evaluate/tell loop over given parameters.

    Building it installs the member layers on the modules that hold ``params``; :meth:`close` removes them.

    Args:
        algorithm: the estimator (``MeZO``, ...).
        roots: the modules that own ``params``.
        params: the parameters to train, in a fixed order: a parameter's position is its ``param_index``.
        names: optional names of the parameters, for error messages.
        options: per-row estimates and input subspaces (off by default).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        roots: Iterable[nn.Module],
        params: Sequence[Tensor],
        names: Sequence[str] | None = None,
        options: EstimatorOptions | None = None,
    ) -> None:
        if len(params) == 0:
            raise ValueError(
                "NoBackpropStrategy found no trainable parameters: return an optimizer over the parameters to train"
                " from `configure_optimizers` (parameters with requires_grad=True)."
            )
        options = options or EstimatorOptions()
        self.algorithm = algorithm
        self.params = list(params)
        self.names = list(names) if names is not None else [f"param[{i}]" for i in range(len(self.params))]
        roots = list(roots)
        self.owners = ParameterOwners(roots, self.params)
        self.layers = MemberLayers(self.owners)
        self.layers.install()
        self.noise = MemberNoise(algorithm, self.owners, streamed_dense=options.fused)
        self.low_bit = self.noise.low_bit
        self.rows = RowEstimates(options.rows, self.owners, self.noise, loss_context(self.params))
        #: a step can run without host synchronisation: fitness kept on the parameters' device, ``tell_on_device``,
        #: every weight on the fused kernels (no per-row estimates, no input subspaces, no low-bit weights)
        self.device_resident = (
            options.fused
            and not options.rows.enabled
            and not options.rows.exact_head
            and options.input_subspace is None
            and not self.low_bit
            and type(algorithm).tell_on_device is not Algorithm.tell_on_device
            and len({p.device for p in self.params}) == 1
        )
        self.evaluation = MemberEvaluation(
            self.layers,
            self.noise,
            self.rows,
            self.names,
            roots,
            compile=options.compile,
            fitness_device=self.params[0].device if self.device_resident else None,
        )
        fused = (
            {
                i
                for i, p in enumerate(self.params)
                if i not in self.low_bit and p.dtype in FUSED_DTYPES and p.is_contiguous()
            }
            if options.fused
            else set()
        )
        self.writer = EstimateWriter(
            algorithm, self.params, self.names, self.low_bit, self.rows, fused, self.noise.streamed
        )
        self.input_subspaces: InputSubspaceTracker | None = None
        if options.input_subspace is not None:
            self.input_subspaces = InputSubspaceTracker(
                options.input_subspace,
                lambda: {layer.weight_index: layer.module for layer in self.owners.unshared_layers()},
                self.params,
                algorithm,
            )

    def close(self) -> None:
        """Give the user's modules their own ``forward`` back."""
        self.layers.remove()

    @property
    def probed(self) -> bool:
        """Whether the parameters read outside their layers are known (:meth:`probe_parameter_reads`)."""
        return self.evaluation.probed

    @property
    def batching(self) -> bool | None:
        """Whether the user's code evaluates under ``vmap``: ``None`` until tried, then ``True`` or ``False``."""
        return self.evaluation.batching

    @batching.setter
    def batching(self, value: bool | None) -> None:
        self.evaluation.batching = value

    def perturbation(
        self, population: Population, member: Member, probe: ParameterReadProbe | None = None
    ) -> contextlib.AbstractContextManager:
        """A context in which every parameter computes as ``theta + sigma * sign * E(member)``."""
        return self.layers.perturbed(self.noise.member(population, member, self.unperturbed_indices()), probe)

    def dense_noise(self, noise_seed: int, index: int) -> Tensor:
        """The float32 noise ``E`` of parameter ``index`` for one member seed."""
        return self.noise.dense(noise_seed, index)

    def unperturbed_indices(self) -> set[int]:
        """Parameters the members evaluate at their stored value (an exact-gradient head)."""
        return self.rows.unperturbed_indices()

    def probe_parameter_reads(self, population: Population, evaluation: Callable[[], object]) -> None:
        """Find parameters read outside their owner's forward, once (see ``MemberEvaluation.probe``)."""
        self.evaluation.probe(population, evaluation)

    def prefetch_noise(
        self,
        population: Population,
        members: Sequence[int],
        window: Callable[[int], Sequence[Population]] | None = None,
    ) -> None:
        """Draw the noise of ``members`` ahead of the step's evaluations (see ``MemberNoise.prefetch``)."""
        self.noise.prefetch(population, members, window)

    def evaluate(self, population: Population, loss_fn: LossFn, *args: Any, **kwargs: Any) -> Tensor:
        """The members' losses, one evaluation each (see ``MemberEvaluation.loop``)."""
        return self.evaluation.loop(population, loss_fn, *args, **kwargs)

    def evaluate_batched(self, population: Population, loss_fn: LossFn, *args: Any, **kwargs: Any) -> Tensor:
        """The members' losses, chunks of members batched with ``vmap`` (see ``MemberEvaluation.batched``)."""
        return self.evaluation.batched(population, loss_fn, *args, **kwargs)

    def evaluate_members(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        batched: bool = True,
        member_inputs: MemberInputs | None = None,
    ) -> Tensor:
        """The members' losses, batched where the user's code allows it, else one at a time; the input subspaces
        observe the batch first when they are due (see ``MemberEvaluation.evaluate``)."""
        if self.input_subspaces is not None:
            self._observe_inputs(population, loss_fn, rng, member_inputs)
        return self.evaluation.evaluate(
            population, loss_fn, rng, known, members, batched, member_inputs, self.algorithm.population_chunk
        )

    def _observe_inputs(
        self, population: Population, loss_fn: LossFn, rng: RngSnapshot | None, member_inputs: MemberInputs | None
    ) -> None:
        assert self.input_subspaces is not None
        inputs = None if member_inputs is None else first_member(member_inputs([0]))

        def at_weights() -> None:
            if rng is not None:
                rng.restore()
            with torch.no_grad(), self.evaluation.loss_context():
                loss_fn() if inputs is None else loss_fn(inputs)

        def perturbed() -> None:
            with self.perturbation(population, population.members[0]):
                at_weights()

        self.input_subspaces.observe(at_weights, perturbed)

    def install_input_bases(self) -> None:
        """Give the algorithm the input bases computed since the last call.

        The strategy calls it when an optimizer step ends (after its update, or after skipping it), so every
        micro-batch of a step draws its noise in the same bases and the update regenerates exactly that noise.
        """
        if self.input_subspaces is not None:
            self.input_subspaces.install()

    def input_subspace_state(self) -> dict[str, Any] | None:
        """The input subspaces' state for a checkpoint (``None`` when they are off)."""
        return None if self.input_subspaces is None else self.input_subspaces.state_dict()

    def load_input_subspace_state(self, state: dict[str, Any]) -> None:
        """Continue with a checkpoint's input subspaces."""
        if self.input_subspaces is not None:
            self.input_subspaces.load_state_dict(state)

    def row_input_tap(self, into: dict[int, Tensor] | None = None) -> contextlib.AbstractContextManager:
        """Within the context, forwards keep the row-local layers' input rows (see ``RowEstimates.input_tap``)."""
        return self.rows.input_tap(into)

    def accumulate_gradient(self, population: Population, coefficients: Tensor, scale: float = 1.0) -> float:
        """``.grad`` path (see ``EstimateWriter.accumulate_gradient``)."""
        return self.writer.accumulate_gradient(population, coefficients, scale)

    def apply_update(
        self,
        terms: Sequence[tuple[Population, Tensor]],
        hyperparameters: Sequence[DirectHyperparameters],
        rounding_seed: int,
        normalize: bool = False,
        states: Sequence[dict[str, Any]] | None = None,
    ) -> float:
        """Direct path (see ``EstimateWriter.apply_update``)."""
        return self.writer.apply_update(terms, hyperparameters, rounding_seed, normalize, states)

    def apply_update_on_device(
        self,
        terms: Sequence[tuple[Population, Tensor]],
        hyperparameters: Sequence[DirectHyperparameters],
        rounding_seed: int,
        normalize: bool,
        applies: Tensor,
    ) -> Tensor:
        """Direct path without host synchronisation (see ``EstimateWriter.apply_update_on_device``)."""
        return self.writer.apply_update_on_device(terms, hyperparameters, rounding_seed, normalize, applies)


__all__ = ["EstimatorOptions", "PopulationEstimator", "RngSnapshot", "scalar_loss", "LossFn", "MemberInputs"]
