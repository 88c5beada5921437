"""Stochastic rounding of float32 values to a lower-precision float dtype (pure-PyTorch reference).

Rounding to nearest loses every update smaller than half a grid step: a bf16 weight of 0.1 has a step of 2^-10,
so an update of 1e-4 would vanish. Stochastic rounding picks the upper neighbour with probability equal to the
distance from the lower one, so the stored value is right on average and small updates accumulate. The random
numbers come from a seeded generator (counter-derived seed), so every process rounds identically and a resumed
run rounds as an uninterrupted one. A fused Triton twin arrives with the low-bit storage formats.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stochastic_round(values: Tensor, dtype: torch.dtype, seed: int) -> Tensor:
    """Round float32 ``values`` to ``dtype`` stochastically (unbiased), reproducibly from ``seed``.

    Args:
        values: finite float32 values.
        dtype: the target floating dtype (``torch.bfloat16``, ``torch.float16``; float32/64 return ``values``
            cast exactly).
        seed: seed of the rounding decisions (use a counter-derived seed, see ``derive_seed``).

    Returns:
        A tensor of ``dtype`` whose expectation over seeds equals ``values`` (up to clamping at the dtype's
        largest finite value).
    """
    if dtype in (torch.float32, torch.float64) or not values.dtype.is_floating_point:
        return values.to(dtype)
    limit = torch.finfo(dtype).max
    values = values.float().clamp(-limit, limit)  # clamp before every cast: overflow must never become inf/NaN
    nearest = values.to(dtype)
    nearest_up = nearest.float() > values
    toward_minus = torch.full_like(nearest, -float("inf"))
    toward_plus = torch.full_like(nearest, float("inf"))
    lower = torch.where(nearest_up, torch.nextafter(nearest, toward_minus), nearest)
    upper = torch.nextafter(lower, toward_plus).clamp(-limit, limit)
    lower_f, upper_f = lower.float(), upper.float()
    gap = upper_f - lower_f
    fraction = torch.where(gap > 0, (values - lower_f) / gap, torch.zeros_like(values))
    generator = torch.Generator(device=values.device)
    generator.manual_seed(seed)
    draw = torch.rand(values.shape, generator=generator, device=values.device, dtype=torch.float32)
    return torch.where(draw < fraction, upper, lower)
