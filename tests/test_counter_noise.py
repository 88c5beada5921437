"""Counter-based noise: exact against its pure-Python twin, each stream a function of its own seed, Gaussian."""

from __future__ import annotations

import pytest
import torch

from lightning_nobp.algorithms import derive_seed, sample_direction
from lightning_nobp.algorithms.counter_noise import (
    COUNTER_DRAW_MAX_NUMEL,
    counter_directions,
    derive_seeds,
    reference_directions,
    sample_directions,
)

SEEDS = [0, 1, 2, 12345, 2**40 + 7, 2**62 + 3, 2**63 - 1]


@pytest.mark.parametrize("counter", [0, 3, 2**31 + 5, 2**63 - 2])
def test_derive_seeds_matches_derive_seed(counter: int) -> None:
    assert derive_seeds(SEEDS, counter).tolist() == [derive_seed(seed, counter) for seed in SEEDS]


@pytest.mark.parametrize("prefix", [(0,), (7, 2**63 - 1), (2**62 + 5, 3, 11)])
def test_derive_seed_range_matches_derive_seed(prefix: tuple[int, ...]) -> None:
    from lightning_nobp.algorithms.seeds import derive_seed_range

    assert derive_seed_range(*prefix, count=40) == [derive_seed(*prefix, i) for i in range(40)]
    assert derive_seed_range(*prefix, count=0) == []
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed_range(*prefix, -1, count=3)


def test_negative_seeds_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        derive_seeds([1, -2], 0)


@pytest.mark.parametrize("numel", [1, 2, 7, 64])
def test_gaussian_streams_match_the_python_twin(numel: int) -> None:
    keys = derive_seeds(SEEDS, 1)
    got = counter_directions(keys, (numel,))
    expected = torch.tensor([reference_directions(seed, numel) for seed in keys.tolist()], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_rademacher_streams_match_the_python_twin() -> None:
    keys = derive_seeds(SEEDS, 2)
    got = counter_directions(keys, (3, 5), "rademacher")
    expected = torch.tensor([reference_directions(seed, 15, "rademacher") for seed in keys.tolist()])
    assert torch.equal(got, expected.view(-1, 3, 5))


@pytest.mark.parametrize("source", ["counter", "generator"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_a_draw_depends_on_its_own_seed_alone(distribution: str, source: str) -> None:
    together = sample_directions([5, 9, 5, 11], (4, 3), "cpu", distribution, source)
    assert torch.equal(together[0], together[2])
    assert not torch.equal(together[0], together[1])
    for row, seed in enumerate([5, 9, 5, 11]):
        assert torch.equal(sample_directions([seed], (4, 3), "cpu", distribution, source)[0], together[row])
    assert torch.equal(sample_directions([11, 5], (4, 3), "cpu", distribution, source), together[[3, 0]])
    if source == "generator":
        assert torch.equal(sample_direction(9, (4, 3), "cpu", distribution), together[1])


def test_gaussian_moments_tails_and_independence() -> None:
    draws = sample_directions(list(range(1000, 1016)), (65536,), "cpu", source="counter").double()
    values = draws.flatten()
    n = values.numel()  # about a million
    assert abs(values.mean().item()) < 5 / n**0.5
    assert abs(values.std().item() - 1.0) < 5 * (0.5 / n) ** 0.5
    kurtosis = (values**4).mean().item()
    assert abs(kurtosis - 3.0) < 0.05
    beyond_three = (values.abs() > 3).double().mean().item()
    assert abs(beyond_three - 0.0027) < 0.0005
    lag_one = (draws[:, 1:] * draws[:, :-1]).mean().item()  # the cos/sin halves of one hash, and neighbours
    assert abs(lag_one) < 5 / n**0.5
    across_seeds = (draws[1:] * draws[:-1]).mean().item()  # consecutive seeds
    assert abs(across_seeds) < 5 / n**0.5


def test_rademacher_signs_are_balanced() -> None:
    signs = sample_directions(list(range(8)), (50000,), "cpu", "rademacher", "counter")
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 5 / signs.numel() ** 0.5


def test_large_counter_draws_come_from_the_reseeded_generator() -> None:
    numel = COUNTER_DRAW_MAX_NUMEL + 1
    first = sample_directions([7, 8], (numel,), "cpu", source="counter")
    assert torch.equal(sample_direction(8, (numel,), "cpu"), first[1])
    expected = torch.randn(numel, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first[0], expected)


def test_unknown_distribution_or_source_is_refused() -> None:
    with pytest.raises(ValueError, match="gaussian"):
        sample_directions([1], (3,), "cpu", "uniform", "counter")
    with pytest.raises(ValueError, match="gaussian"):
        sample_direction(1, (3,), "cpu", "uniform")
    with pytest.raises(ValueError, match="'counter'"):
        sample_directions([1], (3,), "cpu", source="philox")


def test_populations_draw_counter_noise_and_single_direction_methods_a_generator() -> None:
    from lightning_nobp.algorithms import EggRoll, ForwardGradient, MeZO, OpenES

    bias = torch.zeros(6)
    seed = 1234
    counter = sample_directions(derive_seeds([seed], 0), (6,), "cpu", source="counter")[0]
    generator = sample_direction(derive_seed(seed, 0), (6,), "cpu")
    for algorithm in (EggRoll(population=4), OpenES(population=4)):
        assert torch.equal(algorithm.noise(seed, 0, bias), counter)
    for algorithm in (MeZO(), ForwardGradient()):
        assert torch.equal(algorithm.noise(seed, 0, bias), generator)


def test_numpy_integers_on_cpu_equal_the_torch_path(monkeypatch) -> None:
    """The CPU computes the streams' integer bits in numpy, other devices in torch's int64: the same streams either
    way (the keys come from numpy on every device)."""
    from lightning_nobp.algorithms import counter_noise

    seeds = [*range(1000, 1040), 2**63 - 1, 12345678901234567]
    counters = [0, 1, 7, 2**40, 2**63 - 1]

    def draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = counter_noise.derive_seed_grid(seeds, counters)
        keys = grid.view(-1)
        return grid, counter_directions(keys, (3, 65)), counter_directions(keys, (130,), "rademacher")

    with_numpy = draws()
    monkeypatch.setattr(counter_noise, "NUMPY_INTEGERS_ON_CPU", False)
    with_torch = draws()
    for numpy_side, torch_side in zip(with_numpy, with_torch):
        assert numpy_side.dtype == torch_side.dtype and torch.equal(numpy_side, torch_side)
