"""EggRoll and OpenES on their own: low-rank noise, the update as one product, shaping, pairs and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_nobp.algorithms import Algorithm, EggRoll, OpenES
from lightning_nobp.algorithms.shaping import centered_ranks, shape_fitness


def dense_update(algorithm: Algorithm, population, coefficients, param: torch.Tensor) -> torch.Tensor:
    """The reference: materialise every member's E_i and sum c_i * sign_i * E_i."""
    total = torch.zeros(param.shape)
    for member, c in zip(population.members, coefficients.tolist()):
        total += c * member.sign * algorithm.noise(member.noise_seed, 0, param)
    return total


def merged(population, coefficients) -> dict[int, float]:
    weights: dict[int, float] = {}
    for member, c in zip(population.members, coefficients.tolist()):
        weights[member.noise_seed] = weights.get(member.noise_seed, 0.0) + c * member.sign
    return weights


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2), (7,)])
@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_update_equals_the_dense_reference(shape: tuple[int, ...], rank: int) -> None:
    algorithm = EggRoll(population=8, rank=rank, sigma=0.1, antithetic=False)
    param = torch.zeros(shape)
    population = algorithm.ask(5)
    fitness = torch.linspace(0, 1, 8).flip(0)
    coefficients = algorithm.tell(population, fitness).coefficients
    got = algorithm.combine(merged(population, coefficients), 0, param)
    torch.testing.assert_close(got, dense_update(algorithm, population, coefficients, param), rtol=1e-5, atol=1e-6)


def test_matrix_noise_has_the_requested_rank_and_unit_scale() -> None:
    algorithm = EggRoll(rank=2)
    noise = algorithm.noise(1, 0, torch.zeros(64, 48))
    assert torch.linalg.matrix_rank(noise) == 2
    samples = torch.stack([algorithm.noise(seed, 0, torch.zeros(32, 32)) for seed in range(200)])
    assert samples.var().item() == pytest.approx(1.0, rel=0.1)  # A B^T / sqrt(r): entries of unit variance


def test_antithetic_pairs_with_equal_fitness_give_a_zero_update() -> None:
    algorithm = EggRoll(population=8, rank=2, fitness_shaping=None)
    population = algorithm.ask(0)
    pair_losses = torch.tensor([3.0, 1.0, 2.0, 5.0])
    fitness = pair_losses.repeat_interleave(2)  # each pair: f+ == f-
    coefficients = algorithm.tell(population, fitness).coefficients
    update = algorithm.combine(merged(population, coefficients), 0, torch.zeros(5, 4))
    assert torch.allclose(update, torch.zeros(5, 4), atol=1e-6)


def test_pairs_share_noise_and_members_differ_between_pairs() -> None:
    population = EggRoll(population=6).ask(11)
    seeds = [m.noise_seed for m in population.members]
    assert seeds[0::2] == seeds[1::2] and len(set(seeds)) == 3
    assert [m.sign for m in population.members] == [1.0, -1.0] * 3
    assert len({m.noise_seed for m in EggRoll(population=6, antithetic=False).ask(11).members}) == 6


def test_centered_ranks_and_shapings() -> None:
    ranks = centered_ranks(torch.tensor([3.0, -1.0, 10.0, 0.0]))
    assert ranks.tolist() == pytest.approx([1 / 6, -0.5, 0.5, -1 / 6])
    signs = shape_fitness(torch.tensor([2.0, 1.0, 0.0, 4.0]), "sign")
    assert signs.tolist() == [0.5, -0.5, -0.5, 0.5]
    z = shape_fitness(torch.tensor([1.0, 2.0, 3.0]), "zscore")
    assert z.mean().abs() < 1e-6 and z.std(unbiased=False) == pytest.approx(1.0)


