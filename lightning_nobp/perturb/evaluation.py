"""Evaluate the loss of a population's members through the user's unmodified code.

Members are evaluated together where the code allows it: ``torch.func.vmap`` runs the loss once per chunk of
members, the member layers (:mod:`lightning_nobp.perturb.member_layers`) batch every layer's computation over the
chunk, and each shared weight is read once. Code ``vmap`` cannot batch (``.item()``, data-dependent Python control
flow) falls back to one member at a time, with one warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lightning_nobp.algorithms.base import Population
from lightning_nobp.perturb.batched_attention import MemberAttentionMode
from lightning_nobp.perturb.inplace_activations import activations_after_linear, activations_in_place
from lightning_nobp.perturb.member_layers import MemberLayers, Perturbation
from lightning_nobp.perturb.member_noise import ChunkNoise, MemberNoise
from lightning_nobp.perturb.narrow_softmax import NarrowSoftmaxMode
from lightning_nobp.perturb.norm_statistics import (
    metric_states_kept,
    metrics_of,
    running_statistics_frozen,
    running_statistics_layers,
)
from lightning_nobp.perturb.owners import ParameterReadProbe
from lightning_nobp.perturb.row_estimates import RowEstimates

LossFn = Callable[..., Tensor]
"""Evaluates the loss at the current (possibly perturbed) weights; takes the member's inputs when there are any."""

MemberInputs = Callable[[Sequence[int]], Any]
"""Given member indices, the inputs of those members stacked along a leading dimension (a pytree of tensors)."""


class RngSnapshot:
    """The global RNG state of the CPU and of one accelerator, so every evaluation sees the same dropout masks.

    Args:
        device: the device whose generator is captured besides the CPU's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


def loss_context(params: Sequence[Tensor]) -> Callable[[], contextlib.AbstractContextManager]:
    """Where members' losses are evaluated: ``NarrowSoftmaxMode`` when every parameter is on the CPU (PyTorch's CPU
    ``log_softmax`` over a few classes is slow), nothing elsewhere."""
    if all(param.device.type == "cpu" for param in params):
        return NarrowSoftmaxMode
    return contextlib.nullcontext


def first_member(stacked: Any) -> Any:
    """Member 0's view of stacked per-member inputs."""
    return tree_map(lambda tensor: tensor[0] if isinstance(tensor, Tensor) else tensor, stacked)


