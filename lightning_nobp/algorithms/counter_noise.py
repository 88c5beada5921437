"""Counter-based noise: every number a member's perturbation uses is a hash of (stream seed, position).

A population of small weights needs many short streams per step (a 256-member EggRoll on a 64-128-10 MLP draws
128 seeds x 4 parameters). Re-seeding a ``torch.Generator`` for each costs more on the CPU than the
numbers themselves; here all streams of a parameter come from one vectorized computation instead: element ``k`` of
stream ``s`` is the ``k``-th output of SplitMix64 started at ``s`` (the generator ``derive_seed`` is built on),
turned into a standard normal by the Box-Muller transform, or into a random sign. Only integer arithmetic decides
the bits, so a stream is the same on every device and process and does not depend on which other streams are drawn
with it.

On the CPU the integer part runs in numpy (``uint64`` wraps and shifts logically, at a fraction of torch's cost per
operation on small arrays), elsewhere in torch's ``int64``; the bits are the same, and the floating-point part is
torch's on every device. Counter-based drawing has a fixed cost per call however few streams it draws,
so it pays for populations, not for one or a few directions a step: evolution strategies (``EggRoll``,
``OpenES``) draw their noise here, ``MeZO`` and ``ForwardGradient`` from a re-seeded ``torch.Generator``
(``source="generator"``). Each algorithm keeps to one source, so a seed always gives the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# on the CPU the integer arithmetic runs in numpy, at a fraction of the per-operation cost of torch's int64 (the bits
# are identical)
from lightning_nobp.algorithms.seeds import _NP_GOLDEN_GAMMA, _np_mix_

_MASK64 = (1 << 64) - 1

#: the largest draw (numbers per seed) made counter-based; larger draws use a re-seeded ``torch.Generator``
COUNTER_DRAW_MAX_NUMEL = 1 << 16


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that holds it (torch has no unsigned 64-bit arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_START = 0x243F6A8885A308D3  # derive_seed's starting state


#: compute the streams' integer bits in numpy for CPU keys (tests switch it off to check the torch path, CUDA's, on
#: the CPU); the keys themselves (:func:`derive_seed_grid`) always come from numpy
NUMPY_INTEGERS_ON_CPU = True


def _numpy_integers(device: torch.device | str) -> bool:
    return NUMPY_INTEGERS_ON_CPU and torch.device(device).type == "cpu"


def _shifted(z: Tensor, bits: int) -> Tensor:
    """``z >> bits`` as an unsigned (logical) shift of the 64-bit pattern (torch shifts int64 arithmetically)."""
    return torch.bitwise_right_shift(z, bits).bitwise_and_((1 << (64 - bits)) - 1)


def _mix_(z: Tensor) -> Tensor:
    """SplitMix64's output function applied in place to int64 states (wrapping arithmetic)."""
    z.bitwise_xor_(_shifted(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shifted(z, 27)).mul_(_MIX2)
    return z.bitwise_xor_(_shifted(z, 31))


def derive_seeds(seeds: Sequence[int], counter: int, device: torch.device | str = "cpu") -> Tensor:
    """``derive_seed(seed, counter)`` for every seed, as an int64 tensor (one vectorized computation).

    Args:
        seeds: non-negative integers below ``2**63`` (member noise seeds).
        counter: the counter appended to each seed (a parameter index).
        device: where to compute.
    """
    return derive_seed_grid(seeds, [counter], device)[0]


def derive_seed_grid(seeds: Sequence[int], counters: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """``derive_seed(seed, counter)`` for every counter and seed, as an int64 tensor ``(counters, seeds)``.

    Args:
        seeds: non-negative integers below ``2**63`` (member noise seeds).
        counters: the counters appended to each seed (parameter indices).
        device: where the grid goes. It is computed on the host in numpy either way: the seeds are host
            integers, and the grid is small (a copy, where torch would launch some twenty kernels).
    """
    if len(seeds) and min(seeds) < 0:
        raise ValueError(f"seed counters must be non-negative integers, got {min(seeds)}")
    state = np.array([seed ^ _START for seed in seeds], dtype=np.uint64)
    state += _NP_GOLDEN_GAMMA
    mixed = _np_mix_(state)
    appended = np.array([counter & _MASK64 for counter in counters], dtype=np.uint64)
    grid = mixed.reshape(1, -1) ^ appended.reshape(-1, 1)
    grid += _NP_GOLDEN_GAMMA
    grid = _np_mix_(grid) >> np.uint64(1)
    return torch.from_numpy(grid.view(np.int64)).to(device)


def _hashes(keys: Tensor, count: int) -> Tensor:
    """``(S, count)`` int64: the first ``count`` SplitMix64 outputs of every key."""
    if _numpy_integers(keys.device):
        return torch.from_numpy(_np_hashes(keys, count).view(np.int64))
    steps = torch.arange(1, count + 1, dtype=torch.int64, device=keys.device).mul_(_GOLDEN_GAMMA)
    return _mix_(keys.view(-1, 1) + steps)


def _np_hashes(keys: Tensor, count: int) -> np.ndarray:
    """:func:`_hashes` computed in numpy: ``(S, count)`` ``uint64``."""
    steps = np.arange(1, count + 1, dtype=np.uint64)
    steps *= _NP_GOLDEN_GAMMA
    z = keys.contiguous().numpy().view(np.uint64).reshape(-1, 1) + steps
    return _np_mix_(z)


def _np_unit_interval(bits: np.ndarray, shift: int) -> Tensor:
    """:func:`_unit_interval` of numpy ``uint64`` bits (exact: 24-bit integers and a power-of-two scale)."""
    window = (bits >> np.uint64(shift)) & np.uint64((1 << 24) - 1)
    return torch.from_numpy(window.astype(np.float32)).mul_(2.0**-24)


def _unit_interval(bits: Tensor, shift: int) -> Tensor:
    """24 bits of ``bits`` starting at bit ``shift`` as float32 in ``[0, 1)``."""
    return _shifted(bits, shift).bitwise_and_((1 << 24) - 1).to(torch.float32).mul_(2.0**-24)


def counter_directions(keys: Tensor, shape: torch.Size | Sequence[int], distribution: str = "gaussian") -> Tensor:
    """One float32 draw shaped ``shape`` per stream key, stacked ``(S, *shape)``.

    Args:
        keys: ``(S,)`` int64 stream seeds (``derive_seeds``); each row depends on its own key alone.
        shape: the shape of one draw.
        distribution: ``"gaussian"`` (standard normal) or ``"rademacher"`` (+-1 with equal odds).
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    if distribution == "rademacher":
        signs = _hashes(keys, numel).lt_(0).to(torch.float32).mul_(-2.0).add_(1.0)
        return signs.view(len(keys), *shape)
    if distribution != "gaussian":
        raise ValueError(f"unknown distribution {distribution!r}: use 'gaussian' or 'rademacher'")
    if _numpy_integers(keys.device):
        np_bits = _np_hashes(keys, (numel + 1) // 2)
        radius_u, angle_u = _np_unit_interval(np_bits, 40), _np_unit_interval(np_bits, 16)
    else:
        bits = _hashes(keys, (numel + 1) // 2)
        radius_u, angle_u = _unit_interval(bits, 40), _unit_interval(bits, 16)
    radius = radius_u.add_(2.0**-25).log_().mul_(-2.0).sqrt_()  # u + 2^-25 in (0, 1): a finite log
    angle = angle_u.mul_(2.0 * math.pi)
    normals = torch.stack((radius * angle.cos(), radius.mul_(angle.sin_())), dim=-1)
    return normals.view(len(keys), -1)[:, :numel].reshape(len(keys), *shape)


def sample_directions(
    seeds: Sequence[int] | Tensor,
    shape: torch.Size | Sequence[int],
    device: torch.device | str,
    distribution: str = "gaussian",
    source: str = "generator",
) -> Tensor:
    """Float32 draws, one per seed, stacked ``(S, *shape)``: standard normal or Rademacher (+-1).

    Args:
        seeds: stream seeds (``derive_seed``; or an int64 tensor of them, ``derive_seeds``).
        shape: shape of one draw.
        device: where to draw.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        source: ``"generator"``: a ``torch.Generator`` re-seeded per seed (cheap for a few seeds);
            ``"counter"``: :func:`counter_directions`, one vectorized computation for all seeds (cheap for many),
            except draws of more than ``COUNTER_DRAW_MAX_NUMEL`` numbers, which come from the generator (faster per
            number at that size). Either way a draw depends on its seed, shape, source and device type alone.
    """
    shape = torch.Size(shape)
    if source not in ("generator", "counter"):
        raise ValueError(f"unknown noise source {source!r}: use 'generator' or 'counter'")
    if source == "counter" and shape.numel() <= COUNTER_DRAW_MAX_NUMEL:
        if isinstance(seeds, Tensor):
            keys = seeds.to(device)
        else:
            keys = torch.tensor([_signed(seed) for seed in seeds], dtype=torch.int64, device=device)
        return counter_directions(keys, shape, distribution)
    integers = [seed & _MASK64 for seed in seeds.tolist()] if isinstance(seeds, Tensor) else list(seeds)
    device = torch.device(device)
    draws = [sample_direction(seed, shape, device, distribution) for seed in integers]
    return draws[0].unsqueeze(0) if len(draws) == 1 else torch.stack(draws)


_GENERATORS: dict[torch.device, torch.Generator] = {}


def sample_direction(
    seed: int, shape: torch.Size | Sequence[int], device: torch.device | str, distribution: str = "gaussian"
) -> Tensor:
    """One float32 draw from the device's reusable ``torch.Generator``, re-seeded with ``seed``: standard normal or
    Rademacher (+-1); the draw depends on the seed alone.

    Args:
        seed: the generator seed (see ``derive_seed``).
        shape: shape of the draw.
        device: where to draw; the same seed gives the same values on the same device type.
        distribution: ``"gaussian"`` or ``"rademacher"``.
    """
    device = torch.device(device)
    generator = _GENERATORS.get(device)
    if generator is None:
        generator = _GENERATORS[device] = torch.Generator(device=device)
    generator.manual_seed(seed)  # resets the whole state: the draw depends on the seed alone
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if distribution == "rademacher":
        bits = torch.randint(0, 2, shape, generator=generator, device=device, dtype=torch.int8)
        return bits.to(torch.float32).mul_(2.0).sub_(1.0)
    raise ValueError(f"unknown distribution {distribution!r}: use 'gaussian' or 'rademacher'")


def reference_directions(seed: int, numel: int, distribution: str = "gaussian") -> list[float]:
    """Pure-Python twin of one stream of :func:`counter_directions` (the tests' reference; slow).

    Args:
        seed: the stream seed.
        numel: how many numbers.
        distribution: ``"gaussian"`` or ``"rademacher"``.
    """

    def output(k: int) -> int:
        z = (seed + k * 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    if distribution == "rademacher":
        return [-1.0 if output(k + 1) >> 63 else 1.0 for k in range(numel)]
    values: list[float] = []
    for k in range((numel + 1) // 2):
        bits = output(k + 1)
        radius = math.sqrt(-2.0 * math.log(((bits >> 40) & 0xFFFFFF) * 2.0**-24 + 2.0**-25))
        angle = ((bits >> 16) & 0xFFFFFF) * 2.0**-24 * 2.0 * math.pi
        values += [radius * math.cos(angle), radius * math.sin(angle)]
    return values[:numel]


__all__ = [
    "COUNTER_DRAW_MAX_NUMEL",
    "counter_directions",
    "derive_seed_grid",
    "derive_seeds",
    "reference_directions",
    "sample_direction",
    "sample_directions",
]