def test_es_estimate_points_along_the_gradient_of_a_quadratic() -> None:
    torch.manual_seed(0)
    target = torch.randn(16, 8)
    theta = torch.zeros(16, 8)
    algorithm = EggRoll(population=512, rank=1, sigma=0.05)
    population = algorithm.ask(3)
    fitness = torch.stack(
        [
            ((theta + algorithm.sigma * m.sign * algorithm.noise(m.noise_seed, 0, theta) - target) ** 2).sum()
            for m in population.members
        ]
    )
    estimate = algorithm.combine(merged(population, algorithm.tell(population, fitness).coefficients), 0, theta)
    cosine = torch.nn.functional.cosine_similarity(estimate.flatten(), (theta - target).flatten(), dim=0)
    assert cosine > 0.5, cosine


def test_a_nan_member_drops_its_pair_and_keeps_the_estimate_finite() -> None:
    algorithm = EggRoll(population=8)
    population = algorithm.ask(0)
    fitness = torch.tensor([1.0, 2.0, float("nan"), 0.5, 3.0, 1.0, 0.2, 0.1])
    estimate = algorithm.tell(population, fitness)
    assert estimate.dropped_members == 2
    assert estimate.coefficients is not None and torch.isfinite(estimate.coefficients).all()
    assert estimate.coefficients[2] == 0 and estimate.coefficients[3] == 0
    assert algorithm.tell(population, torch.full((8,), float("inf"))).skipped


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (EggRoll, {"population": 1}, "integer >= 2"),
        (EggRoll, {"population": 7}, "must be even"),
        (EggRoll, {"sigma": 0.0}, "sigma must be a positive"),
        (EggRoll, {"sigma": -1.0}, "sigma must be a positive"),
        (EggRoll, {"sigma": math.inf}, "sigma must be a positive"),
        (EggRoll, {"rank": 0}, "rank must be an integer"),
        (EggRoll, {"fitness_shaping": "softmax"}, "choose one of"),
        (EggRoll, {"fitness_shaping": "sign", "antithetic": False, "population": 3}, "antithetic=True"),
        (OpenES, {"population": 31}, "must be even"),
        (OpenES, {"sigma": 0}, "sigma must be a positive"),
    ],
)
def test_bad_arguments_are_refused_at_construction(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_openes_defaults_follow_qiu_et_al() -> None:
    algorithm = OpenES()
    assert (algorithm.population, algorithm.sigma, algorithm.antithetic) == (30, 1e-3, True)
    assert len(algorithm.ask(0)) == 30
    noise = algorithm.noise(1, 0, torch.zeros(20, 20))
    assert torch.linalg.matrix_rank(noise) == 20  # full rank


def test_asking_again_returns_the_same_population_until_a_setting_changes() -> None:
    import pickle

    algorithm = EggRoll(population=8, sigma=0.05)
    first = algorithm.ask(11)
    assert algorithm.ask(11) is first and algorithm.ask(12) is not first
    assert algorithm.ask(12).members != first.members
    algorithm.sigma = 0.1  # a schedule changed sigma: a new population at the new scale, the same seeds
    rescaled = algorithm.ask(11)
    assert rescaled.sigma == 0.1 and rescaled.members == first.members
    for step in range(100):  # the kept populations stay few
        algorithm.ask(step)
    assert len(algorithm.__dict__["_asked"]) <= 16
    restored = pickle.loads(pickle.dumps(algorithm))
    assert "_asked" not in restored.__dict__ and restored.ask(11).members == first.members


def test_tied_fitness_shares_its_mean_rank_on_both_shaping_routes() -> None:
    from lightning_nobp.algorithms.shaping import centered_ranks, shape_fitness_masked

    fitness = torch.tensor([1.0, 1.0, 2.0, 0.0])
    expected = torch.tensor([1.5, 1.5, 3.0, 0.0]) / 3 - 0.5
    assert torch.equal(centered_ranks(fitness), expected)
    assert torch.equal(shape_fitness_masked(fitness, torch.ones(4, dtype=torch.bool), "centered_rank"), expected)
    assert torch.equal(centered_ranks(torch.full((6,), 0.25)), torch.zeros(6))  # nothing to prefer: no step
    usable = torch.tensor([True, True, False, True])
    masked = shape_fitness_masked(fitness, usable, "centered_rank")
    assert torch.equal(masked, torch.tensor([0.25, 0.25, 0.0, -0.5]))  # ranks 1.5, 1.5, 0 of three usable
