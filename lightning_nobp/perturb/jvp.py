"""Directional derivatives of an unmodified loss by forward-mode AD (``torch.func.jvp``): no tape, no backward.

For a member with direction ``v`` (regenerated from its seed, one layer at a time), the loss is evaluated as a
function of one scalar ``alpha`` at weights ``theta + alpha * v`` (the same member layers that perturb the weights
for MeZO and ES, so nothing is written to the stored weights), and ``torch.func.jvp`` at ``alpha = 0`` with
tangent 1 returns the directional derivative ``grad L . v`` together with the loss. Several directions are
evaluated in one pass with ``torch.func.vmap`` where the user's code allows it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import Population
from lightning_nobp.perturb.estimator import LossFn, MemberInputs, PopulationEstimator, RngSnapshot
from lightning_nobp.perturb.evaluation import first_member
from lightning_nobp.perturb.member_layers import Perturbation
from lightning_nobp.perturb.norm_statistics import metric_states_kept, running_statistics_frozen

JVP_FAILED_MESSAGE = (
    "ForwardGradient evaluates training_step with forward-mode AD (torch.func.jvp), which failed: {error}."
    " Every op of the loss needs a forward-mode derivative and the loss must not be detached or turned into a"
    " Python number. Use MeZO (finite differences) for code that forward-mode AD cannot run."
)


def _scalar(value: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError("the loss evaluated by ForwardGradient must be a one-element tensor")
    return value.reshape(())


def _jvp_at_zero(loss_along: Callable[[Tensor], Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(L(0), dL/dalpha(0))`` of a scalar function of one scalar ``alpha``."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    return torch.func.jvp(loss_along, (zero,), (one,))


def _loop(
    estimator: PopulationEstimator,
    population: Population,
    loss_fn: LossFn,
    indices: Sequence[int],
    device: torch.device,
    rng: RngSnapshot | None,
    member_inputs: MemberInputs | None,
) -> tuple[Tensor, Tensor]:
    derivatives = torch.zeros(len(indices), dtype=torch.float32)
    losses = torch.zeros(len(indices), dtype=torch.float32)
    for position, index in enumerate(indices):
        member = population.members[index]
        scale = population.sigma * member.sign
        inputs = None if member_inputs is None else first_member(member_inputs([index]))

        def loss_along(
            alpha: Tensor, seed: int = member.noise_seed, scale: float = scale, inputs: Any = inputs
        ) -> Tensor:
            def delta(param_index: int, stored: Tensor) -> Tensor:
                return estimator.dense_noise(seed, param_index).mul_(scale) * alpha

            with estimator.layers.perturbed(Perturbation(delta_fn=delta)):
                return _scalar(loss_fn() if inputs is None else loss_fn(inputs))

        if rng is not None:
            rng.restore()
        with torch.no_grad():
            loss, derivative = _jvp_at_zero(loss_along, device)
        derivatives[position] = derivative.float().cpu()
        losses[position] = loss.float().cpu()
    return derivatives, losses


def _batched(
    estimator: PopulationEstimator,
    population: Population,
    loss_fn: LossFn,
    indices: Sequence[int],
    device: torch.device,
    rng: RngSnapshot | None,
    member_inputs: MemberInputs | None,
) -> tuple[Tensor, Tensor]:
    derivatives = torch.zeros(len(indices), dtype=torch.float32)
    losses = torch.zeros(len(indices), dtype=torch.float32)
    size = estimator.algorithm.population_chunk or max(len(indices), 1)

    def member_jvp(directions: dict[int, Tensor], inputs: Any) -> tuple[Tensor, Tensor]:
        def loss_along(alpha: Tensor) -> Tensor:
            dense = {index: direction * alpha for index, direction in directions.items()}
            with estimator.layers.perturbed(Perturbation(dense=dense)):
                return _scalar(loss_fn() if inputs is None else loss_fn(inputs))

        return _jvp_at_zero(loss_along, device)

    for start in range(0, len(indices), size):
        part = list(indices[start : start + size])
        chosen = [population.members[i] for i in part]
        directions = {
            param_index: torch.stack(
                [estimator.dense_noise(m.noise_seed, param_index).mul_(population.sigma * m.sign) for m in chosen]
            )
            for param_index, param in enumerate(estimator.params)
        }
        inputs = None if member_inputs is None else member_inputs(part)
        if rng is not None:
            rng.restore()
        with torch.no_grad():
            in_dims = (0, None if inputs is None else 0)
            loss, derivative = torch.func.vmap(member_jvp, in_dims=in_dims, randomness="same")(directions, inputs)
        positions = slice(start, start + len(part))
        derivatives[positions] = derivative.float().cpu()
        losses[positions] = loss.float().cpu()
    return derivatives, losses


def directional_derivatives(
    estimator: PopulationEstimator,
    population: Population,
    loss_fn: LossFn,
    rng: RngSnapshot | None = None,
    members: Sequence[int] | None = None,
    batched: bool = True,
    member_inputs: MemberInputs | None = None,
) -> tuple[Tensor, Tensor]:
    """The directional derivative ``grad L . (sigma sign E_i)`` and the loss ``L`` for each member.

    Members are evaluated together with ``torch.func.vmap`` when ``batched`` and the user's code allows it (the
    first failure switches the estimator to one member at a time, with one warning, as
    :meth:`PopulationEstimator.evaluate_members` does).

    Args:
        estimator: holds the parameters, their owners and the algorithm (whose ``noise`` gives the directions).
        population: what ``algorithm.ask`` returned.
        loss_fn: evaluates the loss at the current weights; must not detach it.
        rng: restored before each (batched) evaluation, so random layers behave identically for every member.
        members: the indices to evaluate; all by default. The others are left at 0.
        batched: try the batched path at all.
        member_inputs: per-member inputs passed to ``loss_fn`` (see :meth:`PopulationEstimator.evaluate`).

    Returns:
        Two float32 CPU tensors ``[P]``: the directional derivatives and the (unperturbed) losses.
    """
    indices = list(range(len(population))) if members is None else list(members)
    device = estimator.params[0].device
    derivatives = torch.zeros(len(population), dtype=torch.float32)
    losses = torch.zeros(len(population), dtype=torch.float32)
    if not indices:
        return derivatives, losses
    evaluation = estimator.evaluation
    # running statistics and metric states stay as they are (the official pass updates them); jvp also refuses
    # BatchNorm's in-place update of its statistics
    with running_statistics_frozen(evaluation.norms), metric_states_kept(evaluation.metrics):
        result = _jvp_results(estimator, population, loss_fn, indices, device, rng, batched, member_inputs)
    derivatives[indices], losses[indices] = result
    return derivatives, losses


def _jvp_results(
    estimator: PopulationEstimator,
    population: Population,
    loss_fn: LossFn,
    indices: list[int],
    device: torch.device,
    rng: RngSnapshot | None,
    batched: bool,
    member_inputs: MemberInputs | None,
) -> tuple[Tensor, Tensor]:
    """The directional derivatives and losses of ``indices``: batched where possible, else one at a time."""
    result: tuple[Tensor, Tensor] | None = None
    if batched and estimator.batching is not False and len(indices) > 1:
        try:
            result = _batched(estimator, population, loss_fn, indices, device, rng, member_inputs)
        except Exception as error:  # noqa: BLE001 - any failure of vmap means: fall back to the loop
            if estimator.batching:
                raise
            estimator.batching = False
            warnings.warn(
                f"ForwardGradient cannot evaluate several directions at once with torch.func.vmap"
                f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); evaluating them"
                " one at a time instead (slower).",
                stacklevel=2,
            )
        else:
            estimator.batching = True
    if result is None:
        try:
            result = _loop(estimator, population, loss_fn, indices, device, rng, member_inputs)
        except (RuntimeError, NotImplementedError) as error:
            raise RuntimeError(JVP_FAILED_MESSAGE.format(error=str(error).splitlines()[0])) from error
    return result