class MemberEvaluation:
    """Evaluates members' losses: batched with ``vmap`` where possible, else one at a time.

    Args:
        layers: the member layers installed on the user's modules.
        noise: draws the members' perturbations.
        rows: the per-row estimates (their recorder wraps the members' losses when a step can use them).
        names: the parameters' names, for error messages.
        roots: the user's modules (searched for activations that may run in place).
        compile: evaluate chunks of members under ``torch.compile`` (see :class:`CompiledChunks`).
        fitness_device: where the fitness vector is kept (the parameters' device: no copy to the host).
    """

    def __init__(
        self,
        layers: MemberLayers,
        noise: MemberNoise,
        rows: RowEstimates,
        names: Sequence[str],
        roots: Sequence[torch.nn.Module],
        compile: bool = False,
        fitness_device: torch.device | None = None,
    ) -> None:
        self.layers = layers
        self.fitness_device = fitness_device or torch.device("cpu")
        #: the compiled chunk evaluation (``None``: eager)
        self.compiled: CompiledChunks | None = CompiledChunks(layers) if compile else None
        self.noise = noise
        self.rows = rows
        self.names = list(names)
        #: activations a batched evaluation computes in place (``lightning_nobp.perturb.inplace_activations``)
        self.in_place_activations = activations_after_linear(roots)
        #: batch norms whose running statistics the members must not update (the official pass does, once)
        self.norms = running_statistics_layers(roots)
        #: torchmetrics objects whose state the members' evaluations must leave as it was
        self.metrics = metrics_of(roots)
        #: NarrowSoftmaxMode where every parameter is on the CPU, else nothing (:func:`loss_context`)
        self._softmax_context = loss_context(layers.owners.params)
        #: the recorder of per-row losses also does NarrowSoftmaxMode's work (CPU weights)
        self.narrow_softmax = self._softmax_context is NarrowSoftmaxMode
        #: on the CPU, a batched population's attention runs as one fused call (perturb/batched_attention.py)
        on_cpu = all(param.device.type == "cpu" for param in layers.owners.params)
        self.attention_context = MemberAttentionMode if on_cpu else contextlib.nullcontext
        self.probed = False
        #: whether the user's code evaluates under vmap: None until tried, then True or False
        self.batching: bool | None = None

    def tracks_side_effects(self) -> bool:
        """Whether a training forward changes state here: BatchNorm-style running statistics in training mode, or
        torchmetrics objects (the official pass must then run at the unperturbed weights)."""
        tracking = any(layer.training and layer.track_running_stats for layer in self.norms)
        return tracking or bool(self.metrics)

    @contextlib.contextmanager
    def loss_context(self) -> Iterator[None]:
        """Where members' losses and the other extra forwards of a step are evaluated (the search for data-fed layers
        and their input moments, ``PopulationEstimator._observe_inputs``): running statistics and torchmetrics states
        stay as they are (only the official pass updates them), and ``NarrowSoftmaxMode`` is on for CPU weights."""
        with running_statistics_frozen(self.norms), metric_states_kept(self.metrics), self._softmax_context():
            yield

    def probe(self, population: Population, evaluation: Callable[[], object]) -> None:
        """Find parameters read outside their owner's forward, once, by watching perturbed evaluations.

        Args:
            population: the current population (its first member perturbs the weights during the probe).
            evaluation: runs the user's computation once; its result is ignored.
        """
        owners = self.layers.owners
        for _ in range(2):
            probe = ParameterReadProbe(owners)
            perturbation = self.noise.member(population, population.members[0], self.rows.unperturbed_indices())
            with torch.no_grad(), probe, self.layers.perturbed(perturbation, probe):
                with running_statistics_frozen(self.norms), metric_states_kept(self.metrics):
                    evaluation()
            missed = probe.read - owners.whole_evaluation
            if not missed:
                self.probed = True
                return
            owners.read_outside |= missed
        names = ", ".join(self.names[i] for i in sorted(missed))
        raise RuntimeError(
            f"parameters {names} are read through a reference that cannot be perturbed (a cached copy of the"
            " parameter). Read parameters through their module attribute at every call."
        )

    def member_perturbation(self, population: Population, index: int) -> Perturbation:
        """Member ``index``'s perturbation, for an evaluation of its own."""
        return self.noise.member(population, population.members[index], self.rows.unperturbed_indices())

    def loop(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        member_inputs: MemberInputs | None = None,
    ) -> Tensor:
        """The loss of the members, one perturbed evaluation each, as a float32 tensor ``[P]`` (on
        ``fitness_device``).

        Args:
            population: what ``algorithm.ask`` returned.
            loss_fn: evaluates the loss at the current (perturbed) weights.
            rng: restored before each evaluation, so random layers behave identically for every member.
            known: fitness of members already evaluated (e.g. the official training pass), by member index.
            members: the indices to evaluate (this process's shard); the others are left at 0. All by default.
            member_inputs: per-member inputs passed to ``loss_fn`` (e.g. each antithetic pair's slice of the batch);
                ``loss_fn`` takes no argument when omitted.
        """
        known = known or {}
        fitness = torch.zeros(len(population), dtype=torch.float32, device=self.fitness_device)
        restore = rng.restore if rng is not None else lambda: None
        recorder = self.rows.recorder(population, loss_fn, restore, members, member_inputs)
        rows: list[tuple[list[int], Tensor, Tensor]] = []
        for index in range(len(population)) if members is None else members:
            if index in known:
                fitness[index] = known[index].float().to(self.fitness_device)
                continue
            restore()
            perturbation = self.member_perturbation(population, index)
            with torch.no_grad(), self.layers.perturbed(perturbation), self.loss_context(), running_statistics_frozen(
                self.norms
            ):
                if recorder is None:
                    loss = loss_fn() if member_inputs is None else loss_fn(first_member(member_inputs([index])))
                else:
                    recorder.reset()
                    with recorder:
                        loss = loss_fn()
                    if recorder.rows is not None:
                        rows.append(([index], recorder.rows.float().cpu()[None], recorder.mismatch(loss).cpu()[None]))
            fitness[index] = loss.float().to(self.fitness_device)
        if recorder is not None:
            self.rows.keep(population, fitness, rows, loss_fn, restore, recorder.targets)
        return fitness

    def batched(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        chunk: int | None = None,
        member_inputs: MemberInputs | None = None,
    ) -> Tensor:
        """Like :meth:`loop`, but members are stacked along a leading dimension and evaluated together.

        ``torch.func.vmap`` runs ``loss_fn`` once per chunk of members: each layer reads its shared weight once and
        computes every member's output (``x W^T + (x B_m) A_m^T`` for ``nn.Linear`` with low-rank noise). Random
        layers draw the same numbers for every member, as in :meth:`loop`. Raises whatever ``vmap`` raises for code
        it cannot batch (``.item()``, data-dependent Python control flow).

        Args:
            population: what ``algorithm.ask`` returned.
            loss_fn: evaluates the loss at the current (perturbed) weights; must return a one-element tensor.
            rng: restored before each chunk.
            known: fitness of members already evaluated, by member index.
            members: the indices to evaluate (this process's shard); all by default.
            chunk: members per batched forward (bounds activation memory); all at once by default.
            member_inputs: per-member inputs, vmapped along with the perturbations (see :meth:`loop`).
        """
        known = known or {}
        fitness = torch.zeros(len(population), dtype=torch.float32, device=self.fitness_device)
        for index, value in known.items():
            fitness[index] = value.float().to(self.fitness_device)
        todo = [i for i in (range(len(population)) if members is None else members) if i not in known]
        size = min(chunk or max(len(todo), 1), self.noise.members_within_budget())
        restore = rng.restore if rng is not None else lambda: None
        recorder = self.rows.recorder(population, loss_fn, restore, members, member_inputs)
        if recorder is not None:  # the recorder wraps every member's loss: it also takes NarrowSoftmaxMode's role
            recorder.narrow_softmax = self.narrow_softmax
        loss_context = self.loss_context if recorder is None else contextlib.nullcontext
        unperturbed = frozenset(self.rows.unperturbed_indices())
        kept = self.rows.kept_indices()
        rows: list[tuple[list[int], Tensor, Tensor]] = []
        recorded: list[bool] = []

        for start in range(0, len(todo), size):
            part = todo[start : start + size]
            chunk_noise = self.noise.chunk(population, part, unperturbed, kept, self.rows.seed_noise)
            inputs = None if member_inputs is None else member_inputs(part)
            if recorder is None and self.compiled is not None and self.compiled.applies():
                restore()
                with running_statistics_frozen(self.norms):
                    losses = self.compiled(loss_fn, chunk_noise, unperturbed, inputs)
                if losses is not None:
                    fitness[part] = losses.float().to(self.fitness_device)
                    continue

            def member_loss(inputs: Any, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                dense, low_rank = chunk_noise.unflatten(tensors)
                perturbation = Perturbation(low_rank=low_rank, dense=dense, unperturbed=unperturbed)
                with self.layers.perturbed(perturbation):
                    if recorder is None:
                        loss = loss_fn() if member_inputs is None else loss_fn(inputs)
                        return loss.reshape(()), loss.new_zeros(()), loss.new_zeros(())
                    recorder.reset()
                    with recorder:
                        loss = loss_fn()
                member_rows, recorder.rows = recorder.rows, None
                recorded.append(member_rows is not None)
                if member_rows is None:
                    return loss.reshape(()), loss.new_zeros(()), loss.new_zeros(())
                return loss.reshape(()), member_rows, recorder.mismatch(loss)

            restore()
            tensors, tensor_dims = chunk_noise.flat()
            with torch.no_grad(), loss_context(), activations_in_place(self.in_place_activations), \
                    running_statistics_frozen(self.norms), self.attention_context():
                in_dims = (None if inputs is None else 0, *tensor_dims)
                losses, part_rows, mismatches = torch.func.vmap(member_loss, in_dims=in_dims, randomness="same")(
                    inputs, *tensors
                )
            fitness[part] = losses.float().to(self.fitness_device)
            if recorded and recorded[-1]:
                rows.append((part, part_rows.float().cpu(), mismatches.float().cpu()))
        if recorder is not None:
            self.rows.keep(population, fitness, rows, loss_fn, restore, recorder.targets)
        return fitness

    def evaluate(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        batched: bool = True,
        member_inputs: MemberInputs | None = None,
        chunk: int | None = None,
    ) -> Tensor:
        """Evaluate members batched with ``vmap`` where the user's code allows it, else one at a time.

        The first batched attempt that fails (``.item()``, data-dependent control flow, an op without a batching
        rule) switches to the loop for good, with one warning; after a batched success, errors are raised as they
        are.

        Args:
            population: what ``algorithm.ask`` returned.
            loss_fn: evaluates the loss at the current (perturbed) weights.
            rng: restored before each (batched) evaluation.
            known: fitness of members already evaluated, by member index.
            members: the indices to evaluate (this process's shard); all by default.
            batched: try the batched path at all.
            member_inputs: per-member inputs passed to ``loss_fn`` (see :meth:`loop`).
            chunk: members per batched forward (``None``: all).
        """
        # the members' metric updates are undone, and neither the members nor the first steps' tests of the layers
        # (per-row estimates: row-local and logit layers) nor the forward for the layers' inputs update running
        # statistics
        with metric_states_kept(self.metrics), running_statistics_frozen(self.norms):
            return self._evaluate(population, loss_fn, rng, known, members, batched, member_inputs, chunk)

    def _evaluate(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None,
        known: dict[int, Tensor] | None,
        members: Sequence[int] | None,
        batched: bool,
        member_inputs: MemberInputs | None,
        chunk: int | None,
    ) -> Tensor:
        pending = len(population) if members is None else len(members)
        pending -= len(known or {})
        if batched and self.batching is not False and pending > 1 and not self.noise.one_member_at_a_time():
            try:
                fitness = self.batched(population, loss_fn, rng, known, members, chunk, member_inputs)
            except Exception as error:  # noqa: BLE001 - any failure of vmap means: fall back to the loop
                if self.batching:
                    raise
                self.batching = False
                warnings.warn(
                    f"the loss cannot be evaluated for a whole population at once with torch.func.vmap"
                    f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); evaluating"
                    " the members one at a time instead (slower). Avoid `.item()` and data-dependent Python control"
                    " flow in training_step to enable batched evaluation.",
                    stacklevel=3,
                )
            else:
                self.batching = True
                return fitness
        return self.loop(population, loss_fn, rng, known, members, member_inputs)


