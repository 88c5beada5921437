"""The number grids of the low-bit formats in PyTorch: power-of-two scales, stochastic rounding, e2m1 codes.

These are the reference twins of the Triton helpers in ``lowbit_update.py``; every operation is exact in float32
(scales are powers of two built from exponent bits, never from a division), so the twins agree bit for bit given
the same random numbers.

Kinds: ``"fp8_e4m3"`` (row scale, grid of float8 e4m3, |x| <= 448), ``"int8"`` (row scale, integers in
[-127, 127]), ``"nvfp4"`` / ``"mxfp4"`` (block scale, grid of e2m1: 0, 0.5, 1, 1.5, 2, 3, 4, 6).
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_KINDS = ("fp8_e4m3", "int8")
BLOCK_KINDS = ("nvfp4", "mxfp4")
BLOCK_SIZES = {"nvfp4": 16, "mxfp4": 32}
GRID_MAX = {"fp8_e4m3": 448.0, "int8": 127.0, "nvfp4": 6.0, "mxfp4": 6.0}
# largest value of the grid as mantissa threshold and exponent: GRID_MAX = (1 + threshold / 2^23) * 2^exponent
_GRID_TOP = {"fp8_e4m3": (0x600000, 8), "int8": (0x7E0000, 6), "nvfp4": (0x400000, 2), "mxfp4": (0x400000, 2)}
E4M3_SCALE_EXPONENTS = (-9, 8)  # powers of two an e4m3 block scale holds exactly
E8M0_BIAS = 127


def _exponent_and_mantissa(values: Tensor) -> tuple[Tensor, Tensor]:
    """``floor(log2 |x|)`` and the 23 mantissa bits of float32 ``values`` (normal numbers)."""
    bits = values.float().abs().view(torch.int32)
    return ((bits >> 23) & 0xFF) - 127, bits & 0x7FFFFF


def floor_log2(values: Tensor) -> Tensor:
    """``floor(log2 |x|)`` of float32 normal numbers, as int32 (exact: read from the exponent bits)."""
    return _exponent_and_mantissa(values)[0]


def power_of_two(exponents: Tensor) -> Tensor:
    """``2.0 ** exponents`` exactly, for integer exponents in [-126, 127] (built from the exponent bits)."""
    return ((exponents.to(torch.int32) + 127) << 23).view(torch.float32)


def scale_exponent(amax: Tensor, kind: str) -> Tensor:
    """The smallest ``k`` with ``amax / 2**k <= GRID_MAX[kind]`` (int32, clamped to [-126, 127]).

    Args:
        amax: positive float32 magnitudes (rows or blocks).
        kind: one of ``ROW_KINDS + BLOCK_KINDS``.
    """
    threshold, top = _GRID_TOP[kind]
    exponent, mantissa = _exponent_and_mantissa(amax)
    return (exponent - top + (mantissa > threshold).to(torch.int32)).clamp(-126, 127)


def stochastic_round_to_grid(scaled: Tensor, uniform: Tensor, kind: str) -> Tensor:
    """Round ``scaled`` (values already divided by their scale) to the grid of ``kind``, up with probability
    equal to the distance from the lower neighbour. ``uniform`` in [0, 1); ``0.5`` gives round-to-nearest.

    Returns float32 values on the grid, clamped to ``[-GRID_MAX, GRID_MAX]``.
    """
    limit = GRID_MAX[kind]
    magnitude = scaled.abs().clamp_max(limit)
    if kind == "int8":
        step = torch.ones_like(magnitude)
    else:
        exponent, _ = _exponent_and_mantissa(magnitude)
        if kind == "fp8_e4m3":
            step = power_of_two(exponent.clamp_min(-6) - 3)  # 3 mantissa bits; subnormal step 2^-9
        else:
            step = power_of_two(exponent.clamp_min(0) - 1)  # e2m1: 1 mantissa bit; step 0.5 below 2
    ratio = magnitude / step  # exact: power-of-two divisor
    lower = torch.floor(ratio)
    rounded = torch.where(uniform < ratio - lower, lower + 1.0, lower)
    result = (rounded * step).clamp_max(limit)
    return torch.where(scaled < 0, -result, result)


def encode_e2m1(values: Tensor) -> Tensor:
    """uint8 codes (sign bit 3, magnitude index 0..7) of float32 values already on the e2m1 grid."""
    magnitude = values.abs()
    index = torch.where(magnitude < 2, magnitude * 2, torch.where(magnitude < 4, magnitude + 2, magnitude * 0.5 + 4))
    sign = ((values < 0) & (magnitude > 0)).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def decode_e2m1(codes: Tensor) -> Tensor:
    """float32 values of e2m1 codes (the low 4 bits of ``codes``)."""
    index = (codes & 7).to(torch.float32)
    magnitude = torch.where(index < 4, index * 0.5, torch.where(index < 6, index - 2, (index - 4) * 2))
    return torch.where((codes & 8) > 0, -magnitude, magnitude)


def pack_e2m1(codes: Tensor) -> Tensor:
    """Two codes per byte along the last dimension: even element in the low nibble (torchao's layout)."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: Tensor) -> Tensor:
    """The inverse of :func:`pack_e2m1`: uint8 codes, twice as many along the last dimension."""
    low, high = packed & 0xF, (packed >> 4) & 0xF
    return torch.stack((low, high), dim=-1).flatten(-2)
