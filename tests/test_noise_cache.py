"""``NoiseCache``: exact reuse of each member's noise within a step, bounded size, nothing shared by mutation."""

from __future__ import annotations

import pickle

import pytest
import torch

from lightning_nobp.algorithms import EggRoll, MeZO, OpenES
from lightning_nobp.algorithms.noise_cache import NoiseCache


@pytest.mark.parametrize("make", [lambda: EggRoll(population=8), lambda: OpenES(population=8), MeZO])
def test_cached_noise_equals_a_fresh_draw(make) -> None:
    cached, fresh = make(), make()
    fresh.noise_cache = NoiseCache(max_bytes=0)
    param = torch.zeros(12, 7)
    for seed in (3, 3, 11, 3):
        for index, p in enumerate((param, param[0])):
            torch.testing.assert_close(cached.noise(seed, index, p), fresh.noise(seed, index, p), rtol=0, atol=0)
    assert cached.noise_cache.hits > 0 and fresh.noise_cache.hits == 0


def test_an_eggroll_step_draws_each_pair_once() -> None:
    algorithm = EggRoll(population=8)
    weight = torch.zeros(5, 4)
    population = algorithm.ask(0)
    for member in population.members:  # the forward: +E and -E of every pair
        algorithm.low_rank_factors(member.noise_seed, 0, weight)
    coefficients = algorithm.tell(population, torch.arange(8.0)).coefficients
    weights = {m.noise_seed: 0.0 for m in population.members}
    for member, c in zip(population.members, coefficients.tolist()):
        weights[member.noise_seed] += c * member.sign
    algorithm.combine(weights, 0, weight)  # the update
    assert algorithm.noise_cache.misses == 4  # one draw per pair


def test_returned_noise_can_be_modified_without_corrupting_the_cache() -> None:
    algorithm = MeZO()
    param = torch.zeros(6)
    first = algorithm.noise(1, 0, param)
    expected = first.clone()
    first.mul_(0.0)
    torch.testing.assert_close(algorithm.noise(1, 0, param), expected)


def test_the_cache_stays_within_its_bytes_and_evicts_the_oldest() -> None:
    cache = NoiseCache(max_bytes=3 * 40)  # three tensors of ten float32
    for key in range(5):
        cache.get(key, lambda: (torch.zeros(10),))
    assert cache.bytes == 120
    cache.get(4, lambda: pytest.fail("key 4 was evicted"))
    drawn = []
    cache.get(0, lambda: drawn.append(0) or (torch.zeros(10),))
    assert drawn == [0]  # the oldest entries went first
    cache.get(1, lambda: (torch.zeros(100),))  # larger than the whole cache: returned, not kept
    assert cache.bytes <= 120


def test_rows_of_one_stack_are_read_as_copies_in_the_keys_order() -> None:
    cache = NoiseCache()
    stack = torch.arange(24.0).view(6, 4)
    cache.put(["a", "b", "c", "d", "e", "f"], (stack,))
    never = lambda missing: pytest.fail(f"drew {missing}")  # noqa: E731
    assert cache.holds(["b", "c", "d"]) and cache.holds(["e", "a"]) and not cache.holds(["f", "g"])
    (middle,) = cache.get_stacked(["b", "c", "d"], never)  # consecutive rows: one slice
    torch.testing.assert_close(middle, stack[1:4], rtol=0, atol=0)
    (scattered,) = cache.get_stacked(["e", "a", "c"], never)  # any other order: a gather
    torch.testing.assert_close(scattered, stack[[4, 0, 2]], rtol=0, atol=0)
    (tail,) = cache.get_stacked(["e", "f"], never)
    middle.zero_(), scattered.zero_(), tail.zero_()  # copies: the stack is untouched
    torch.testing.assert_close(stack, torch.arange(24.0).view(6, 4), rtol=0, atol=0)
    (past_the_end,) = cache.get_stacked(["f", "g"], lambda missing: (torch.full((len(missing), 4), -1.0),))
    torch.testing.assert_close(past_the_end, torch.stack([stack[5], torch.full((4,), -1.0)]), rtol=0, atol=0)
    assert cache.hits == 9 and cache.misses == 7


def test_pickling_drops_the_tensors() -> None:
    algorithm = EggRoll(population=4)
    algorithm.noise(1, 0, torch.zeros(3, 3))
    assert algorithm.noise_cache.bytes > 0
    restored = pickle.loads(pickle.dumps(algorithm))
    assert restored.noise_cache.bytes == 0 and restored.noise_cache.max_bytes == algorithm.noise_cache.max_bytes


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        NoiseCache(max_bytes=-1)


def test_sample_direction_depends_on_the_seed_alone_with_its_reused_generator() -> None:
    """The per-device generator is re-seeded for every draw: interleaved draws equal fresh-generator draws."""
    from lightning_nobp.algorithms import sample_direction

    def fresh(seed: int, shape: tuple[int, ...], distribution: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        if distribution == "gaussian":
            return torch.randn(shape, generator=generator)
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).float() * 2 - 1

    draws = [(11, (5,), "gaussian"), (12, (3, 4), "rademacher"), (11, (5,), "gaussian"), (13, (7,), "gaussian")]
    for seed, shape, distribution in draws:
        got = sample_direction(seed, torch.Size(shape), torch.device("cpu"), distribution)
        torch.testing.assert_close(got, fresh(seed, shape, distribution), rtol=0, atol=0)
