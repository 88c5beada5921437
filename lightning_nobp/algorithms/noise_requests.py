"""Draw the counter-based noise of several parameters in one computation.

A population's noise is drawn per parameter with one vectorized counter-based computation
(``lightning_nobp.algorithms.counter_noise``), whose cost is nearly fixed (some forty tensor operations) for
small parameters: a small model's step paid it once per parameter (four times for an MLP with two layers, a
noticeable part of a digits step). Here the parameters' streams are hashed together: the stream keys of every
(parameter, seed) pair come from one computation, and parameters of similar length share one draw of the longest
length. Element ``k`` of a stream depends on its key and ``k`` alone, so the first ``n`` numbers of a longer draw
are exactly an ``n``-number draw: the noise is the same as drawing each parameter on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nobp.algorithms.counter_noise import (
    COUNTER_DRAW_MAX_NUMEL,
    counter_directions,
    derive_seed_grid,
    sample_directions,
)
from lightning_nobp.algorithms.noise_cache import NoiseCache
from lightning_nobp.algorithms.seeds import derive_seed

#: parameters share one draw while it holds at most this many times the numbers they need
SHARED_DRAW_WASTE = 2.0


@dataclass
class NoiseRequest:
    """The noise one parameter needs for a population's seeds, as a slice of counter-based streams.

    Args:
        keys: the noise cache's key of every seed's entry, in seed order.
        counter: the parameter's stream counter (``derive_seed(seed, counter)`` keys each seed's stream).
        numbers: Gaussian numbers taken from the start of every seed's stream.
        finish: turns the ``(S, numbers)`` draw into the cached tensors (reshaped, projected), each with the seeds
            along its first dimension.
        device: where the numbers are drawn.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        source: ``"counter"`` or ``"generator"`` (``sample_directions``); only counter-based Gaussian requests are
            drawn together (:func:`draw_requests`).
    """

    keys: list[Hashable]
    counter: int
    numbers: int
    finish: Callable[[Tensor], tuple[Tensor, ...]]
    device: torch.device
    distribution: str = "gaussian"
    source: str = "counter"

    def draw(self, seeds: Sequence[int]) -> tuple[Tensor, ...]:
        """This parameter's tensors for ``seeds`` alone (a cache miss outside a shared draw)."""
        if self.source == "counter":
            streams: Tensor | list[int] = derive_seed_grid(seeds, [self.counter], self.device)[0]
        else:
            streams = [derive_seed(seed, self.counter) for seed in seeds]
        return self.finish(sample_directions(streams, (self.numbers,), self.device, self.distribution, self.source))

    @property
    def shareable(self) -> bool:
        """Whether :func:`draw_requests` can draw it together with others (counter-based, Gaussian, short)."""
        return self.source == "counter" and self.distribution == "gaussian" and self.numbers <= COUNTER_DRAW_MAX_NUMEL


def _shared_draws(requests: list[NoiseRequest]) -> list[list[NoiseRequest]]:
    """Requests grouped so that each group's longest request asks for at most ``SHARED_DRAW_WASTE`` times the
    numbers of the whole group (longest first)."""
    groups: list[list[NoiseRequest]] = []
    for request in sorted(requests, key=lambda r: r.numbers, reverse=True):
        if groups:
            group = groups[-1]
            longest = group[0].numbers
            if longest * (len(group) + 1) <= SHARED_DRAW_WASTE * (sum(r.numbers for r in group) + request.numbers):
                group.append(request)
                continue
        groups.append([request])
    return groups


def draw_requests(seeds: Sequence[int], requests: Sequence[NoiseRequest], cache: NoiseCache) -> None:
    """Draw and cache every request's noise for ``seeds``, sharing the counter-based computations.

    Requests whose entries are all cached already are skipped; those that are not :attr:`NoiseRequest.shareable`
    (longer than ``COUNTER_DRAW_MAX_NUMEL``, drawn from a generator, see ``sample_directions``) are left to the
    caller's own path.

    Args:
        seeds: the members' noise seeds.
        requests: one per parameter, each with one key per seed.
        cache: where the results are kept (under each request's keys).
    """
    pending = [r for r in requests if r.shareable and not cache.holds(r.keys)]
    for device in dict.fromkeys(r.device for r in pending):
        on_device = [r for r in pending if r.device == device]
        keys = derive_seed_grid(seeds, [r.counter for r in on_device], device)  # (requests, S)
        row_of = {id(r): row for row, r in enumerate(on_device)}
        for group in _shared_draws(on_device):
            rows = torch.tensor([row_of[id(r)] for r in group], device=device)
            drawn = counter_directions(keys.index_select(0, rows).view(-1), (group[0].numbers,))
            drawn = drawn.view(len(group), len(seeds), -1)
            for request, numbers in zip(group, drawn):
                cache.put(request.keys, request.finish(numbers[:, : request.numbers].contiguous()))


__all__ = ["NoiseRequest", "draw_requests"]
