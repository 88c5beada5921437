"""Evaluate an algorithm's population through any loss function and write the gradient estimate.

This is the framework-free core shared by the Trainer and Fabric strategies: it knows parameters, modules, a
loss callable and an :class:`~lightning_nobp.algorithms.Algorithm`, and nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from lightning_nobp.algorithms.base import Algorithm, Member, Population, weighted_factor_columns
from lightning_nobp.algorithms.seeds import derive_seed
from lightning_nobp.kernels.lowbit_update import UpdateTerms, added_terms
from lightning_nobp.kernels.perturbed_weight import perturbed_weight
from lightning_nobp.kernels.philox import philox_noise
from lightning_nobp.kernels.stochastic_rounding import stochastic_round
from lightning_nobp.lowbit import apply_low_bit_update, is_low_bit, layout_of
from lightning_nobp.perturb.direct_step import DirectHyperparameters, momentum_direction, rms
from lightning_nobp.perturb.forward import ParameterOwners, ParameterReadProbe, PerturbedForward
from lightning_nobp.perturb.input_subspace import InputSubspaces, tap_inputs
from lightning_nobp.perturb.inplace_activations import activations_after_linear, activations_in_place
from lightning_nobp.perturb.narrow_softmax import NarrowSoftmaxMode
from lightning_nobp.perturb.row_estimate import embedding_row_gradient, row_local_gradient
from lightning_nobp.perturb.logit_layers import cross_entropy_layer_gradient, find_logit_layers
from lightning_nobp.perturb.row_losses import (
    CrossEntropyTargets,
    RowLocalLayer,
    RowLossRecorder,
    find_row_local_layers,
)

LossFn = Callable[..., Tensor]
"""Evaluates the loss at the current (possibly perturbed) weights; takes the member's inputs when there are any."""

MemberInputs = Callable[[Sequence[int]], Any]
"""Given member indices, the inputs of those members stacked along a leading dimension (a pytree of tensors)."""


#: the most bytes of dense noise per parameter :meth:`PopulationEstimator.prefetch_noise` draws ahead
PREFETCH_DENSE_BYTES = 1024 * 1024
#: the most bytes of stacked dense noise a batched evaluation holds (more members are evaluated in chunks)
STACKED_NOISE_BYTES = 256 * 1024 * 1024


def _rescaled(better: Tensor, norm: float, fallback: Any) -> Any:
    """``better`` scaled to ``norm`` (a per-row estimate at the scale of the estimate it replaces), or
    ``fallback`` when ``better`` is zero or not finite."""
    length = float(better.norm())
    if length > 0 and math.isfinite(length) and math.isfinite(norm):
        return better.mul_(norm / length)
    return fallback


def _float_value(param: Tensor) -> Tensor:
    """A parameter's value in float32 (a low-bit weight dequantized)."""
    return (param.dequantize() if is_low_bit(param) else param).float()


def _pair_differences(population: Population, table: Tensor) -> tuple[list[int], Tensor] | None:
    """The antithetic pairs' per-row differences ``(c+ - c-) / (2 sigma)`` ``(K, N)`` and their noise seeds, over
    the pairs whose rows are all finite; ``None`` with fewer than two such pairs.

    Args:
        population: the step's population.
        table: every member's per-row losses ``(P, N)`` (NaN rows: not evaluated here).
    """
    members = population.members
    finite = torch.isfinite(table).all(1)
    plus_first = len(members) % 2 == 0 and all(
        plus.sign > 0 > minus.sign and plus.noise_seed == minus.noise_seed
        for plus, minus in zip(members[0::2], members[1::2])
    )
    if plus_first and bool(finite.all()):  # the usual layout, (+, -) twins side by side: no index lists
        if len(members) < 4:
            return None
        return [member.noise_seed for member in members[0::2]], (table[0::2] - table[1::2]) / (2 * population.sigma)
    plus: dict[int, int] = {}
    minus: dict[int, int] = {}
    for index, member in enumerate(members):
        (plus if member.sign > 0 else minus)[member.noise_seed] = index
    usable = finite.tolist()
    pairs = [(seed, plus[seed], minus[seed]) for seed in plus if seed in minus]
    pairs = [(seed, p, m) for seed, p, m in pairs if usable[p] and usable[m]]
    if len(pairs) < 2:
        return None
    differences = (table[[p for _, p, _ in pairs]] - table[[m for _, _, m in pairs]]) / (2 * population.sigma)
    return [seed for seed, _, _ in pairs], differences


def _inputs_fit(layer: RowLocalLayer, inputs: Tensor | None, loss_rows: int) -> bool:
    """Whether a row-local layer's tapped inputs belong to a batch of ``loss_rows`` loss rows: one input row per
    loss row, or for an embedding a whole number of lookups per loss row's position (broadcast over the batch)."""
    if inputs is None or len(inputs) == 0:
        return False
    if layer.is_embedding:
        return loss_rows % len(inputs) == 0
    return len(inputs) == loss_rows


def _first(stacked: Any) -> Any:
    return tree_map(lambda tensor: tensor[0] if isinstance(tensor, Tensor) else tensor, stacked)


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


def _flat_perturbations(
    dense: dict[int, Tensor], low_rank: dict[int, tuple[Tensor, Tensor]]
) -> tuple[list[Tensor], list[int | None], Callable[[Sequence[Tensor]], tuple[dict, dict]]]:
    """Stacked perturbations as a flat list of tensors, their ``vmap`` dimensions, and the function that turns
    the (per-member) list back into ``(dense, low_rank)``. A shared basis ``B`` (two dimensions,
    ``_shared_basis_factors``) is one tensor for every member: not vmapped."""
    dense_indices, low_rank_indices = list(dense), list(low_rank)
    tensors: list[Tensor] = [dense[i] for i in dense_indices]
    dims: list[int | None] = [0] * len(tensors)
    for index in low_rank_indices:
        a, b = low_rank[index]
        tensors += [a, b]
        dims += [0, None if b.dim() == 2 else 0]
    split = len(dense_indices)

    def unflatten(values: Sequence[Tensor]) -> tuple[dict, dict]:
        factors = values[split:]
        pairs = {index: (factors[2 * k], factors[2 * k + 1]) for k, index in enumerate(low_rank_indices)}
        return dict(zip(dense_indices, values[:split])), pairs

    return tensors, dims, unflatten


