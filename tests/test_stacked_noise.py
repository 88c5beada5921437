"""A population's noise drawn together (``stacked_noise``, ``stacked_low_rank_factors``) equals each member's noise
drawn alone, and the update built from the stacks equals the sum of the members' noise."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lightning_nobp.algorithms import EggRoll, MeZO, OpenES
from lightning_nobp.algorithms import base as algorithm_base
from lightning_nobp.algorithms.base import Algorithm
from lightning_nobp.algorithms.noise_cache import NoiseCache

MAKERS: dict[str, Callable[[], Algorithm]] = {
    "eggroll": lambda: EggRoll(population=8),
    "eggroll-rank3": lambda: EggRoll(population=8, rank=3),
    "openes": lambda: OpenES(population=8),
    "mezo": lambda: MeZO(directions=4),
    "mezo-rademacher": lambda: MeZO(directions=4, distribution="rademacher"),
}
SEEDS = [11, 5, 11 * 7919, 3, 2**40]


def _with_basis(algorithm: Algorithm, weight: torch.Tensor) -> None:
    directions = torch.linalg.qr(torch.randn(weight.shape[1], 3, generator=torch.Generator().manual_seed(1)))[0]
    algorithm.set_input_basis(weight, (directions, torch.tensor([1.5, 1.0, 0.5])))  # type: ignore[attr-defined]


@pytest.mark.parametrize("basis", [False, True], ids=["isotropic", "input-subspace"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_stacked_noise_equals_each_member_drawn_alone(name: str, basis: bool) -> None:
    together, alone = MAKERS[name](), MAKERS[name]()
    alone.noise_cache = NoiseCache(max_bytes=0)  # type: ignore[attr-defined]
    weight, bias = torch.zeros(6, 9), torch.zeros(6)
    if basis:
        _with_basis(together, weight)
        _with_basis(alone, weight)
    for index, param in enumerate((weight, bias)):
        stacked = together.stacked_noise(SEEDS, index, param)
        assert stacked.shape == (len(SEEDS), *param.shape)
        expected = torch.stack([alone.noise(seed, index, param) for seed in SEEDS])
        # the same random numbers; a basis projects a stack in one product (float32 rounding may differ)
        torch.testing.assert_close(stacked, expected, rtol=1e-6, atol=1e-6)
        if not basis or index == 1:
            assert torch.equal(stacked, expected)
    if basis:  # the noise of the weight's rows lies in the basis' span
        directions = together.input_bases[id(weight)][0]  # type: ignore[attr-defined]
        stacked = together.stacked_noise(SEEDS, 0, weight)
        torch.testing.assert_close(stacked @ directions @ directions.t(), stacked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 2])
def test_stacked_low_rank_factors_equal_the_members_factors(rank: int) -> None:
    together, alone = EggRoll(population=8, rank=rank), EggRoll(population=8, rank=rank)
    alone.noise_cache = NoiseCache(max_bytes=0)
    weight = torch.zeros(7, 4)
    a, b = together.stacked_low_rank_factors(SEEDS, 0, weight)  # type: ignore[misc]
    assert a.shape == (len(SEEDS), 7, rank) and b.shape == (len(SEEDS), 4, rank)
    for row, seed in enumerate(SEEDS):
        single_a, single_b = alone.low_rank_factors(seed, 0, weight)  # type: ignore[misc]
        assert torch.equal(a[row], single_a) and torch.equal(b[row], single_b)
    assert together.stacked_low_rank_factors(SEEDS, 1, torch.zeros(7)) is None


def test_absent_seeds_are_drawn_in_one_call_and_cached_ones_are_reused() -> None:
    algorithm = EggRoll(population=8)
    weight = torch.zeros(5, 3)
    algorithm.stacked_factors(SEEDS[:2], 0, weight)
    calls: list[list[int]] = []
    original = algorithm.noise_cache.get_stacked

    def counting(keys, draw_many):  # type: ignore[no-untyped-def]
        return original(keys, lambda missing: calls.append(list(missing)) or draw_many(missing))

    algorithm.noise_cache.get_stacked = counting  # type: ignore[method-assign]
    algorithm.stacked_factors(SEEDS, 0, weight)
    assert calls == [[2, 3, 4]]  # the three new seeds together; the first two came from the cache
    algorithm.stacked_factors(SEEDS, 0, weight)
    assert calls == [[2, 3, 4]]


def test_stacks_are_copies_the_caller_may_modify() -> None:
    algorithm = OpenES(population=8)
    bias = torch.zeros(4)
    first = algorithm.stacked_noise(SEEDS, 0, bias)
    expected = first.clone()
    first.mul_(0.0)
    assert torch.equal(algorithm.stacked_noise(SEEDS, 0, bias), expected)
    eggroll, weight = EggRoll(population=8), torch.zeros(3, 3)
    a, b = eggroll.stacked_factors(SEEDS, 0, weight)
    kept = a.clone(), b.clone()
    a.zero_()
    b.zero_()  # the cache keeps its own entries
    again = eggroll.stacked_factors(SEEDS, 0, weight)
    assert torch.equal(again[0], kept[0]) and torch.equal(again[1], kept[1])


@pytest.mark.parametrize("large", [False, True], ids=["stacked", "member-by-member"])
@pytest.mark.parametrize("name", ["openes", "mezo", "eggroll"])
def test_combine_equals_the_weighted_sum_of_the_noise(name: str, large: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if large:  # a weight too large to stack the population's noise: summed one member at a time
        monkeypatch.setattr(algorithm_base, "COMBINE_STACK_BYTES", 16)
    algorithm = MAKERS[name]()
    weights = {seed: float(i) - 1.5 for i, seed in enumerate(SEEDS)}
    weights[SEEDS[1]] = 0.0
    for index, param in enumerate((torch.zeros(6, 5), torch.zeros(6))):
        expected = sum(w * algorithm.noise(seed, index, param) for seed, w in weights.items())
        torch.testing.assert_close(algorithm.combine(weights, index, param), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(algorithm.combine({1: 0.0}, 1, torch.zeros(6)), torch.zeros(6))


@pytest.mark.parametrize("rank", [1, 3])
def test_input_subspace_projection_of_stacked_factors_follows_its_definition(rank: int) -> None:
    """``P diag(scales) P^T B_s`` for every member ``s`` at once (the members' columns side by side in one pair of
    products): equal to the projection written per member, member-major in memory."""
    algorithm = EggRoll(population=8, rank=rank)
    weight = torch.zeros(6, 20)
    generator = torch.Generator().manual_seed(3)
    directions = torch.linalg.qr(torch.randn(20, 5, generator=generator))[0]
    scales = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.25])
    algorithm.set_input_basis(weight, (directions, scales))
    columns = torch.randn(7, 20, rank, generator=generator)
    projected = algorithm._in_input_subspace(weight, columns)
    expected = torch.stack([directions @ torch.diag(scales) @ directions.t() @ member for member in columns])
    torch.testing.assert_close(projected, expected, rtol=1e-5, atol=1e-6)
    assert projected.shape == columns.shape and projected.is_contiguous()
    assert algorithm._in_input_subspace(torch.zeros(6, 20), columns) is columns  # no basis: unchanged
