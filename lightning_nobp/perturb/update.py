"""Write a step's gradient estimate: into ``p.grad`` for the user's optimizer, or straight into the weights.

The estimate of every parameter is ``sum_m c_m sign_m E_m``, regenerated from the members' seeds (antithetic twins
merged), with the per-row estimates of row-local layers in place of their evolution-strategies estimates. Low-bit
weights are written by the fused low-bit kernel; bf16 and float32 weights by the fused dense kernel where it is on
(``fused``: one pass per weight and one launch for all weights of a dtype, the low-rank term and each stream's
noise formed inside it, no dense estimate, no host synchronisation), else with stochastic rounding below float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import Algorithm, Population, weighted_factor_columns
from lightning_nobp.algorithms.seeds import derive_seed
from lightning_nobp.kernels.dense_update import grouped_dense_update_
from lightning_nobp.kernels.lowbit_update import UpdateTerms, added_terms, reference_dequantize
from lightning_nobp.kernels.stochastic_rounding import stochastic_round
from lightning_nobp.lowbit import apply_low_bit_updates, layout_of
from lightning_nobp.perturb.direct_step import DirectHyperparameters, adam_direction, momentum_direction, rms
from lightning_nobp.perturb.row_estimates import RowEstimates, rescaled
from lightning_nobp.perturb.step_limit import step_factor


def merged_weight_tensor(terms: Sequence[tuple[Population, Tensor]]) -> tuple[list[int], Tensor]:
    """:func:`merged_weights` kept on the coefficients' device: the noise seeds (host integers, in first-seen order)
    and their coefficients as a float32 tensor, summed there (no host synchronisation)."""
    seeds = list(dict.fromkeys(member.noise_seed for population, _ in terms for member in population.members))
    position = {seed: i for i, seed in enumerate(seeds)}
    device = terms[0][1].device
    weights = torch.zeros(len(seeds), dtype=torch.float32, device=device)
    for population, coefficients in terms:
        index = torch.tensor([position[m.noise_seed] for m in population.members]).to(device, non_blocking=True)
        signs = torch.tensor([m.sign for m in population.members], dtype=torch.float32).to(device, non_blocking=True)
        weights.index_add_(0, index, coefficients.to(torch.float32) * signs)
    return seeds, weights


def merged_weights(terms: Sequence[tuple[Population, Tensor]]) -> dict[int, float]:
    """Coefficient of every noise seed over all terms (antithetic members merged)."""
    merged: dict[int, float] = {}
    for population, coefficients in terms:
        for member, coefficient in zip(population.members, coefficients.tolist()):
            merged[member.noise_seed] = merged.get(member.noise_seed, 0.0) + coefficient * member.sign
    return merged


def terms_change_norm(step: float | Tensor, squared: float | Tensor) -> Tensor:
    """The norm of the change a step of ``step`` times terms of squared norm ``squared`` makes."""
    return abs(step) * torch.as_tensor(squared).sqrt()


def estimate_change_norm(estimate: Tensor, lr: float, normalize: bool) -> float | Tensor:
    """The norm of the change an SGD step along ``estimate`` makes (normalized: ``lr * sqrt(numel)``)."""
    return lr * math.sqrt(estimate.numel()) if normalize else lr * estimate.norm()


def with_step_factor(estimate: Tensor, factor: float | Tensor, normalize: bool) -> Tensor:
    """An SGD step's estimate with the step limit's factor on it (a normalized step takes it after normalizing)."""
    return estimate if normalize or isinstance(factor, float) else estimate * factor


class EstimateWriter:
    """Writes the estimate of the tracked parameters.

    Args:
        algorithm: the estimator (regenerates each seed's noise and combines it).
        params: the tracked parameters, in ``param_index`` order.
        names: their names, for error messages.
        low_bit: indices of the low-bit parameters.
        rows: the per-row estimates that replace some parameters' estimates.
        fused: indices of the bf16/float32 parameters the fused dense kernel updates.
        streamed: indices whose dense noise is the algorithm's Philox stream (the kernels regenerate it).
    """

    def __init__(
        self,
        algorithm: Algorithm,
        params: Sequence[Tensor],
        names: Sequence[str],
        low_bit: set[int],
        rows: RowEstimates,
        fused: set[int] | None = None,
        streamed: set[int] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.params = list(params)
        self.names = list(names)
        self.low_bit = low_bit
        self.rows = rows
        self.fused = fused or set()
        self.streamed = streamed or set()
        #: how many tensors the last direct update's step limit scaled down (a tensor: read it to log it)
        self.limited: int | Tensor = 0

    def _limit(
        self, index: int, settings: DirectHyperparameters, change_norm: Callable[[], float | Tensor]
    ) -> Tensor | float:
        """The factor the step limit puts on parameter ``index``'s step (1 without a limit, and for Adam),
        counted in :attr:`limited` when below 1.

        Args:
            index: the parameter.
            settings: its step settings.
            change_norm: the norm of the change the step makes, computed only where a limit applies.
        """
        if settings.step_limit is None or settings.adam:
            return 1.0
        factor = step_factor(self.params[index], change_norm(), settings.step_limit)
        self.limited = self.limited + (factor < 1).to(torch.int64)
        return factor

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
        row_local = self.rows.gradients(population)
        merged = merged_weights([(population, coefficients)])  # antithetic twins merged, once for all
        unperturbed = self.rows.unperturbed_indices()
        for index, param in enumerate(self.params):
            if index in unperturbed and index not in row_local:
                continue  # not perturbed, and no exact gradient from this micro-batch: nothing to add
            total = self.algorithm.combine(merged, index, param)
            if index in row_local:
                total = rescaled(row_local[index], float(total.norm()), total)
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
            the update was not finite and nothing was written. A tensor where fused weights contribute to it (kept
            on the device: read it when logging), else a float.
        """
        self.limited = 0
        merged = merged_weights(terms)
        row_local = self.rows.gradients(terms[-1][0], exact_only=len(terms) > 1)
        if not all(map(math.isfinite, merged.values())):
            return float("nan")  # never write a non-finite update: the weights stay untouched
        squared_norm: float | Tensor = 0.0
        unperturbed = self.rows.unperturbed_indices()
        fused: list[tuple[Tensor, UpdateTerms, int]] = []  # written together, one launch per dtype
        low_bit: list[tuple[Tensor, UpdateTerms, int]] = []  # written together, one launch per format
        for index, (param, settings) in enumerate(zip(self.params, hyperparameters)):
            if index in unperturbed and index not in row_local:
                continue  # not perturbed and no exact gradient this step: left as it is
            lr, weight_decay = settings.lr, settings.weight_decay
            seed = derive_seed(rounding_seed, index)
            if index in self.fused and not settings.stateful and index not in row_local:
                update_terms = self._kernel_terms(index, merged, 1.0 - lr * weight_decay)
                squared = self._squared_norm(index, update_terms)
                squared_norm = squared_norm + squared
                step = -lr / rms(squared, param.numel()) if normalize else -lr
                step = step * self._limit(index, settings, lambda: terms_change_norm(step, squared))
                fused.append((param, update_terms.scaled(step), seed))
                continue
            if index in self.low_bit:
                update_terms = self._kernel_terms(index, merged, settings.decay())
                squared = self._squared_norm(index, update_terms)
                if index in row_local:
                    # the per-row estimate, at the norm of the terms it replaces, as one dense term
                    dense = rescaled(row_local[index], float(squared) ** 0.5, None)
                    if dense is not None:
                        update_terms = UpdateTerms(decay=update_terms.decay, dense=dense.view(param.shape[0], -1))
                squared_norm = squared_norm + squared
                if settings.stateful:  # the momentum or Adam direction, formed densely, replaces the terms
                    layout = layout_of(param)
                    estimate = added_terms(update_terms, torch.zeros(layout.rows, layout.cols, device=layout.device))
                    factor = self._limit(index, settings, lambda: estimate_change_norm(estimate, lr, normalize))
                    if settings.adam:
                        weight = reference_dequantize(layout) if settings.weight_decay else estimate
                        direction = self._adam(index, estimate, settings, states, weight, torch.bfloat16)
                    else:
                        bounded = with_step_factor(estimate, factor, normalize)
                        direction = self._momentum(index, bounded, settings, normalize, states, torch.bfloat16)
                    direction = direction * factor if normalize else direction
                    update_terms, step = UpdateTerms(decay=update_terms.decay, dense=direction), -lr
                else:
                    step = -lr / rms(squared, param.numel()) if normalize else -lr
                    step = step * self._limit(index, settings, lambda: terms_change_norm(step, squared))
                low_bit.append((param, update_terms.scaled(step), seed))
                continue
            estimate = self._dense_estimate(index, merged)
            if index in row_local:
                estimate = rescaled(row_local[index], float(estimate.norm()), estimate)
            squared = float(estimate.square().sum())
            squared_norm = squared_norm + squared
            factor = self._limit(index, settings, lambda: estimate_change_norm(estimate, lr, normalize))
            estimate = with_step_factor(estimate, factor, normalize)
            if settings.adam:
                estimate = self._adam(index, estimate, settings, states, param.float(), param.dtype)
            elif settings.momentum:
                estimate = self._momentum(index, estimate, settings, normalize, states, param.dtype)
            elif normalize:
                estimate.div_(rms(squared, param.numel()))
            if normalize:
                estimate = estimate * factor  # a normalized step's change is lr * sqrt(numel): limited after
            if index in self.fused:  # the kernel's rounding, from the same stream as the fused route's
                # a new tensor: a float32 weight's momentum direction is its buffer itself
                fused.append((param, UpdateTerms(decay=settings.decay(), dense=estimate * -lr), seed))
                continue
            if weight_decay and not settings.adam:
                estimate.add_(param.float(), alpha=weight_decay)
            updated = param.float()  # float32 weights: the parameter itself, updated in place
            if settings.adam and settings.decoupled and weight_decay:
                updated = updated.mul_(1.0 - lr * weight_decay)  # AdamW: the weight shrinks before the step
            updated = updated.sub_(estimate, alpha=lr)
            param.copy_(stochastic_round(updated, param.dtype, seed))
        if fused:
            grouped_dense_update_(fused)
        if low_bit:
            apply_low_bit_updates(low_bit)
        return squared_norm**0.5

    @torch.no_grad()
    def apply_update_on_device(
        self,
        terms: Sequence[tuple[Population, Tensor]],
        hyperparameters: Sequence[DirectHyperparameters],
        rounding_seed: int,
        normalize: bool,
        applies: Tensor,
    ) -> Tensor:
        """The direct path without any host synchronisation, every weight on the fused kernels and without
        momentum: coefficients stay on the device, the step is gated there (``applies`` false or a non-finite
        coefficient: nothing changes, weight decay included), norms stay tensors.

        Args:
            terms: ``(population, coefficients)`` of every micro-batch of the step, coefficients on the device.
            hyperparameters: the step settings of every parameter (no momentum).
            rounding_seed: counter-derived seed of the stochastic rounding.
            normalize: divide each parameter's estimate by its root-mean-square.
            applies: boolean tensor: whether the step is taken at all.

        Returns:
            The norm of the estimate (a tensor on the device; 0 for a step not taken).
        """
        self.limited = 0
        seeds, weights = merged_weight_tensor(terms)
        taken = applies & torch.isfinite(weights).all()
        weights = torch.where(taken, weights, torch.zeros_like(weights))
        squared_norm: Tensor | float = 0.0
        fused: list[tuple[Tensor, UpdateTerms, int]] = []
        for index, (param, settings) in enumerate(zip(self.params, hyperparameters)):
            if index not in self.fused or settings.momentum:
                raise ValueError(f"{self.names[index]}: the on-device update takes fused weights without momentum")
            lr = settings.lr
            decay = torch.where(taken, 1.0 - lr * settings.weight_decay, 1.0).to(torch.float32)
            update_terms = self._kernel_terms_of(index, seeds, weights, decay)
            squared = self._squared_norm(index, update_terms)
            squared_norm = squared_norm + squared
            step = -lr / rms(squared, param.numel()) if normalize else -lr
            step = step * self._limit(index, settings, lambda: terms_change_norm(step, squared))
            fused.append((param, update_terms.scaled(step), derive_seed(rounding_seed, index)))
        grouped_dense_update_(fused)  # every weight in one launch per dtype
        return torch.as_tensor(squared_norm).sqrt()

    def _kernel_terms_of(
        self,
        index: int,
        seeds: list[int],
        weights: Tensor,
        decay: float | Tensor,
        merged: dict[int, float] | None = None,
    ) -> UpdateTerms:
        """The fused kernels' description of ``decay * w + estimate`` with the coefficients of ``seeds`` as a
        tensor (on the device for on-device steps: nothing is read back, except for noise that is neither low-rank
        nor a stream, whose combination needs the coefficients on the host).

        Low-rank noise: the factors of every seed, coefficients folded into ``A``. Stream noise (low-bit and
        streamed weights): the seeds and coefficients. Otherwise the algorithm's dense estimate.

        Args:
            index: the parameter.
            seeds: the noise seeds.
            weights: their coefficients ``[len(seeds)]``.
            decay: the weight's multiplier.
            merged: the same coefficients by seed on the host, where the caller has them.
        """
        param = self.params[index]
        terms = UpdateTerms(decay=decay)
        factors = self.algorithm.stacked_low_rank_factors(seeds, index, param)
        if factors is not None:
            a, b = factors  # (K, out, r), (K, in, r)
            # (out, K r), (in, K r)
            terms.factor_a, terms.factor_b = weighted_factor_columns(a, b, weights.to(a.device))
            return terms
        if index in self.low_bit or index in self.streamed:
            streams = [self.algorithm.noise_stream(seed, index, param) for seed in seeds]
            if all(stream is not None for stream in streams) and len({st[1] for st in streams}) == 1:  # type: ignore[index]
                terms.seeds = torch.tensor([st[0] for st in streams], dtype=torch.int64)  # type: ignore[index]
                terms.coefficients = weights
                terms.gaussian = streams[0][1] == "gaussian"  # type: ignore[index]
                return terms
        by_seed = merged if merged is not None else dict(zip(seeds, weights.tolist()))
        terms.dense = self.algorithm.combine(by_seed, index, param)
        return terms

    def _dense_estimate(self, index: int, merged: dict[int, float]) -> Tensor:
        """Parameter ``index``'s float32 estimate formed densely (for momentum and Adam), from the noise its members
        were evaluated with: the Philox streams of streamed weights, else the algorithm's noise."""
        param = self.params[index]
        if index not in self.streamed:
            return self.algorithm.combine(merged, index, param)
        rows = param.shape[0] if param.dim() else 1
        into = torch.zeros(rows, param.numel() // max(rows, 1), dtype=torch.float32, device=param.device)
        return added_terms(self._kernel_terms(index, merged, 1.0), into).view(param.shape)

    def _adam(
        self,
        index: int,
        estimate: Tensor,
        settings: DirectHyperparameters,
        states: Sequence[dict[str, Any]] | None,
        weight: Tensor,
        buffer_dtype: torch.dtype,
    ) -> Tensor:
        """Parameter ``index``'s Adam direction (its moments in ``states[index]`` updated)."""
        if states is None:
            raise ValueError("Adam needs the optimizer's state to keep its moments in")
        return adam_direction(estimate, states[index], settings, weight, buffer_dtype)

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

    def _kernel_terms(self, index: int, merged: dict[int, float], decay: float) -> UpdateTerms:
        """The fused kernels' description of ``decay * w + estimate`` for a low-bit or fused weight (scale it with
        :meth:`UpdateTerms.scaled`), from the host's merged coefficients (seeds with a zero coefficient left out).
        """
        seeds = [seed for seed, weight in merged.items() if weight != 0.0]
        if not seeds:
            return UpdateTerms(decay=decay)
        weights = torch.tensor([merged[s] for s in seeds], dtype=torch.float32)
        return self._kernel_terms_of(index, seeds, weights, decay, merged)

    def _squared_norm(self, index: int, terms: UpdateTerms) -> Tensor | float:
        """Squared norm of a weight's estimate without forming it, as a tensor where it has one (no host
        synchronisation): exact for low-rank and dense terms, the expectation ``numel * sum_m c_m^2`` for noise
        streams."""
        if terms.factor_a is not None and terms.factor_b is not None:
            gram = (terms.factor_a.t() @ terms.factor_a) * (terms.factor_b.t() @ terms.factor_b)
            return gram.sum()
        if terms.dense is not None:
            return terms.dense.square().sum()
        if terms.coefficients is not None:
            return terms.coefficients.square().sum() * self.params[index].numel()
        return 0.0
