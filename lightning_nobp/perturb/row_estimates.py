"""Per-row estimates of row-local layers (a classifier's head, a language model's output projection) and the exact
gradient of the layer that computes the cross-entropy's logits.

During a step's evaluation the members' per-row losses are recorded (``RowLossRecorder``) together with the noise of
the row-local layers and their unperturbed input rows (tapped from the official training pass); the update then
replaces those layers' evolution-strategies estimates by estimates from the rows
(``lightning_nobp.perturb.row_estimate``) or by their exact gradient (``lightning_nobp.perturb.logit_layers``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nobp.algorithms.base import Population
from lightning_nobp.lowbit import is_low_bit
from lightning_nobp.perturb.logit_layers import cross_entropy_layer_gradient, find_logit_layers
from lightning_nobp.perturb.member_noise import MemberNoise, SeedNoise
from lightning_nobp.perturb.owners import ParameterOwners
from lightning_nobp.perturb.row_estimate import embedding_row_gradient, row_local_gradient
from lightning_nobp.perturb.row_losses import (
    CrossEntropyTargets,
    RowLocalLayer,
    RowLossRecorder,
    find_row_local_layers,
)

LossContext = Callable[[], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class RowEstimateOptions:
    """Which per-row estimates a step may use (from the algorithm's options).

    Args:
        enabled: estimate row-local layers from per-row losses (antithetic ES on one process).
        embeddings: also the embeddings of a causal sequence model (a biased estimate).
        max_outputs: widest output of a layer estimated from per-row losses (``None``: the antithetic pairs).
        exact_head: the layer computing the cross-entropy's logits takes its exact gradient.
    """

    enabled: bool = False
    embeddings: bool = False
    max_outputs: int | None = None
    exact_head: bool = False


def rescaled(better: Tensor, norm: float, fallback: Any) -> Any:
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


class RowEstimates:
    """Records a step's per-row losses and turns them into the row-local layers' estimates.

    Args:
        options: which estimates to use.
        owners: the parameter-to-module map.
        noise: the members' noise (the row-local layers' noise for seeds no chunk stacked).
        loss_context: where the extra forwards run (the evaluations' context).
    """

    def __init__(
        self, options: RowEstimateOptions, owners: ParameterOwners, noise: MemberNoise, loss_context: LossContext
    ) -> None:
        self.options = options
        #: per-row estimates in use (switched off for good when the step's loss is not the recorded one)
        self.enabled = options.enabled
        self.owners = owners
        self.params = owners.params
        self.noise = noise
        self.loss_context = loss_context
        #: the row-local layers found on the first batch (``None``: not searched yet)
        self.row_local: list[RowLocalLayer] | None = None
        #: weight indices of the row-local layers whose output is the cross-entropy's logits (``None``: not searched)
        self.logit_layers: set[int] | None = None
        #: the last evaluation's per-row record: (population, rows ``(P, N)``, each row-local layer's input rows,
        #: the cross-entropy's targets or ``None``)
        self._record: tuple[Population, Tensor, dict[int, Tensor], CrossEntropyTargets | None] | None = None
        #: the row-local layers' noise stacked per seed by the batched evaluation
        self.seed_noise: SeedNoise = []
        #: the row-local layers' input rows seen by the official training pass (``input_tap``), by weight index
        self._tapped_inputs: dict[int, Tensor] = {}

    def unperturbed_indices(self) -> set[int]:
        """Parameters the members evaluate at their stored value: the layers computing the cross-entropy's logits
        once they take their exact gradient. Their perturbation would tell nothing the exact gradient does not, and
        its share of every member's loss change would be noise in the estimates of all the other parameters."""
        if not (self.options.exact_head and self.enabled and self.logit_layers and self.row_local):
            return set()
        layers = [layer for layer in self.row_local if layer.weight_index in self.logit_layers]
        indices = {layer.weight_index for layer in layers}
        return indices | {layer.bias_index for layer in layers if layer.bias_index is not None}

    def kept_indices(self) -> set[int]:
        """Parameters of the row-local layers while per-row estimates are on (their noise is kept for the update)."""
        if not self.enabled or not self.row_local:
            return set()
        indices = {layer.weight_index for layer in self.row_local}
        return indices | {layer.bias_index for layer in self.row_local if layer.bias_index is not None}

    def recorder(
        self,
        population: Population,
        loss_fn: Callable[[], Tensor],
        restore_rng: Callable[[], None],
        members: Sequence[int] | None,
        member_inputs: object | None,
    ) -> RowLossRecorder | None:
        """A recorder of the members' per-row losses when this step can use them, else ``None``.

        Needs every member evaluated here on the same inputs (one process, no per-member data). The row-local
        layers are searched on the first such step.
        """
        self._record = None
        self.seed_noise = []
        if not self.enabled or member_inputs is not None:
            return None
        if members is not None and sorted(members) != list(range(len(population))):
            return None
        if self.row_local is None:
            self.row_local = find_row_local_layers(self._candidates(len(population) // 2), loss_fn, restore_rng)
        if self.options.exact_head and self.logit_layers is None:
            self.logit_layers = {layer.weight_index for layer in find_logit_layers(self.row_local, loss_fn, restore_rng)}
            if not self.logit_layers:
                warnings.warn(
                    "exact_head_gradient=True, but no layer's output is the logits of the training step's"
                    " cross-entropy (an nn.Linear whose output reaches F.cross_entropy unchanged, class-index targets,"
                    " no label smoothing, one output row per loss row): the output layers keep their per-row"
                    " estimates.",
                    stacklevel=5,
                )
        return RowLossRecorder() if self.row_local else None

    def _candidates(self, pairs: int) -> list[RowLocalLayer]:
        """``nn.Linear`` layers with a trained weight and at most ``pairs`` outputs (or ``max_outputs``), whose
        parameters no other module shares (a head tied to an embedding also gets the embedding's gradient: not from
        rows alone); with ``embeddings`` also such ``nn.Embedding`` layers of at most that many dimensions."""
        widest = pairs if self.options.max_outputs is None else self.options.max_outputs
        candidates = []
        for layer in self.owners.unshared_layers(embeddings=self.options.embeddings):
            module = layer.module
            if type(module) is nn.Linear and module.out_features <= widest:
                candidates.append(layer)
            elif isinstance(module, nn.Embedding) and module.embedding_dim <= widest:
                candidates.append(layer)
        return candidates

    def keep(
        self,
        population: Population,
        fitness: Tensor,
        rows: list[tuple[list[int], Tensor, Tensor]],
        loss_fn: Callable[[], Tensor],
        restore_rng: Callable[[], None],
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
            self.enabled = False
            warnings.warn(
                "per-row estimates are off: the loss returned by the training step is not the single recognized"
                " per-row loss it computes (a regularizer or a second loss is added). Row-local layers are"
                " estimated from the members' mean losses like every other parameter.",
                stacklevel=4,
            )
            return
        inputs, self._tapped_inputs = self._tapped_inputs, {}
        if any(not _inputs_fit(layer, inputs.get(layer.weight_index), width) for layer in self.row_local):
            inputs = {}  # not from this batch: take them from one forward at the current weights
            with self.input_tap(inputs):
                restore_rng()
                with torch.no_grad(), self.loss_context():
                    loss_fn()
        self._record = (population, table, inputs, targets)

    @contextlib.contextmanager
    def input_tap(self, into: dict[int, Tensor] | None = None) -> Iterator[None]:
        """Within the context, forwards keep the input rows of the row-local layers (for the next update).

        The strategy wraps its official training pass in it, which saves the per-row estimate one forward.

        Args:
            into: where to keep them, by weight index (default: for the next evaluation).
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

        layers = self.row_local if self.enabled and self.row_local else []
        handles = [layer.module.register_forward_pre_hook(tap(layer)) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gradients(self, population: Population | None, exact_only: bool = False) -> dict[int, Tensor]:
        """Per-row estimates of the row-local layers' weights and biases, by parameter index (empty if none).

        Consumes the step's record (rows, inputs, stacked noise): an update uses it once. A logit layer, which the
        members leave unperturbed (``unperturbed_indices``), gets its exact gradient, or nothing when this step
        cannot give it (no cross-entropy targets recorded): its members' losses hold nothing about it.

        Args:
            population: the population the record must belong to (``None``: no record applies).
            exact_only: only the layers that take their exact gradient (an accumulation window's last micro-batch:
                the per-row estimates of the others would see one micro-batch of several).
        """
        record, self._record = self._record, None
        seed_noise, self.seed_noise = self.seed_noise, []
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

    def _pair_noise(self, index: int, seeds: list[int], seed_noise: SeedNoise) -> tuple[Tensor, Tensor] | Tensor:
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
            return torch.cat(stacks)[rows]  # type: ignore[arg-type]
        return self.noise.of_seeds(index, seeds, low_rank=index in self.owners.low_rank_capable)
