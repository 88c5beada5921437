"""Evolution strategies: ``EggRoll`` (low-rank perturbations, Sarkar et al. 2025) and ``OpenES`` (full rank).

Both estimate the gradient of the smoothed loss ``E[L(theta + sigma * E)]`` as
``sum_i shaped(L_i) * sign_i * E_i / (sigma * n)``. EggRoll draws, for every weight matrix ``W`` of shape
``(out, in)``, two Gaussian factors ``A (out, r)`` and ``B (in, r)`` and perturbs by ``E = A B^T / sqrt(r)``: a
member costs ``(out + in) r`` random numbers instead of ``out * in``, its forward is ``x W^T + sigma (x B) A^T /
sqrt(r)``, and the step's update ``sum_i c_i A_i B_i^T`` is one matrix product. Vectors (biases, norms) get
full-rank Gaussian noise. OpenES uses full-rank Gaussian noise everywhere.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_nobp.algorithms.base import (
    Algorithm,
    Estimate,
    Member,
    Population,
    weighted_factor_columns,
)
from lightning_nobp.algorithms.extras import PLAIN, EstimatorExtras
from lightning_nobp.algorithms.input_bases import InputBases
from lightning_nobp.algorithms.noise_cache import NoiseCache
from lightning_nobp.algorithms.noise_requests import NoiseRequest, draw_requests
from lightning_nobp.algorithms.seeds import derive_seed, derive_seed_range
from lightning_nobp.algorithms.shaping import FITNESS_SHAPINGS, shape_fitness, shape_fitness_masked

#: most optimizer steps whose noise one prefetch draws together (``EvolutionStrategy.prefetch_noise``)
NOISE_WINDOW_STEPS = 8
#: most bytes of noise drawn for later steps in one prefetch (a large model's noise is drawn one step at a time)
NOISE_WINDOW_BYTES = 4 * 1024 * 1024
#: populations ``EvolutionStrategy.ask`` keeps (a noise window's steps are asked when it is drawn and on each step)
ASKED_KEPT = 2 * NOISE_WINDOW_STEPS


def _largest_divisor(number: int, at_most: int) -> int:
    return max(d for d in range(1, min(number, at_most) + 1) if number % d == 0)


def _check_positive_finite(owner: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}({name}={value!r}): {name} must be a positive finite number")


class EvolutionStrategy(InputBases, Algorithm):
    """Shared population, fitness shaping and pair-dropping logic of ``EggRoll`` and ``OpenES``.

    Args:
        population: members per step (``P``); with ``antithetic`` an even number of at least 2.
        sigma: perturbation scale.
        antithetic: evaluate ``+E`` and ``-E`` for every noise (pairs share their noise and their data).
        fitness_shaping: ``"centered_rank"``, ``"zscore"``, ``"sign"`` (antithetic only) or ``None``.
        population_chunk: members evaluated together in one batched forward (bounds activation memory); must
            divide the population. ``None`` evaluates all of a process's members at once.
        extras: what the estimate adds to the published method (:class:`EstimatorExtras`); ``None``: nothing.
    """

    #: a population's noise is drawn for all its seeds at once (``lightning_nobp.algorithms.counter_noise``)
    noise_source = "counter"

    def __init__(
        self,
        population: int,
        sigma: float,
        antithetic: bool = True,
        fitness_shaping: str | None = "centered_rank",
        population_chunk: int | None = None,
        extras: EstimatorExtras | None = None,
    ) -> None:
        owner = type(self).__name__
        if not (extras is None or isinstance(extras, EstimatorExtras)):
            raise TypeError(
                f"{owner}(extras={extras!r}): pass EstimatorExtras(...) from lightning_nobp.algorithms, or None for"
                " the published method"
            )
        extras = extras if extras is not None else PLAIN
        if not (isinstance(population, int) and population >= 2):
            raise ValueError(f"{owner}(population={population!r}): the population must be an integer >= 2")
        if antithetic and population % 2:
            raise ValueError(
                f"{owner}(population={population}, antithetic=True): antithetic sampling evaluates pairs, so the"
                f" population must be even; use population={population + 1} or antithetic=False"
            )
        _check_positive_finite(owner, "sigma", sigma)
        if fitness_shaping not in FITNESS_SHAPINGS:
            raise ValueError(f"{owner}(fitness_shaping={fitness_shaping!r}): choose one of {FITNESS_SHAPINGS}")
        if fitness_shaping == "sign" and not antithetic:
            raise ValueError(f"{owner}(fitness_shaping='sign') compares antithetic pairs: set antithetic=True")
        if population_chunk is not None and not (
            isinstance(population_chunk, int) and population_chunk >= 1 and population % population_chunk == 0
        ):
            raise ValueError(
                f"{owner}(population={population}, population_chunk={population_chunk!r}): the chunk must be a"
                f" positive divisor of the population, e.g. population_chunk={_largest_divisor(population, 16)}"
            )
        self._population_chunk = population_chunk
        #: the members' noise of the last steps (each member's noise is used by its pair and by the update)
        self.noise_cache = NoiseCache()
        self.population = population
        self.sigma = float(sigma)
        #: the research options on top of the published estimate (``PLAIN``: none)
        self.extras = extras
        self.per_row_estimates = extras.per_row_estimates
        self.per_row_embeddings = extras.per_row_embeddings
        self.per_row_max_outputs = extras.per_row_max_outputs
        self.exact_head_gradient = extras.exact_head_gradient
        self.input_subspace = extras.input_subspace
        self.antithetic = antithetic
        self.fitness_shaping = fitness_shaping

    def _extras_repr(self) -> str:
        current = EstimatorExtras(
            self.per_row_estimates,
            self.input_subspace,
            self.per_row_embeddings,
            self.per_row_max_outputs,
            self.exact_head_gradient,
        )
        return "None" if current == PLAIN else repr(current)

    @property
    def shards_population(self) -> bool:
        return True

    @property
    def population_chunk(self) -> int | None:
        return self._population_chunk

    def ask(self, step_seed: int) -> Population:
        """The step's population; the last ``ASKED_KEPT`` are kept (populations are immutable), since a step's
        population is asked again when a noise window drew it earlier (``prefetch_noise``)."""
        key = (step_seed, self.population, self.antithetic, self.sigma)
        asked: OrderedDict | None = self.__dict__.get("_asked")  # absent after unpickling (``__getstate__``)
        if asked is None:
            asked = self.__dict__["_asked"] = OrderedDict()
        population = asked.get(key)
        if population is None:
            population = asked[key] = self._new_population(step_seed)
            if len(asked) > ASKED_KEPT:
                asked.popitem(last=False)
        return population

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_asked", None)  # a cache
        return state

    def _new_population(self, step_seed: int) -> Population:
        members: list[Member] = []
        if self.antithetic:
            for seed in derive_seed_range(step_seed, count=self.population // 2):
                members += [Member(seed, +1.0), Member(seed, -1.0)]
        else:
            members = [Member(seed, +1.0) for seed in derive_seed_range(step_seed, count=self.population)]
        return Population(tuple(members), sigma=self.sigma)

    def _usable(self, fitness: Tensor) -> Tensor:
        """Members whose fitness is finite (with antithetic sampling: whose whole pair is finite)."""
        finite = torch.isfinite(fitness)
        if self.antithetic:
            pairs = finite[0::2] & finite[1::2]
            finite = pairs.repeat_interleave(2)
        return finite

    def tell_on_device(self, population: Population, fitness: Tensor) -> Estimate:
        fitness = fitness.detach().to(torch.float64)
        usable = self._usable(fitness)
        count = usable.sum()
        applies = count >= 2
        shaped = shape_fitness_masked(fitness, usable, self.fitness_shaping)
        coefficients = torch.where(applies, shaped / (self.sigma * count.clamp_min(1)), torch.zeros_like(shaped))
        valid = torch.where(usable, fitness, torch.zeros_like(fitness))
        mean = valid.sum() / count.clamp_min(1)
        deviations = torch.where(usable, fitness - mean, torch.zeros_like(fitness))
        std = (deviations.square().sum() / count.clamp_min(1)).sqrt()
        best = torch.where(usable, fitness, torch.full_like(fitness, float("inf"))).min()
        dropped = (~usable).sum()
        stats = {"fitness_mean": mean, "fitness_std": std, "fitness_best": best, "dropped_members": dropped}
        return Estimate(coefficients.to(torch.float32), dropped_members=dropped, stats=stats, applies=applies)

    def tell(self, population: Population, fitness: Tensor) -> Estimate:
        fitness = fitness.detach().to(torch.float64)
        if bool(torch.isfinite(fitness).all()):  # the usual case: no member to drop, no masks
            valid, usable, dropped = fitness, None, 0
        else:
            usable = self._usable(fitness)
            valid, dropped = fitness[usable], int((~usable).sum())
        if len(valid) < 2:
            return Estimate(None, dropped_members=dropped)
        shaped = shape_fitness(valid, self.fitness_shaping)
        if usable is not None:
            shaped = torch.zeros_like(fitness).masked_scatter_(usable, shaped)
        coefficients = shaped / (self.sigma * len(valid))
        mean, std, best = torch.stack([valid.mean(), valid.std(unbiased=False), valid.min()]).tolist()
        stats = {"fitness_mean": mean, "fitness_std": std, "fitness_best": best, "dropped_members": float(dropped)}
        return Estimate(coefficients.to(torch.float32), dropped_members=dropped, stats=stats)

    def prefetch_noise(
        self,
        noise_seeds: Sequence[int],
        params: Sequence[tuple[int, Tensor, bool, bool]],
        window: Callable[[int], Sequence[int]] | None = None,
    ) -> None:
        """Draw the noise of every listed parameter with shared counter-based computations
        (``lightning_nobp.algorithms.noise_requests``): the same numbers as drawing them one by one.

        With ``window``, a draw that is needed covers the noise of ``window(k)``'s steps at once, ``k`` as many steps
        as hold ``NOISE_WINDOW_BYTES`` (at most ``NOISE_WINDOW_STEPS``): the next steps of the window then find
        theirs cached. A small model's draw for 8 steps costs far less than 8 draws of one step. ``window(k)`` must
        return the same seeds, in the same order, on every step of a
        window, so that each noise is always drawn in the same company (an input-subspace projection is not
        bit-identical across companies): a resumed run then draws exactly what an uninterrupted one does.
        """
        requests = self._noise_requests(noise_seeds, params)
        if window is not None and any(r.shareable and not self.noise_cache.holds(r.keys) for r in requests):
            per_step = 4 * len(noise_seeds) * sum(r.numbers for r in requests if r.shareable)
            steps = min(NOISE_WINDOW_STEPS, NOISE_WINDOW_BYTES // max(per_step, 1))
            if steps > 1:
                noise_seeds = list(dict.fromkeys([*window(steps), *noise_seeds]))
                requests = self._noise_requests(noise_seeds, params)
        draw_requests(noise_seeds, requests, self.noise_cache)

    def _noise_requests(
        self, noise_seeds: Sequence[int], params: Sequence[tuple[int, Tensor, bool, bool]]
    ) -> list[NoiseRequest]:
        requests = []
        for index, param, low_rank, dense_allowed in params:
            request = self._noise_request(noise_seeds, index, param, low_rank, dense_allowed)
            if request is not None:
                requests.append(request)
        return requests

    def _noise_request(
        self, noise_seeds: Sequence[int], index: int, param: Tensor, low_rank: bool, dense_allowed: bool
    ) -> NoiseRequest | None:
        """The cached draw behind a parameter's noise (see :meth:`prefetch_noise`): its dense noise."""
        return self._dense_request(noise_seeds, index, param) if dense_allowed else None


