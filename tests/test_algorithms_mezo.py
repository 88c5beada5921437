"""MeZO's ask/tell estimator on its own: seeds, signs, the estimate, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nobp.algorithms import MeZO, derive_seed


def dense_estimate(algorithm: MeZO, population, coefficients, param: torch.Tensor, index: int = 0) -> torch.Tensor:
    total = torch.zeros_like(param, dtype=torch.float32)
    for member, c in zip(population.members, coefficients.tolist()):
        total += c * member.sign * algorithm.noise(member.noise_seed, index, param)
    return total


def test_derive_seed_is_a_deterministic_function_of_counters() -> None:
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    seeds = {derive_seed(0, step, micro) for step in range(50) for micro in range(4)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 2) != derive_seed(2, 1)
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(-1)


def test_ask_gives_antithetic_pairs_per_direction() -> None:
    algorithm = MeZO(eps=1e-2, directions=3)
    population = algorithm.ask(step_seed=7)
    assert len(population) == 6
    assert population.sigma == 1e-2
    for plus, minus in zip(population.members[0::2], population.members[1::2]):
        assert plus.noise_seed == minus.noise_seed and (plus.sign, minus.sign) == (1.0, -1.0)
    assert len({m.noise_seed for m in population.members}) == 3
    assert algorithm.ask(7) == population and algorithm.ask(8) != population


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_noise_is_regenerated_identically_and_differs_per_parameter(distribution: str) -> None:
    algorithm = MeZO(distribution=distribution)
    param = torch.zeros(5, 7)
    z1 = algorithm.noise(123, 0, param)
    assert torch.equal(z1, algorithm.noise(123, 0, param))
    assert not torch.equal(z1, algorithm.noise(123, 1, param))
    assert z1.dtype == torch.float32 and z1.shape == param.shape
    if distribution == "rademacher":
        assert set(z1.unique().tolist()) <= {-1.0, 1.0}


def test_estimate_is_exact_for_a_linear_loss() -> None:
    """For L(theta) = a . theta, (L+ - L-) / 2eps = a . z exactly, so the estimate is (a . z) z."""
    torch.manual_seed(0)
    a = torch.randn(4, 3, dtype=torch.float64)
    theta = torch.randn(4, 3, dtype=torch.float64)
    algorithm = MeZO(eps=1e-3, directions=2)
    population = algorithm.ask(11)
    fitness = torch.stack(
        [
            (a * (theta + population.sigma * m.sign * algorithm.noise(m.noise_seed, 0, theta).double())).sum()
            for m in population.members
        ]
    )
    estimate = algorithm.tell(population, fitness)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for seed in {m.noise_seed for m in population.members}:
        z = algorithm.noise(seed, 0, theta).double()
        expected += (a * z).sum() * z / 2
    got = dense_estimate(algorithm, population, estimate.coefficients, theta).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert estimate.stats["projected_grad"] > 0


def test_estimate_is_unbiased_on_a_quadratic() -> None:
    torch.manual_seed(0)
    target = torch.randn(32)
    theta = torch.zeros(32)
    true_gradient = 2 * (theta - target)
    algorithm = MeZO(eps=1e-3)
    mean = torch.zeros(32)
    trials = 4000
    for step in range(trials):
        population = algorithm.ask(step)
        fitness = torch.stack(
            [
                ((theta + population.sigma * m.sign * algorithm.noise(m.noise_seed, 0, theta) - target) ** 2).sum()
                for m in population.members
            ]
        )
        mean += dense_estimate(algorithm, population, algorithm.tell(population, fitness).coefficients, theta)
    mean /= trials
    cosine = torch.nn.functional.cosine_similarity(mean, true_gradient, dim=0)
    assert cosine > 0.95, cosine


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_fitness_skips_the_step(bad: float) -> None:
    algorithm = MeZO()
    population = algorithm.ask(0)
    estimate = algorithm.tell(population, torch.tensor([1.0, bad]))
    assert estimate.skipped and estimate.coefficients is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 0.0}, "eps must be a positive"),
        ({"eps": -1e-3}, "eps must be a positive"),
        ({"eps": math.nan}, "eps must be a positive"),
        ({"directions": 0}, "directions must be an integer >= 1"),
        ({"distribution": "uniform"}, "choose one of"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MeZO(**kwargs)