class PopulationEstimator:
    """Runs one step of an algorithm's ask/evaluate/tell loop over given parameters.

    Args:
        algorithm: the estimator (``MeZO``, ...).
        roots: the modules that own ``params`` (their forwards are hooked to perturb the parameters).
        params: the parameters to train, in a fixed order: a parameter's position is its ``param_index``.
        names: optional names of the parameters, for error messages.
    """

    def __init__(
        self,
        algorithm: Algorithm,
        roots: Iterable[nn.Module],
        params: Sequence[Tensor],
        names: Sequence[str] | None = None,
    ) -> None:
        if len(params) == 0:
            raise ValueError(
                "NoBackpropStrategy found no trainable parameters: return an optimizer over the parameters to train"
                " from `configure_optimizers` (parameters with requires_grad=True)."
            )
        self.algorithm = algorithm
        self.params = list(params)
        self.names = list(names) if names is not None else [f"param[{i}]" for i in range(len(self.params))]
        roots = list(roots)
        self.owners = ParameterOwners(roots, self.params)
        #: activations a batched evaluation computes in place (``lightning_nobp.perturb.inplace_activations``)
        self.in_place_activations = activations_after_linear(roots)
        #: indices of the parameters stored in low bit (torchao subclasses): noise from Philox streams, fused updates
        self.low_bit = {index for index, param in enumerate(self.params) if is_low_bit(param)}
        self.probed = False
        #: whether the user's code evaluates under vmap: None until tried, then True or False
        self.batching: bool | None = None
        #: CPU weights: evaluate members under NarrowSoftmaxMode (PyTorch's CPU log_softmax over 10 classes is slow)
        self.narrow_softmax = all(param.device.type == "cpu" for param in self.params)
        #: estimate row-local layers from per-row losses (set by the engine: antithetic ES on one process)
        self.row_estimates = False
        #: also estimate the embeddings of a causal sequence model from per-row losses (set by the engine from the
        #: algorithm's ``per_row_embeddings``; a biased estimate, see ``lightning_nobp.perturb.row_estimate``)
        self.row_embeddings = False
        #: widest output of a layer estimated from per-row losses (``None``: the population's antithetic pairs)
        self.row_max_outputs: int | None = None
        #: the row-local layers found on the first batch (``None``: not searched yet)
        self.row_local: list[RowLocalLayer] | None = None
        #: give the row-local layers that compute the cross-entropy's logits their exact gradient (set by the engine
        #: from the algorithm's ``exact_head_gradient``; ``lightning_nobp.perturb.logit_layers``)
        self.exact_logit_layers = False
        #: weight indices of the row-local layers whose output is the cross-entropy's logits (``None``: not searched)
        self.logit_layers: set[int] | None = None
        #: the last evaluation's per-row record: (population, rows ``(P, N)``, each row-local layer's input rows,
        #: the cross-entropy's targets or ``None``)
        self._row_record: tuple[Population, Tensor, dict[int, Tensor], CrossEntropyTargets | None] | None = None
        #: the row-local layers' noise stacked per seed by the batched evaluation: (param index, seeds, noise)
        self._seed_noise: list[tuple[int, list[int], Any]] = []
        #: the row-local layers' input rows seen by the official training pass (``row_input_tap``), by weight index
        self._tapped_inputs: dict[int, Tensor] = {}
        #: float32 bytes of one member's dense noise in a batched evaluation (``None``: not computed yet)
        self._dense_member_bytes: int | None = None
        #: principal input subspaces of the data-fed layers (set by the engine when the algorithm asks for them)
        self.input_subspaces: InputSubspaces | None = None

    def _loss_context(self) -> contextlib.AbstractContextManager:
        """Where members' losses are evaluated: ``NarrowSoftmaxMode`` on the CPU, nothing elsewhere."""
        return NarrowSoftmaxMode() if self.narrow_softmax else contextlib.nullcontext()

    def perturbation(
        self, population: Population, member: Member, probe: ParameterReadProbe | None = None
    ) -> PerturbedForward:
        """A context in which every parameter computes as ``theta + sigma * sign * E(member)``."""
        scale = population.sigma * member.sign

        def delta(index: int, stored: Tensor) -> Tensor:
            return self.dense_noise(member.noise_seed, index).mul_(scale)

        def low_bit_value(index: int, stored: Tensor) -> Tensor | None:
            stream = self.algorithm.noise_stream(member.noise_seed, index, stored)
            if index not in self.low_bit or stream is None:
                return None
            seed, distribution = stream
            return perturbed_weight(layout_of(stored), [seed], [scale], distribution == "gaussian", stored.dtype)

        return PerturbedForward(
            self.owners,
            delta,
            probe,
            value=low_bit_value if self.low_bit else None,
            unperturbed=self.unperturbed_indices(),
        )

    def dense_noise(self, noise_seed: int, index: int) -> Tensor:
        """The float32 noise ``E`` of parameter ``index`` for one member seed.

        Low-bit parameters draw it from the algorithm's Philox stream (the one the fused update kernel
        regenerates); the others from :meth:`Algorithm.noise`.
        """
        param = self.params[index]
        stream = self.algorithm.noise_stream(noise_seed, index, param) if index in self.low_bit else None
        if stream is None:
            return self.algorithm.noise(noise_seed, index, param)
        seed, distribution = stream
        return philox_noise(seed, param.shape, distribution, param.device)

    def probe_parameter_reads(self, population: Population, evaluation: Callable[[], object]) -> None:
        """Find parameters read outside their owner's forward, once, by watching perturbed evaluations.

        Args:
            population: the current population (its first member perturbs the weights during the probe).
            evaluation: runs the user's computation once; its result is ignored.
        """
        for _ in range(2):
            probe = ParameterReadProbe(self.owners)
            with torch.no_grad(), probe, self.perturbation(population, population.members[0], probe):
                evaluation()
            missed = probe.read - self.owners.whole_evaluation
            if not missed:
                self.probed = True
                return
            self.owners.read_outside |= missed
        names = ", ".join(self.names[i] for i in sorted(missed))
        raise RuntimeError(
            f"parameters {names} are read through a reference that cannot be perturbed (a cached copy of the"
            " parameter). Read parameters through their module attribute at every call."
        )

    def evaluate(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        member_inputs: MemberInputs | None = None,
    ) -> Tensor:
        """The loss of the members, one perturbed evaluation each, as a float32 tensor ``[P]`` on the CPU.

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
        fitness = torch.zeros(len(population), dtype=torch.float32)
        recorder = self._row_recorder(population, loss_fn, rng, members, member_inputs)
        rows: list[tuple[list[int], Tensor, Tensor]] = []
        for index in range(len(population)) if members is None else members:
            member = population.members[index]
            if index in known:
                fitness[index] = known[index].float().cpu()
                continue
            if rng is not None:
                rng.restore()
            with torch.no_grad(), self.perturbation(population, member), self._loss_context():
                if recorder is None:
                    loss = loss_fn() if member_inputs is None else loss_fn(_first(member_inputs([index])))
                else:
                    recorder.reset()
                    with recorder:
                        loss = loss_fn()
                    if recorder.rows is not None:
                        rows.append(([index], recorder.rows.float().cpu()[None], recorder.mismatch(loss).cpu()[None]))
            fitness[index] = loss.float().cpu()
        if recorder is not None:
            self._keep_rows(population, fitness, rows, loss_fn, rng, recorder.targets)
        return fitness

    def _stacked_perturbations(
        self, population: Population, members: Sequence[int]
    ) -> tuple[dict[int, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """The perturbations of ``members``, stacked along a leading member dimension.

        ``nn.Linear`` and ``nn.Embedding`` weights get low-rank factors ``(sigma sign A, B)`` when the algorithm has
        them (the layer adds ``(x B) A^T`` or ``A[x] B^T``); every other parameter gets its dense ``sigma sign E``.
        """
        chosen = [population.members[i] for i in members]
        # each noise is drawn once per seed (antithetic twins share it), then spread to the members by one index
        seeds = list(dict.fromkeys(m.noise_seed for m in chosen))
        position = {seed: i for i, seed in enumerate(seeds)}
        spread = torch.tensor([position[m.noise_seed] for m in chosen])
        scales = torch.tensor([population.sigma * m.sign for m in chosen], dtype=torch.float32)
        dense: dict[int, Tensor] = {}
        low_rank: dict[int, tuple[Tensor, Tensor]] = {}
        low_rank_allowed = self.owners.low_rank_capable - self.owners.whole_evaluation
        kept = self._row_local_indices()
        unperturbed = self.unperturbed_indices()
        for index, param in enumerate(self.params):
            if index in unperturbed:
                continue
            members_of = spread.to(param.device)
            scale = scales.to(param.device)
            shared = self._shared_basis_factors(index, seeds, low_rank_allowed, kept)
            if shared is not None:  # B is the basis itself: one copy for every member (vmapped with in_dims None)
                coordinates, basis = shared
                low_rank[index] = (coordinates[members_of].mul_(scale.view(-1, 1, 1)), basis)
                continue
            noise = self._noise_of_seeds(index, seeds, low_rank=index in low_rank_allowed)
            if index in kept:
                self._seed_noise.append((index, seeds, noise))
            if isinstance(noise, tuple):
                a_seeds, b_seeds = noise
                low_rank[index] = (a_seeds[members_of].mul_(scale.view(-1, 1, 1)), b_seeds[members_of])
            else:
                dense[index] = noise[members_of].mul_(scale.view(-1, *([1] * param.dim())))
        return dense, low_rank

    def _shared_basis_factors(
        self, index: int, seeds: Sequence[int], low_rank_allowed: set[int], kept: set[int]
    ) -> tuple[Tensor, Tensor] | None:
        """The algorithm's shared-basis factors of a low-rank-capable layer's dense noise (``(A (S, out, r),
        P (in, r))``), where they apply: not for low-bit weights, nor for noise kept for per-row estimates."""
        if index not in low_rank_allowed or index in self.low_bit or index in kept:
            return None
        return self.algorithm.shared_basis_factors(seeds, index, self.params[index])

    def prefetch_noise(
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
        low_rank_allowed = self.owners.low_rank_capable - self.owners.whole_evaluation
        wanted = [
            (index, param, index in low_rank_allowed, 4 * param.numel() * len(seeds) <= PREFETCH_DENSE_BYTES)
            for index, param in enumerate(self.params)
            if index not in self.low_bit
        ]

        def window_seeds(steps: int) -> list[int]:
            assert window is not None
            chosen = (step.members[i].noise_seed for step in window(steps) for i in members)
            return list(dict.fromkeys(chosen))

        self.algorithm.prefetch_noise(seeds, wanted, window_seeds if window is not None else None)

    def _members_within_noise_budget(self) -> int:
        """How many members' dense noise fits in ``STACKED_NOISE_BYTES`` (at least 1): a batched evaluation
        stacks one dense copy per member of every parameter without low-rank factors (MeZO's and OpenES's
        noise), which must not turn a large model's inference-sized memory into a population-sized one."""
        if self._dense_member_bytes is None:
            low_rank_allowed = self.owners.low_rank_capable - self.owners.whole_evaluation
            self._dense_member_bytes = sum(
                4 * param.numel()
                for index, param in enumerate(self.params)
                if index not in low_rank_allowed or self.algorithm.low_rank_factors(0, index, param) is None
            )
        return max(1, STACKED_NOISE_BYTES // max(self._dense_member_bytes, 1))

    def _noise_of_seeds(self, index: int, seeds: Sequence[int], low_rank: bool) -> tuple[Tensor, Tensor] | Tensor:
        """Parameter ``index``'s noise for ``seeds``, stacked along a first dimension: the algorithm's low-rank
        factors ``(A, B)`` where allowed and available, else the dense ``E``."""
        param = self.params[index]
        if low_rank:
            factors = self.algorithm.stacked_low_rank_factors(seeds, index, param)
            if factors is not None:
                return factors
        if index in self.low_bit and self.algorithm.noise_stream(seeds[0], index, param) is not None:
            return torch.stack([self.dense_noise(seed, index) for seed in seeds])  # the kernels' Philox streams
        return self.algorithm.stacked_noise(seeds, index, param)

    def unperturbed_indices(self) -> set[int]:
        """Parameters the members evaluate at their stored value: the layers computing the cross-entropy's logits
        once they take their exact gradient (``exact_logit_layers``). Their perturbation would tell nothing the
        exact gradient does not, and its share of every member's loss change would be noise in the estimates of
        all the other parameters."""
        if not (self.exact_logit_layers and self.row_estimates and self.logit_layers and self.row_local):
            return set()
        layers = [layer for layer in self.row_local if layer.weight_index in self.logit_layers]
        indices = {layer.weight_index for layer in layers}
        return indices | {layer.bias_index for layer in layers if layer.bias_index is not None}

    def _row_local_indices(self) -> set[int]:
        """Parameters of the row-local layers while per-row estimates are on (their noise is kept for the update)."""
        if not self.row_estimates or not self.row_local:
            return set()
        indices = {layer.weight_index for layer in self.row_local}
        return indices | {layer.bias_index for layer in self.row_local if layer.bias_index is not None}

    def evaluate_batched(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None = None,
        known: dict[int, Tensor] | None = None,
        members: Sequence[int] | None = None,
        chunk: int | None = None,
        member_inputs: MemberInputs | None = None,
    ) -> Tensor:
        """Like :meth:`evaluate`, but members are stacked along a leading dimension and evaluated together.

        ``torch.func.vmap`` runs ``loss_fn`` once per chunk of members: each layer reads its shared weight once and
        computes every member's output (``x W^T + (x B_m) A_m^T`` for ``nn.Linear`` with low-rank noise). Random
        layers draw the same numbers for every member, as in :meth:`evaluate`. Raises whatever ``vmap`` raises
        for code it cannot batch (``.item()``, data-dependent Python control flow).

        Args:
            population: what ``algorithm.ask`` returned.
            loss_fn: evaluates the loss at the current (perturbed) weights; must return a one-element tensor.
            rng: restored before each chunk.
            known: fitness of members already evaluated, by member index.
            members: the indices to evaluate (this process's shard); all by default.
            chunk: members per batched forward (bounds activation memory); all at once by default.
            member_inputs: per-member inputs, vmapped along with the perturbations (see :meth:`evaluate`).
        """
        known = known or {}
        fitness = torch.zeros(len(population), dtype=torch.float32)
        for index, value in known.items():
            fitness[index] = value.float().cpu()
        todo = [i for i in (range(len(population)) if members is None else members) if i not in known]
        size = min(chunk or max(len(todo), 1), self._members_within_noise_budget())

        recorder = self._row_recorder(population, loss_fn, rng, members, member_inputs)
        if recorder is not None:  # the recorder wraps every member's loss: it also takes NarrowSoftmaxMode's role
            recorder.narrow_softmax = self.narrow_softmax
        loss_context = self._loss_context if recorder is None else contextlib.nullcontext
        rows: list[tuple[list[int], Tensor, Tensor]] = []
        recorded: list[bool] = []

        def member_loss(inputs: Any, *tensors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            dense, low_rank = unflatten(tensors)
            with PerturbedForward(
                self.owners,
                lambda index, stored: dense[index],
                low_rank=low_rank,
                unperturbed=self.unperturbed_indices(),
            ):
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

        for start in range(0, len(todo), size):
            part = todo[start : start + size]
            dense, low_rank = self._stacked_perturbations(population, part)
            inputs = None if member_inputs is None else member_inputs(part)
            if rng is not None:
                rng.restore()
            tensors, tensor_dims, unflatten = _flat_perturbations(dense, low_rank)
            with torch.no_grad(), loss_context(), activations_in_place(self.in_place_activations):
                # flat arguments: vmap's argument handling is pytree work per leaf and per level of nesting
                in_dims = (None if inputs is None else 0, *tensor_dims)
                losses, part_rows, mismatches = torch.func.vmap(member_loss, in_dims=in_dims, randomness="same")(
                    inputs, *tensors
                )
            fitness[part] = losses.float().cpu()
            if recorded and recorded[-1]:
                rows.append((part, part_rows.float().cpu(), mismatches.float().cpu()))
        if recorder is not None:
            self._keep_rows(population, fitness, rows, loss_fn, rng, recorder.targets)
        return fitness

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
        """Evaluate members batched with ``vmap`` where the user's code allows it, else one at a time.

        The first batched attempt that fails (``.item()``, data-dependent control flow, an op without a batching
        rule) switches this estimator to the loop for good, with one warning; after a batched success, errors
        are raised as they are.

        Args:
            population: what ``algorithm.ask`` returned.
            loss_fn: evaluates the loss at the current (perturbed) weights.
            rng: restored before each (batched) evaluation.
            known: fitness of members already evaluated, by member index.
            members: the indices to evaluate (this process's shard); all by default.
            batched: try the batched path at all.
            member_inputs: per-member inputs passed to ``loss_fn`` (see :meth:`evaluate`).
        """
        self._observe_inputs(population, loss_fn, rng, member_inputs)
        pending = len(population) if members is None else len(members)
        pending -= len(known or {})
        if batched and self.batching is not False and pending > 1:
            try:
                fitness = self.evaluate_batched(
                    population, loss_fn, rng, known, members, self.algorithm.population_chunk, member_inputs
                )
            except Exception as error:  # noqa: BLE001 - any failure of vmap means: fall back to the loop
                if self.batching:
                    raise
                self.batching = False
                warnings.warn(
                    f"the loss cannot be evaluated for a whole population at once with torch.func.vmap"
                    f" ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); evaluating"
                    " the members one at a time instead (slower). Avoid `.item()` and data-dependent Python control"
                    " flow in training_step to enable batched evaluation.",
                    stacklevel=2,
                )
            else:
                self.batching = True
                return fitness
        return self.evaluate(population, loss_fn, rng, known, members, member_inputs)

    # ------------------------------------------------------------------ input subspaces of data-fed layers
    def _observe_inputs(
        self, population: Population, loss_fn: LossFn, rng: RngSnapshot | None, member_inputs: MemberInputs | None
    ) -> None:
        """On the evaluations that observe inputs, run the loss at the current weights and add the data-fed
        layers' inputs to their moments (the first time, after finding those layers). The new bases are
        installed when the optimizer step ends (:meth:`install_input_bases`)."""
        subspaces = self.input_subspaces
        if subspaces is None or not subspaces.due():
            return
        inputs = None if member_inputs is None else _first(member_inputs([0]))

        def at_weights() -> None:
            if rng is not None:
                rng.restore()
            with torch.no_grad(), self._loss_context():
                loss_fn() if inputs is None else loss_fn(inputs)

        if subspaces.layers is None:

            def perturbed() -> None:
                with self.perturbation(population, population.members[0]):
                    at_weights()

            seen = subspaces.search(
                {layer.weight_index: layer.module for layer in self._unshared_layers()}, at_weights, perturbed
            )
        else:
            with tap_inputs(subspaces.layers) as seen:
                at_weights()
        subspaces.observe(seen)

    def install_input_bases(self) -> None:
        """Give the algorithm the input bases computed since the last call.

        The strategy calls it when an optimizer step ends (after its update, or after skipping it), so every
        micro-batch of a step draws its noise in the same bases and the update regenerates exactly that noise.
        """
        if self.input_subspaces is not None:
            self._give_input_bases(self.input_subspaces.commit())

    def input_subspace_state(self) -> dict[str, Any] | None:
        """The input subspaces' state for a checkpoint (``None`` when they are off)."""
        return None if self.input_subspaces is None else self.input_subspaces.state_dict()

    def load_input_subspace_state(self, state: dict[str, Any]) -> None:
        """Continue with a checkpoint's input subspaces: the same layers, moments and installed bases."""
        if self.input_subspaces is None:
            return
        modules = {layer.weight_index: layer.module for layer in self._unshared_layers()}
        self.input_subspaces.load_state_dict(state, modules)
        self._give_input_bases(self.input_subspaces.installed)

    def _give_input_bases(self, bases: dict[int, tuple[Tensor, Tensor] | None]) -> None:
        """Install ``bases`` (by parameter index) in the algorithm (``None`` restores isotropic noise)."""
        install = getattr(self.algorithm, "set_input_basis", None)
        for index, basis in bases.items() if install is not None else ():
            install(self.params[index], basis)

    def _unshared_layers(self, embeddings: bool = False) -> list[RowLocalLayer]:
        """``nn.Linear`` layers (and ``nn.Embedding`` layers if ``embeddings``: dense lookups without ``max_norm``)
        with a trained weight whose parameters no other module shares."""
        holders: dict[int, int] = {}
        for slots in self.owners.slots.values():
            for _, index in slots:
                holders[index] = holders.get(index, 0) + 1
        layers = []
        for module, slots in self.owners.slots.items():
            plain_embedding = isinstance(module, nn.Embedding) and module.max_norm is None and not module.sparse
            if not (isinstance(module, nn.Linear) or (embeddings and plain_embedding)):
                continue
            indices = dict(slots)
            weight = indices.get("weight")
            if weight is None or weight in self.owners.whole_evaluation:
                continue
            if any(holders[index] > 1 for index in indices.values()):
                continue
            layers.append(RowLocalLayer(module, weight, indices.get("bias")))
        return layers

    # ------------------------------------------------------------------ per-row estimates of row-local layers
    def _row_recorder(
        self,
        population: Population,
        loss_fn: LossFn,
        rng: RngSnapshot | None,
        members: Sequence[int] | None,
        member_inputs: MemberInputs | None,
    ) -> RowLossRecorder | None:
        """A recorder of the members' per-row losses when this step can use them, else ``None``.

        Needs every member evaluated here on the same inputs (one process, no per-member data). The row-local
        layers are searched on the first such step.
        """
        self._row_record = None
        self._seed_noise = []
        if not self.row_estimates or member_inputs is not None:
            return None
        if members is not None and sorted(members) != list(range(len(population))):
            return None
        restore = rng.restore if rng else lambda: None
        if self.row_local is None:
            self.row_local = find_row_local_layers(self._row_local_candidates(len(population) // 2), loss_fn, restore)
        if self.exact_logit_layers and self.logit_layers is None:
            self.logit_layers = {layer.weight_index for layer in find_logit_layers(self.row_local, loss_fn, restore)}
            if not self.logit_layers:
                warnings.warn(
                    "exact_head_gradient=True, but no layer's output is the logits of the training step's"
                    " cross-entropy (an nn.Linear whose output reaches F.cross_entropy unchanged, class-index targets,"
                    " no label smoothing, one output row per loss row): the output layers keep their per-row"
                    " estimates.",
                    stacklevel=4,
                )
        return RowLossRecorder() if self.row_local else None

    def _row_local_candidates(self, pairs: int) -> list[RowLocalLayer]:
        """``nn.Linear`` layers with a trained weight and at most ``pairs`` outputs (or ``row_max_outputs``), whose
        parameters no other module shares (a head tied to an embedding also gets the embedding's gradient: not from
        rows alone); with ``row_embeddings`` also such ``nn.Embedding`` layers of at most that many dimensions."""
        widest = pairs if self.row_max_outputs is None else self.row_max_outputs
        candidates = []
        for layer in self._unshared_layers(embeddings=self.row_embeddings):
            module = layer.module
            if type(module) is nn.Linear and module.out_features <= widest:
                candidates.append(layer)
            elif isinstance(module, nn.Embedding) and module.embedding_dim <= widest:
                candidates.append(layer)
        return candidates

    def _keep_rows(
        self,
        population: Population,
        fitness: Tensor,
        rows: list[tuple[list[int], Tensor, Tensor]],
        loss_fn: LossFn,
        rng: RngSnapshot | None,
        targets: CrossEntropyTargets | None = None,
    ) -> None:
        """Keep the step's per-row losses and the row-local layers' unperturbed inputs for the update.

        ``rows`` holds, per evaluated chunk, the member indices, their per-row losses ``(k, ...)`` and how far each
        returned loss is from the recorded one ``(k,)``; ``targets`` the cross-entropy's targets (for the exact
        gradient of the layers computing its logits). A training step that returns something else than the
        recorded loss (a regularizer added to it) turns the per-row estimates off for good, with a warning.
        """
        if not rows or self.row_local is None:
            return
        width = rows[0][1][0].numel()
        table = torch.full((len(population), width), float("nan"))
        for indices, values, _ in rows:
            if values[0].numel() != width:
                return
            table[indices] = values.reshape(len(indices), width)
        mismatches = torch.cat([mismatch.reshape(-1) for _, _, mismatch in rows])
        evaluated = [index for indices, _, _ in rows for index in indices]
        if bool((mismatches[torch.isfinite(fitness[evaluated])] != 0).any()):
            self.row_estimates = False
            warnings.warn(
                "per-row estimates are off: the loss returned by the training step is not the single recognized"
                " per-row loss it computes (a regularizer or a second loss is added). Row-local layers are"
                " estimated from the members' mean losses like every other parameter.",
                stacklevel=3,
            )
            return
        inputs, self._tapped_inputs = self._tapped_inputs, {}
        if any(not _inputs_fit(layer, inputs.get(layer.weight_index), width) for layer in self.row_local):
            inputs = {}  # not from this batch: take them from one forward at the current weights
            with self.row_input_tap(inputs):
                if rng is not None:
                    rng.restore()
                with torch.no_grad(), self._loss_context():
                    loss_fn()
        self._row_record = (population, table, inputs, targets)

    @contextlib.contextmanager
    def row_input_tap(self, into: dict[int, Tensor] | None = None) -> Iterator[None]:
        """Within the context, forwards keep the input rows of the row-local layers (for the next update).

        The strategy wraps its official training pass in it, which saves the per-row estimate one forward.

        Args:
            into: where to keep them, by weight index (default: for the next evaluation of this estimator).
        """
        store = self._tapped_inputs if into is None else into
        if into is None:
            store.clear()

        def tap(layer: RowLocalLayer) -> Callable[[nn.Module, Any], None]:
            def hook(module: nn.Module, args: Any) -> None:
                if layer.is_embedding:  # the rows it looks up
                    store[layer.weight_index] = args[0].detach().reshape(-1)
                else:
                    store[layer.weight_index] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            return hook

        layers = self.row_local if self.row_estimates and self.row_local else []
        handles = [layer.module.register_forward_pre_hook(tap(layer)) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _row_local_gradients(self, population: Population | None, exact_only: bool = False) -> dict[int, Tensor]:
        """Per-row estimates of the row-local layers' weights and biases, by parameter index (empty if none).

        Consumes the step's record (rows, inputs, stacked noise): an update uses it once. A logit layer, which the
        members leave unperturbed (``unperturbed_indices``), gets its exact gradient, or nothing when this step
        cannot give it (no cross-entropy targets recorded): its members' losses hold nothing about it.

        Args:
            population: the population the record must belong to (``None``: no record applies).
            exact_only: only the layers that take their exact gradient (an accumulation window's last micro-batch:
                the per-row estimates of the others would see one micro-batch of several).
        """
        record, self._row_record = self._row_record, None
        seed_noise, self._seed_noise = self._seed_noise, []
        if record is None or record[0] is not population:
            return {}
        _, table, inputs, targets = record
        if exact_only:
            return self._exact_gradients(inputs, targets)
        paired = _pair_differences(population, table)
        if paired is None:
            return self._exact_gradients(inputs, targets)
        seeds, differences = paired
        estimates = self._exact_gradients(inputs, targets)
        for layer in self.row_local or []:
            if layer.weight_index in (self.logit_layers or ()):
                continue  # its exact gradient, or nothing: the members did not perturb it
            rows = inputs.get(layer.weight_index)
            if not _inputs_fit(layer, rows, differences.shape[1]):
                continue
            assert rows is not None
            weight = self.params[layer.weight_index]
            if layer.is_embedding:
                noise = self._pair_noise(layer.weight_index, seeds, seed_noise)
                estimates[layer.weight_index] = self._embedding_gradient(layer, differences, rows, noise)
                continue
            device = weight.device
            noise = self._pair_noise(layer.weight_index, seeds, seed_noise)
            bias_noise = None
            if layer.bias_index is not None:
                bias_noise = self._pair_noise(layer.bias_index, seeds, seed_noise)
                assert isinstance(bias_noise, Tensor)
            weight_gradient, bias_gradient = row_local_gradient(
                differences.to(device), rows.to(device), noise, bias_noise
            )
            estimates[layer.weight_index] = weight_gradient.view(weight.shape)
            if bias_gradient is not None and layer.bias_index is not None:
                estimates[layer.bias_index] = bias_gradient
        return estimates

    def _exact_gradients(self, inputs: dict[int, Tensor], targets: CrossEntropyTargets | None) -> dict[int, Tensor]:
        """The exact gradients of the logit layers (``_exact_layer_gradient``) whose input rows were kept."""
        estimates: dict[int, Tensor] = {}
        for layer in self.row_local or []:
            rows = inputs.get(layer.weight_index)
            if layer.weight_index in (self.logit_layers or ()) and rows is not None:
                estimates.update(self._exact_layer_gradient(layer, rows, targets))
        return estimates

    def _exact_layer_gradient(
        self, layer: RowLocalLayer, rows: Tensor, targets: CrossEntropyTargets | None
    ) -> dict[int, Tensor]:
        """A logit layer's weight and bias gradients from its input ``rows`` (``cross_entropy_layer_gradient``),
        by parameter index; none when the targets do not match the rows (nothing to learn from this step)."""
        if targets is None or len(targets.target) != len(rows):
            return {}
        weight = self.params[layer.weight_index]
        bias = layer.module.bias  # trained or not, it is part of the logits
        weight_gradient, bias_gradient = cross_entropy_layer_gradient(
            rows.to(weight.device), _float_value(weight), None if bias is None else _float_value(bias), targets
        )
        gradients = {layer.weight_index: weight_gradient.view(weight.shape)}
        if bias_gradient is not None and layer.bias_index is not None:
            gradients[layer.bias_index] = bias_gradient
        return gradients

    def _embedding_gradient(
        self, layer: RowLocalLayer, differences: Tensor, looked_up: Tensor, noise: tuple[Tensor, Tensor] | Tensor
    ) -> Tensor:
        """A causal model's embedding weight from the per-row losses (``embedding_row_gradient``): the rows it
        looked up repeat over the loss rows when it was broadcast over the batch (position embeddings)."""
        module = layer.module
        assert isinstance(module, nn.Embedding)
        weight = self.params[layer.weight_index]
        indices = looked_up.to(weight.device).repeat(differences.shape[1] // len(looked_up))
        gradient = embedding_row_gradient(differences.to(weight.device), indices, noise, module.num_embeddings)
        if module.padding_idx is not None:
            gradient[module.padding_idx] = 0.0  # the padding row is never trained
        return gradient.view(weight.shape)

    def _pair_noise(
        self, index: int, seeds: list[int], seed_noise: list[tuple[int, list[int], Any]]
    ) -> tuple[Tensor, Tensor] | Tensor:
        """The noise of parameter ``index`` for ``seeds``, stacked: low-rank factors ``(A, B)`` or dense ``E``.

        Taken from the stacks the batched evaluation built (``seed_noise``) when it has them (the stack itself when
        it holds exactly these seeds: read it, do not modify it), else drawn from the algorithm.
        """
        parts = [(part_seeds, stacked) for i, part_seeds, stacked in seed_noise if i == index]
        if len(parts) == 1 and parts[0][0] == seeds:  # one chunk, its seeds in this order: the stack itself
            return parts[0][1]
        row_of = {seed: row for row, seed in enumerate(seed for part_seeds, _ in parts for seed in part_seeds)}
        if parts and all(seed in row_of for seed in seeds):
            rows = torch.tensor([row_of[seed] for seed in seeds])
            stacks = [stacked for _, stacked in parts]  # one per evaluated chunk of the population
            if isinstance(stacks[0], tuple):
                return torch.cat([a for a, _ in stacks])[rows], torch.cat([b for _, b in stacks])[rows]
            return torch.cat(stacks)[rows]
        return self._noise_of_seeds(index, seeds, low_rank=index in self.owners.low_rank_capable)

    @torch.no_grad()
    def accumulate_gradient(self, population: Population, coefficients: Tensor, scale: float = 1.0) -> float:
        """``.grad`` path: ``p.grad += scale * sum_i coefficients[i] * sign_i * E_i(p)`` for every parameter.

        Returns:
            The norm of what was added, over all parameters.
        """
        if self.low_bit:
            names = ", ".join(self.names[i] for i in sorted(self.low_bit))
            raise ValueError(
                f"low-bit weights ({names}) have no gradient buffer: they are updated in place. Use"
                " NoBackpropStrategy(update='direct') (the default with LowBitPrecision)."
            )
        squared_norm = 0.0
        row_local = self._row_local_gradients(population)
        merged = self._merged_weights([(population, coefficients)])  # antithetic twins merged, once for all
        unperturbed = self.unperturbed_indices()
        for index, param in enumerate(self.params):
            if index in unperturbed and index not in row_local:
                continue  # not perturbed, and no exact gradient from this micro-batch: nothing to add
            total = self.algorithm.combine(merged, index, param)
            if index in row_local:
                total = _rescaled(row_local[index], float(total.norm()), total)
            if scale != 1.0:
                total.mul_(scale)
            squared_norm += float(total.square().sum())
            if param.grad is None:
                param.grad = total.to(param.dtype)
            else:
                param.grad.add_(total.to(param.grad.dtype))
        return squared_norm**0.5

    @torch.no_grad()
    def apply_update(
        self,
        terms: Sequence[tuple[Population, Tensor]],
        hyperparameters: Sequence[DirectHyperparameters],
        rounding_seed: int,
        normalize: bool = False,
        states: Sequence[dict[str, Any]] | None = None,
    ) -> float:
        """Direct path: ``p <- p - lr * (estimate + weight_decay * p)`` in place, with no ``.grad`` buffer (with
        momentum, along the momentum direction: ``lightning_nobp.perturb.direct_step``).

        The new value is computed in float32 and written back with stochastic rounding where the parameter is
        stored in lower precision (low-bit weights through the fused kernel), so updates smaller than the grid
        step are kept on average. Nothing is written when the coefficients are not finite.

        Args:
            terms: ``(population, coefficients)`` of every micro-batch of the step (gradient accumulation).
            hyperparameters: the step settings of every parameter, in parameter order.
            rounding_seed: counter-derived seed of the stochastic rounding (one stream per parameter).
            normalize: divide each parameter's estimate by its root-mean-square, so ``lr`` is the typical step
                of one weight (as with Adam) without any optimizer state.
            states: every parameter's optimizer state (``optimizer.state[p]``), where momentum buffers live;
                needed when a parameter has momentum.

        Returns:
            The norm of the estimate (before normalization, lr and weight decay), over all parameters; NaN when
            the update was not finite and nothing was written.
        """
        merged = self._merged_weights(terms)
        row_local = self._row_local_gradients(terms[-1][0], exact_only=len(terms) > 1)
        if not all(map(math.isfinite, merged.values())):
            return float("nan")  # never write a non-finite update: the weights stay untouched
        squared_norm = 0.0
        unperturbed = self.unperturbed_indices()
        for index, (param, settings) in enumerate(zip(self.params, hyperparameters)):
            if index in unperturbed and index not in row_local:
                continue  # not perturbed and no exact gradient this step: left as it is
            lr, weight_decay = settings.lr, settings.weight_decay
            seed = derive_seed(rounding_seed, index)
            if index in self.low_bit:
                update_terms = self._low_bit_terms(index, merged, 1.0 - lr * weight_decay)
                squared = self._squared_norm(index, update_terms)
                if index in row_local:
                    # the per-row estimate, at the norm of the terms it replaces, as one dense term
                    dense = _rescaled(row_local[index], squared**0.5, None)
                    if dense is not None:
                        update_terms = UpdateTerms(decay=update_terms.decay, dense=dense.view(param.shape[0], -1))
                squared_norm += squared
                if settings.momentum:  # the momentum direction, formed densely, replaces the terms
                    layout = layout_of(param)
                    estimate = added_terms(update_terms, torch.zeros(layout.rows, layout.cols, device=layout.device))
                    direction = self._momentum(index, estimate, settings, normalize, states, torch.bfloat16)
                    update_terms, step = UpdateTerms(decay=update_terms.decay, dense=direction), -lr
                else:
                    step = -lr / rms(squared, param.numel()) if normalize else -lr
                apply_low_bit_update(param, update_terms.scaled(step), seed)
                continue
            estimate = self.algorithm.combine(merged, index, param)
            if index in row_local:
                estimate = _rescaled(row_local[index], float(estimate.norm()), estimate)
            squared = float(estimate.square().sum())
            squared_norm += squared
            if settings.momentum:
                estimate = self._momentum(index, estimate, settings, normalize, states, param.dtype)
            elif normalize:
                estimate.div_(rms(squared, param.numel()))
            if weight_decay:
                estimate.add_(param.float(), alpha=weight_decay)
            updated = param.float().sub_(estimate, alpha=lr)
            param.copy_(stochastic_round(updated, param.dtype, seed))
        return squared_norm**0.5

    def _momentum(
        self,
        index: int,
        estimate: Tensor,
        settings: DirectHyperparameters,
        normalize: bool,
        states: Sequence[dict[str, Any]] | None,
        buffer_dtype: torch.dtype,
    ) -> Tensor:
        """Parameter ``index``'s momentum direction (its buffer in ``states[index]`` updated)."""
        if states is None:
            raise ValueError(f"momentum {settings.momentum} needs the optimizer's state to keep its buffer in")
        return momentum_direction(estimate, states[index], settings, normalize, buffer_dtype)

    @staticmethod
    def _merged_weights(terms: Sequence[tuple[Population, Tensor]]) -> dict[int, float]:
        """Coefficient of every noise seed over all terms (antithetic members merged)."""
        merged: dict[int, float] = {}
        for population, coefficients in terms:
            for member, coefficient in zip(population.members, coefficients.tolist()):
                merged[member.noise_seed] = merged.get(member.noise_seed, 0.0) + coefficient * member.sign
        return merged

    def _low_bit_terms(self, index: int, merged: dict[int, float], decay: float) -> UpdateTerms:
        """The fused kernel's description of ``decay * w + estimate`` for a low-bit weight (scale it with
        :meth:`UpdateTerms.scaled`).

        Low-rank noise: the factors of every seed, coefficients folded into ``A``. Stream noise: the seeds and
        coefficients. Otherwise the algorithm's dense estimate.
        """
        param = self.params[index]
        seeds = [seed for seed, weight in merged.items() if weight != 0.0]
        terms = UpdateTerms(decay=decay)
        if not seeds:
            return terms
        factors = self.algorithm.stacked_low_rank_factors(seeds, index, param)
        if factors is not None:
            a, b = factors  # (K, out, r), (K, in, r)
            weights = torch.tensor([merged[s] for s in seeds], dtype=torch.float32, device=a.device)
            terms.factor_a, terms.factor_b = weighted_factor_columns(a, b, weights)  # (out, K r), (in, K r)
            return terms
        streams = [self.algorithm.noise_stream(seed, index, param) for seed in seeds]
        if all(stream is not None for stream in streams) and len({st[1] for st in streams}) == 1:  # type: ignore[index]
            terms.seeds = torch.tensor([st[0] for st in streams], dtype=torch.int64)  # type: ignore[index]
            terms.coefficients = torch.tensor([merged[s] for s in seeds], dtype=torch.float32)
            terms.gaussian = streams[0][1] == "gaussian"  # type: ignore[index]
            return terms
        terms.dense = self.algorithm.combine(merged, index, param)
        return terms

    def _squared_norm(self, index: int, terms: UpdateTerms) -> float:
        """Squared norm of a low-bit weight's estimate without forming it: exact for low-rank and dense terms,
        the expectation ``numel * sum_m c_m^2`` for noise streams."""
        if terms.factor_a is not None and terms.factor_b is not None:
            gram = (terms.factor_a.t() @ terms.factor_a) * (terms.factor_b.t() @ terms.factor_b)
            return float(gram.sum())
        if terms.dense is not None:
            return float(terms.dense.square().sum())
        if terms.coefficients is not None:
            return float(terms.coefficients.square().sum()) * self.params[index].numel()
        return 0.0