class CompiledChunks:
    """A chunk of members evaluated by one ``torch.compile``-d ``vmap`` of the user's loss (``fullgraph=True``).

    The compiled function receives everything that changes from step to step as tensors (the members' factors and
    deltas, their inputs) and everything else as constants the compiler guards on (which parameters take which
    noise), so one graph serves every step of a run (one more per chunk size). The user's loss is traced with the
    member layers' computations inlined: the compiler fuses each layer's shared product with its members'
    low-rank corrections. What it cannot trace (a graph break in ``training_step``: ``.item()``, printing, data-
    dependent control flow) makes this evaluation, and every later one, run eagerly, with one warning that names
    the reason.

    Args:
        layers: the member layers installed on the user's modules.
    """

    def __init__(self, layers: MemberLayers) -> None:
        self.layers = layers
        #: False once compilation failed: evaluations stay eager from then on
        self.enabled = True
        #: chunks evaluated by the compiled function
        self.calls = 0
        self._compiled = torch.compile(self.chunk_losses, fullgraph=True, dynamic=False)

    def applies(self) -> bool:
        """Whether compiled evaluation is on and possible: not with parameters read outside their layers (those
        are swapped for a whole evaluation, which the compiled function does not do)."""
        return self.enabled and not self.layers.owners.whole_evaluation

    def chunk_losses(
        self,
        loss_fn: LossFn,
        layout: tuple[tuple[int, ...], tuple[int, ...], tuple[int | None, ...]],
        unperturbed: frozenset[int],
        inputs: Any,
        *tensors: Tensor,
    ) -> Tensor:
        """The losses ``[k]`` of a chunk: ``vmap`` over the members of the user's loss through the member layers."""
        dense_indices, low_rank_indices, dims = layout
        layers = self.layers

        def member_loss(member_inputs: Any, *values: Tensor) -> Tensor:
            split = len(dense_indices)
            low_rank = {
                index: (values[split + 2 * k], values[split + 2 * k + 1]) for k, index in enumerate(low_rank_indices)
            }
            dense = dict(zip(dense_indices, values[:split]))
            layers.active = Perturbation(low_rank=low_rank, dense=dense, unperturbed=unperturbed)
            try:
                loss = loss_fn() if member_inputs is None else loss_fn(member_inputs)
            finally:
                layers.active = None
            return loss.reshape(())

        in_dims = (None if inputs is None else 0, *dims)
        return torch.func.vmap(member_loss, in_dims=in_dims, randomness="same")(inputs, *tensors)

    @staticmethod
    def arguments(loss_fn: LossFn, noise: ChunkNoise, unperturbed: frozenset[int], inputs: Any) -> tuple[Any, ...]:
        """The arguments of the compiled function (:meth:`chunk_losses`) for one chunk.

        Args:
            loss_fn: the user's loss at the current (perturbed) weights.
            noise: the chunk's stacked perturbations.
            unperturbed: parameters that compute with their stored value.
            inputs: the members' stacked inputs (``None``: the loss takes none).
        """
        tensors, dims = noise.flat()
        layout = (tuple(noise.dense), tuple(noise.low_rank), tuple(dims))
        return (loss_fn, layout, unperturbed, inputs, *tensors)

    def __call__(
        self, loss_fn: LossFn, noise: ChunkNoise, unperturbed: frozenset[int], inputs: Any
    ) -> Tensor | None:
        """The chunk's losses, or ``None`` when the loss cannot be compiled (then :attr:`enabled` is False).

        Args:
            loss_fn: the user's loss at the current (perturbed) weights.
            noise: the chunk's stacked perturbations.
            unperturbed: parameters that compute with their stored value.
            inputs: the members' stacked inputs (``None``: the loss takes none).
        """
        if not self.layers.installed:
            self.layers.install()
        try:
            with torch.no_grad():
                losses = self._compiled(*self.arguments(loss_fn, noise, unperturbed, inputs))
            self.calls += 1
            return losses
        except Exception as error:  # noqa: BLE001 - anything the compiler cannot take: evaluate eagerly
            self.enabled = False
            self.layers.active = None
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"the population's evaluation cannot be compiled ({type(error).__name__}: {reason}); evaluating it"
                " eagerly instead (slower). Keep training_step free of `.item()`, printing and data-dependent"
                " Python control flow, or pass compile=False to the strategy to silence this.",
                stacklevel=4,
            )
            return None
