"""Several parameters' noise drawn in one counter-based computation (``prefetch_noise``, ``draw_requests``) is
exactly the noise each parameter draws on its own, and the cache answers a repeated population without redrawing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightning_nobp.algorithms import EggRoll, OpenES, noise_requests
from lightning_nobp.algorithms.base import Algorithm
from lightning_nobp.algorithms.counter_noise import COUNTER_DRAW_MAX_NUMEL, derive_seed_grid, derive_seeds
from lightning_nobp.algorithms.noise_cache import NoiseCache
from lightning_nobp.algorithms.seeds import derive_seed

SEEDS = [11, 5, 11 * 7919, 3, 2**40]
MAKERS: dict[str, Callable[[], Algorithm]] = {
    "eggroll": lambda: EggRoll(population=8),
    "eggroll-rank2": lambda: EggRoll(population=8, rank=2),
    "openes": lambda: OpenES(population=8),
}


def _mlp_params() -> list[torch.Tensor]:
    """A data-fed weight, its bias, a head and its bias: lengths from 3 to 9 x 6 numbers per seed."""
    return [torch.zeros(6, 9), torch.zeros(6), torch.zeros(3, 6), torch.zeros(3)]


def _with_basis(algorithm: Algorithm, weight: torch.Tensor) -> None:
    directions = torch.linalg.qr(torch.randn(weight.shape[1], 4, generator=torch.Generator().manual_seed(1)))[0]
    algorithm.set_input_basis(weight, (directions, torch.tensor([2.0, 1.5, 1.0, 0.5])))  # type: ignore[attr-defined]


def test_seed_grid_derives_every_counter_like_one_counter_at_a_time() -> None:
    grid = derive_seed_grid(SEEDS, [0, 3, 2**40])
    assert grid.shape == (3, len(SEEDS))
    for row, counter in enumerate([0, 3, 2**40]):
        assert torch.equal(grid[row], derive_seeds(SEEDS, counter))
        assert [value & (2**64 - 1) for value in grid[row].tolist()] == [derive_seed(s, counter) for s in SEEDS]


@pytest.mark.parametrize("basis", [False, True], ids=["isotropic", "input-subspace"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_prefetched_noise_is_what_each_parameter_draws_alone(
    name: str, basis: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    together, alone = MAKERS[name](), MAKERS[name]()
    alone.noise_cache = NoiseCache(max_bytes=0)  # type: ignore[attr-defined]
    params = _mlp_params()
    if basis:
        _with_basis(together, params[0])
        _with_basis(alone, params[0])
    together.prefetch_noise(SEEDS, [(i, p, True, True) for i, p in enumerate(params)])
    assert together.noise_cache.misses == len(SEEDS) * len(params)  # type: ignore[attr-defined]
    expected = [alone.stacked_noise(SEEDS, index, param) for index, param in enumerate(params)]
    expected_factors = [alone.stacked_low_rank_factors(SEEDS, index, param) for index, param in enumerate(params)]

    def no_more_numbers(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("drawn again after the prefetch")

    for module in ("input_bases", "noise_requests"):  # every later stack comes from the prefetched numbers
        monkeypatch.setattr(f"lightning_nobp.algorithms.{module}.sample_directions", no_more_numbers)
    monkeypatch.setattr(noise_requests, "counter_directions", no_more_numbers)
    for index, param in enumerate(params):
        assert torch.equal(together.stacked_noise(SEEDS, index, param), expected[index]), index
        factors = together.stacked_low_rank_factors(SEEDS, index, param)
        if factors is not None:
            expected_a, expected_b = expected_factors[index]  # type: ignore[misc]
            assert torch.equal(factors[0], expected_a) and torch.equal(factors[1], expected_b)


def test_a_small_model_draws_all_its_noise_in_one_hash_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, tuple[int, ...]]] = []
    original = noise_requests.counter_directions

    def counting(keys: torch.Tensor, shape, distribution: str = "gaussian") -> torch.Tensor:  # type: ignore[no-untyped-def]
        calls.append((len(keys), tuple(shape)))
        return original(keys, shape, distribution)

    monkeypatch.setattr(noise_requests, "counter_directions", counting)
    algorithm = EggRoll(population=8)
    params = _mlp_params()
    algorithm.prefetch_noise(SEEDS, [(i, p, True, True) for i, p in enumerate(params)])
    # the longest request (6 + 9 factor numbers) is drawn for all four parameters' keys at once
    assert calls == [(4 * len(SEEDS), (15,))]
    algorithm.prefetch_noise(SEEDS, [(i, p, True, True) for i, p in enumerate(params)])
    assert len(calls) == 1  # all cached: nothing drawn again


def test_requests_of_very_different_lengths_are_drawn_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    lengths: list[int] = []
    original = noise_requests.counter_directions
    monkeypatch.setattr(
        noise_requests, "counter_directions", lambda keys, shape, *a: lengths.append(shape[0]) or original(keys, shape)
    )
    algorithm = OpenES(population=8)
    params = [torch.zeros(40, 50), torch.zeros(40), torch.zeros(30)]
    algorithm.prefetch_noise(SEEDS, [(i, p, False, True) for i, p in enumerate(params)])
    # the first vector shares the matrix's draw (twice the numbers needed), the second would make it three times
    assert lengths == [2000, 30]
    fresh = OpenES(population=8)
    fresh.noise_cache = NoiseCache(max_bytes=0)
    for index, param in enumerate(params):
        assert torch.equal(algorithm.stacked_noise(SEEDS, index, param), fresh.stacked_noise(SEEDS, index, param))


def test_what_may_not_be_drawn_is_left_to_the_parameter_alone() -> None:
    algorithm = EggRoll(population=8)
    weight, bias, huge = torch.zeros(4, 3), torch.zeros(4), torch.zeros(COUNTER_DRAW_MAX_NUMEL + 2)
    # the weight's factors are wanted, the bias's dense noise is not (too large for the step's budget, say), and a
    # vector longer than counter draws go comes from the generator path later
    algorithm.prefetch_noise(SEEDS, [(0, weight, True, False), (1, bias, False, False), (2, huge, False, True)])
    assert algorithm.noise_cache.misses == len(SEEDS)
    fresh = EggRoll(population=8)
    fresh.noise_cache = NoiseCache(max_bytes=0)
    assert torch.equal(algorithm.stacked_noise(SEEDS[:2], 2, huge), fresh.stacked_noise(SEEDS[:2], 2, huge))


def test_the_cache_returns_a_repeated_population_as_new_copies() -> None:
    cache = NoiseCache()
    drawn = torch.arange(6.0).view(3, 2)
    cache.put(["a", "b", "c"], (drawn,))
    assert cache.holds(["c", "a"]) and not cache.holds(["a", "d"])
    (again,) = cache.get_stacked(["a", "b", "c"], lambda missing: pytest.fail("drawn again"))
    assert torch.equal(again, drawn) and again.data_ptr() != drawn.data_ptr()
    again.zero_()  # the caller owns what it got
    (subset,) = cache.get_stacked(["c", "a"], lambda missing: pytest.fail("drawn again"))
    assert torch.equal(subset, drawn[[2, 0]])
    assert cache.hits == 5 and cache.misses == 3


def _window_of(step_seeds: list[list[int]]) -> Callable[[int], list[int]]:
    """A strategy's ``window``: the seeds of the aligned window's steps, in step order."""

    def window(steps: int) -> list[int]:
        assert steps == len(step_seeds)
        return [seed for seeds in step_seeds for seed in seeds]

    return window


@pytest.mark.parametrize("name", ["eggroll", "openes"])
def test_a_window_draws_the_later_steps_noise_with_this_ones_and_in_the_same_company(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_nobp.algorithms import evolution

    monkeypatch.setattr(evolution, "NOISE_WINDOW_STEPS", 4)
    step_seeds = [[100 * step + k for k in range(3)] for step in range(4)]
    params = _mlp_params()
    wanted = [(i, p, True, True) for i, p in enumerate(params)]
    first, later, alone = MAKERS[name](), MAKERS[name](), MAKERS[name]()
    for algorithm in (first, later, alone):
        _with_basis(algorithm, params[0])  # a projection: not bit-identical across companies
    first.prefetch_noise(step_seeds[0], wanted, _window_of(step_seeds))  # an uninterrupted run, at step 0
    misses = first.noise_cache.misses  # type: ignore[attr-defined]
    assert misses == 4 * 3 * len(params)  # all four steps drawn at once
    for seeds in step_seeds[1:]:
        first.prefetch_noise(seeds, wanted, _window_of(step_seeds))
    assert first.noise_cache.misses == misses  # type: ignore[attr-defined]  # the later steps found theirs
    later.prefetch_noise(step_seeds[2], wanted, _window_of(step_seeds))  # a run resumed at step 2
    alone.prefetch_noise(step_seeds[2], wanted)  # no window: this step's own company
    for index, param in enumerate(params):
        kept = first.stacked_noise(step_seeds[2], index, param)
        assert torch.equal(kept, later.stacked_noise(step_seeds[2], index, param))
        torch.testing.assert_close(kept, alone.stacked_noise(step_seeds[2], index, param))


def test_a_window_too_large_for_its_byte_budget_draws_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_nobp.algorithms import evolution

    monkeypatch.setattr(evolution, "NOISE_WINDOW_BYTES", 4 * 3 * 40)  # 3 seeds x 40 numbers: one step, not two
    algorithm = EggRoll(population=6)
    params = _mlp_params()  # 15 + 6 + 9 + 3 = 33 numbers per seed

    def window(steps: int) -> list[int]:
        raise AssertionError(f"a window of {steps} steps asked for")

    algorithm.prefetch_noise([1, 2, 3], [(i, p, True, True) for i, p in enumerate(params)], window)
    assert algorithm.noise_cache.misses == 3 * len(params)
    monkeypatch.setattr(evolution, "NOISE_WINDOW_BYTES", 4 * 3 * 70)  # two steps fit
    seeds = [[1, 2, 3], [4, 5, 6]]
    algorithm.prefetch_noise([4, 5, 6], [(i, p, True, True) for i, p in enumerate(params)], _window_of(seeds))
    assert algorithm.noise_cache.misses == 9 * len(params)