class OpenES(EvolutionStrategy):
    """OpenAI-style evolution strategies with full-rank Gaussian noise and seed replay.

    The defaults are those of Qiu et al. (2025) for fine-tuning LLMs (N = 30, sigma = 1e-3, with their learning
    rate 5e-4 in the user's optimizer); from scratch on small models sigma of 0.02-0.1 works better.

    Args:
        population: members per step; even with antithetic sampling.
        sigma: perturbation scale.
        antithetic: evaluate ``+E`` and ``-E`` for every noise.
        fitness_shaping: ``"centered_rank"``, ``"zscore"``, ``"sign"`` or ``None``.
        population_chunk: members per batched forward; a divisor of the population (``None``: all).
        extras: research options on top of the published estimate (:class:`EstimatorExtras`: per-row head
            estimates, input subspace); ``None``: the method as published.
    """

    def __init__(
        self,
        population: int = 30,
        sigma: float = 1e-3,
        antithetic: bool = True,
        fitness_shaping: str | None = "zscore",
        population_chunk: int | None = None,
        extras: EstimatorExtras | None = EstimatorExtras(),
    ) -> None:
        super().__init__(population, sigma, antithetic, fitness_shaping, population_chunk, extras)

    def __repr__(self) -> str:
        return (
            f"OpenES(population={self.population}, sigma={self.sigma}, antithetic={self.antithetic},"
            f" fitness_shaping={self.fitness_shaping!r}, extras={self._extras_repr()})"
        )

    def noise(self, noise_seed: int, param_index: int, param: Tensor) -> Tensor:
        return self._dense_stack([noise_seed], param_index, param)[0]

    def stacked_noise(self, noise_seeds: Sequence[int], param_index: int, param: Tensor) -> Tensor:
        return self._dense_stack(noise_seeds, param_index, param)

    def shared_basis_factors(
        self, noise_seeds: Sequence[int], param_index: int, param: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        return self._subspace_factors(noise_seeds, param_index, param)

    def noise_stream(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[int, str] | None:
        if id(param) in self.input_bases:
            return None  # projected noise is not a Philox stream: kernels use `noise`
        return derive_seed(noise_seed, param_index), "gaussian"


class EggRoll(EvolutionStrategy):
    """Evolution strategies with low-rank perturbations (EGGROLL): population-scale ES at inference cost.

    Every parameter with two or more dimensions is treated as a matrix ``(shape[0], prod(shape[1:]))`` (Linear
    and Embedding weights, attention projections, conv kernels) and perturbed by ``A B^T / sqrt(rank)``; vectors
    get full-rank Gaussian noise.

    How to pick sigma and lr: sigma sets how far members look; 1e-2 suits weights of order 0.1 (default
    initialisations of layers up to a few thousand wide); use about 1e-3 for fine-tuning pretrained models. With
    ``"centered_rank"`` shaping the estimate's scale is independent of the loss, so Adam with lr 1e-3 to 1e-2 (or
    SGD with lr around ``sigma``) is a good start.

    Args:
        population: members per step (``P``); even with antithetic sampling.
        rank: rank ``r`` of each matrix perturbation.
        sigma: perturbation scale.
        antithetic: evaluate ``+E`` and ``-E`` for every noise (pairs share noise and data).
        fitness_shaping: ``"centered_rank"``, ``"zscore"``, ``"sign"`` or ``None``.
        population_chunk: members per batched forward; a divisor of the population (``None``: all).
        extras: research options on top of the published estimate (:class:`EstimatorExtras`: per-row head
            estimates, input subspace); ``None``: the method as published.
    """

    def __init__(
        self,
        population: int = 64,
        rank: int = 1,
        sigma: float = 1e-2,
        antithetic: bool = True,
        fitness_shaping: str | None = "centered_rank",
        population_chunk: int | None = None,
        extras: EstimatorExtras | None = EstimatorExtras(),
    ) -> None:
        super().__init__(population, sigma, antithetic, fitness_shaping, population_chunk, extras)
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"EggRoll(rank={rank!r}): the rank must be an integer >= 1")
        self.rank = rank

    def __repr__(self) -> str:
        return (
            f"EggRoll(population={self.population}, rank={self.rank}, sigma={self.sigma},"
            f" antithetic={self.antithetic}, fitness_shaping={self.fitness_shaping!r}, extras={self._extras_repr()})"
        )

    def factors(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[Tensor, Tensor]:
        """The Gaussian factors ``A (out, r)`` and ``B (in, r)`` of a matrix parameter, from one seeded stream
        (``B`` projected on the weight's input basis, if it has one); cached in ``noise_cache``, returned as copies.
        """
        a, b = self.stacked_factors([noise_seed], param_index, param)
        return a[0], b[0]

    def stacked_factors(self, noise_seeds: Sequence[int], param_index: int, param: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`factors` of several member seeds, stacked ``(A (S, out, r), B (S, in, r))`` (new tensors).

        Every seed's factors come from its own stream ``derive_seed(seed, param_index)`` (the first ``out * r``
        numbers are ``A``) and are cached; the seeds absent from the cache are drawn and projected together.
        """
        request = self._factor_request(noise_seeds, param_index, param)
        a, b = self.noise_cache.get_stacked(
            request.keys, lambda missing: request.draw([noise_seeds[i] for i in missing])
        )  # new tensors: the caller may modify them
        return a, b

    def _factor_request(self, noise_seeds: Sequence[int], param_index: int, param: Tensor) -> NoiseRequest:
        """How a matrix parameter's factors for ``noise_seeds`` come from counter-based streams (the entries
        :meth:`stacked_factors` caches)."""
        shape, device = param.shape, param.device  # read once: slow on tensor subclasses (low-bit weights)
        out_features = shape[0]
        in_features = shape.numel() // out_features
        split = out_features * self.rank

        def finish(both: Tensor) -> tuple[Tensor, Tensor]:
            a = both[:, :split].view(len(both), out_features, self.rank)
            b = self._in_input_subspace(param, both[:, split:].view(len(both), in_features, -1))
            return a, b

        keys = self.noise_cache.keys(("factors", param_index, shape, device), noise_seeds)
        return NoiseRequest(keys, param_index, (out_features + in_features) * self.rank, finish, device)

    def low_rank_factors(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[Tensor, Tensor] | None:
        if param.dim() != 2:
            return None
        a, b = self.factors(noise_seed, param_index, param)
        return (a if self.rank == 1 else a.div(math.sqrt(self.rank))), b

    def stacked_low_rank_factors(
        self, noise_seeds: Sequence[int], param_index: int, param: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        if param.dim() != 2:
            return None
        a, b = self.stacked_factors(noise_seeds, param_index, param)
        return (a if self.rank == 1 else a.div_(math.sqrt(self.rank))), b

    def noise_stream(self, noise_seed: int, param_index: int, param: Tensor) -> tuple[int, str] | None:
        return (derive_seed(noise_seed, param_index), "gaussian") if param.dim() < 2 else None

    def noise(self, noise_seed: int, param_index: int, param: Tensor) -> Tensor:
        return self.stacked_noise([noise_seed], param_index, param)[0]

    def stacked_noise(self, noise_seeds: Sequence[int], param_index: int, param: Tensor) -> Tensor:
        if param.dim() < 2:
            return self._dense_stack(noise_seeds, param_index, param)
        a, b = self.stacked_factors(noise_seeds, param_index, param)
        return torch.bmm(a, b.transpose(1, 2)).div_(math.sqrt(self.rank)).view(len(noise_seeds), *param.shape)

    def _noise_request(
        self, noise_seeds: Sequence[int], index: int, param: Tensor, low_rank: bool, dense_allowed: bool
    ) -> NoiseRequest | None:
        """A matrix's factors (its dense noise is formed from them too), else the dense noise."""
        if param.dim() >= 2:
            wanted = (low_rank and param.dim() == 2) or dense_allowed
            return self._factor_request(noise_seeds, index, param) if wanted else None
        return super()._noise_request(noise_seeds, index, param, low_rank, dense_allowed)

    def combine(self, weights: Mapping[int, float], param_index: int, param: Tensor) -> Tensor:
        """``sum_s w_s A_s B_s^T / sqrt(r)`` as one product ``(A diag(w)) B^T``: no per-member matrix."""
        if param.dim() < 2:
            return super().combine(weights, param_index, param)
        seeds = [seed for seed, weight in weights.items() if weight != 0.0]
        if not seeds:
            return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        a, b = self.stacked_factors(seeds, param_index, param)  # (K, out, r), (K, in, r)
        scale = torch.tensor([weights[s] for s in seeds], dtype=torch.float32, device=param.device)
        scaled_a, stacked_b = weighted_factor_columns(a, b, scale)  # (out, K r), (in, K r)
        return (scaled_a @ stacked_b.t()).div_(math.sqrt(self.rank)).view(param.shape)
