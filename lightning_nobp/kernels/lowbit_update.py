"""Fused in-place update of a low-bit weight, as a Triton kernel and its pure-PyTorch reference twin.

One pass over the stored weight: dequantize, add ``decay * w + sum_m c_m z_m + A B^T + dense`` in float32 registers
(each member's noise ``z_m`` regenerated from its seed, low-rank factors read once), choose the new power-of-two
row or block scale, round stochastically with its own Philox stream, pack and store in place. Row formats
(fp8 e4m3, int8) make two passes over each row (the row maximum first); block formats (nvfp4, mxfp4) one.
Nothing of the weight's size is allocated besides the reference twin's temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_grids import (
    BLOCK_KINDS,
    BLOCK_SIZES,
    E4M3_SCALE_EXPONENTS,
    E8M0_BIAS,
    ROW_KINDS,
    decode_e2m1,
    encode_e2m1,
    floor_log2,
    pack_e2m1,
    power_of_two,
    scale_exponent,
    stochastic_round_to_grid,
    unpack_e2m1,
)
from lightning_nobp.kernels.philox import reference_noise, reference_uniform
from lightning_nobp.kernels.triton_support import tl, triton, use_triton

KIND_CODES = {"fp8_e4m3": 0, "int8": 1, "nvfp4": 2, "mxfp4": 3}


@dataclass
class LowBitLayout:
    """The inner tensors of one low-bit weight ``[rows, cols]``, as the kernels read and write them.

    Args:
        kind: ``"fp8_e4m3"``, ``"int8"`` (row scales) or ``"nvfp4"``, ``"mxfp4"`` (block scales).
        qdata: fp8 e4m3 or int8 ``[rows, cols]``; for fp4, uint8 ``[rows, cols / 2]`` (two codes per byte).
        scale: fp32 ``[rows, 1]`` (row kinds); e4m3 ``[rows, cols / 16]`` (nvfp4); e8m0 ``[rows, cols / 32]``
            (mxfp4). Written in place.
        per_tensor_scale: nvfp4's fp32 scalar multiplying every block scale (``None``: 1).
    """

    kind: str
    qdata: Tensor
    scale: Tensor
    per_tensor_scale: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.qdata.shape[0]

    @property
    def cols(self) -> int:
        return self.qdata.shape[1] * (2 if self.kind in BLOCK_KINDS else 1)

    @property
    def device(self) -> torch.device:
        return self.qdata.device


@dataclass
class UpdateTerms:
    """What one step adds to a weight ``w`` (float32): ``decay * w + sum_m c_m z_m + A B^T + dense``.

    Args:
        decay: multiplier of the current weight (``1 - lr * weight_decay``).
        seeds: int64 ``[M]`` Philox seeds of dense noise streams (element ``i`` of the flattened weight at offset
            ``i``), or ``None``.
        coefficients: float32 ``[M]`` coefficient of each stream (already including ``-lr``).
        gaussian: the streams are Gaussian (else Rademacher).
        factor_a: float32 ``[rows, R]`` (coefficients and ``-lr`` folded in) of a low-rank term, or ``None``.
        factor_b: float32 ``[cols, R]``.
        dense: a float32 ``[rows, cols]`` term, or ``None``.
    """

    decay: float | Tensor = 1.0
    seeds: Tensor | None = None
    coefficients: Tensor | None = None
    gaussian: bool = True
    factor_a: Tensor | None = None
    factor_b: Tensor | None = None
    dense: Tensor | None = None

    def scaled(self, factor: float) -> UpdateTerms:
        """These terms with every added term (not ``decay``) multiplied by ``factor``."""
        return UpdateTerms(
            decay=self.decay,
            seeds=self.seeds,
            coefficients=None if self.coefficients is None else self.coefficients * factor,
            gaussian=self.gaussian,
            factor_a=None if self.factor_a is None else self.factor_a * factor,
            factor_b=self.factor_b,
            dense=None if self.dense is None else self.dense * factor,
        )


# ----------------------------------------------------------------------------------------------------------------
# reference twin
# ----------------------------------------------------------------------------------------------------------------


def block_scales(layout: LowBitLayout) -> Tensor:
    """The float32 scale of every block ``[rows, cols / block]`` of an fp4 layout."""
    if layout.kind == "nvfp4":
        scales = layout.scale.float()
        return scales * layout.per_tensor_scale.float() if layout.per_tensor_scale is not None else scales
    exponents = layout.scale.view(torch.uint8).to(torch.int32).clamp_min(1) - E8M0_BIAS
    return power_of_two(exponents)


def reference_dequantize(layout: LowBitLayout) -> Tensor:
    """The float32 weight ``[rows, cols]`` a layout stores."""
    if layout.kind in ROW_KINDS:
        return layout.qdata.float() * layout.scale.float().view(-1, 1)
    values = decode_e2m1(unpack_e2m1(layout.qdata))
    block = BLOCK_SIZES[layout.kind]
    return (values.view(layout.rows, -1, block) * block_scales(layout).unsqueeze(-1)).view(layout.rows, layout.cols)


def reference_updated_values(layout: LowBitLayout, terms: UpdateTerms) -> Tensor:
    """``decay * w + sum_m c_m z_m + A B^T + dense`` in float32, the same sum the kernel forms."""
    return added_terms(terms, reference_dequantize(layout) * terms.decay)


def added_terms(terms: UpdateTerms, into: Tensor) -> Tensor:
    """``into + sum_m c_m z_m + A B^T + dense`` (everything but the decay), in place in float32 ``into``.

    Args:
        terms: the step's terms.
        into: a float32 ``[rows, cols]`` tensor (zeros for the update alone).
    """
    numel = into.numel()
    if terms.seeds is not None and terms.coefficients is not None:
        distribution = "gaussian" if terms.gaussian else "rademacher"
        for seed, coefficient in zip(terms.seeds.tolist(), terms.coefficients.tolist()):
            into.view(-1).add_(reference_noise(int(seed), numel, distribution, into.device), alpha=coefficient)
    if terms.factor_a is not None and terms.factor_b is not None:
        into.add_(terms.factor_a.float() @ terms.factor_b.float().t())
    if terms.dense is not None:
        into.add_(terms.dense.float().view_as(into))
    return into


def quantize_into(layout: LowBitLayout, values: Tensor, uniform: Tensor) -> None:
    """Write float32 ``values [rows, cols]`` into ``layout`` with new power-of-two scales.

    Args:
        layout: the destination (its ``qdata`` and ``scale`` are overwritten in place).
        values: the new weight.
        uniform: ``[rows, cols]`` numbers in [0, 1) deciding the rounding (``0.5`` everywhere: round to nearest).
    """
    rows, cols = layout.rows, layout.cols
    if layout.kind in ROW_KINDS:
        amax = values.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, power_of_two(scale_exponent(amax, layout.kind)), layout.scale.float())
        grid = stochastic_round_to_grid(values * power_of_two(-floor_log2(scale)), uniform, layout.kind)
        layout.qdata.copy_(grid.to(layout.qdata.dtype))
        layout.scale.copy_(scale.view_as(layout.scale))
        return
    block = BLOCK_SIZES[layout.kind]
    blocks = values.view(rows, cols // block, block)
    amax = blocks.abs().amax(dim=2)
    exponent = scale_exponent(amax, layout.kind)
    if layout.kind == "nvfp4":
        if layout.per_tensor_scale is None:
            raise ValueError("an nvfp4 layout needs its per_tensor_scale")
        target = power_of_two(exponent) / layout.per_tensor_scale.float()
        low, high = E4M3_SCALE_EXPONENTS
        stored = target.clamp(2.0**low, 2.0**high).to(torch.float8_e4m3fn)
        stored = torch.where(amax > 0, stored.float(), layout.scale.float()).to(torch.float8_e4m3fn)
        layout.scale.copy_(stored)
    else:
        stored = (exponent + E8M0_BIAS).clamp(1, 254)
        stored = torch.where(amax > 0, stored, layout.scale.view(torch.uint8).to(torch.int32))
        layout.scale.view(torch.uint8).copy_(stored.to(torch.uint8))
    scales = block_scales(layout).unsqueeze(-1)
    grid = stochastic_round_to_grid(blocks / scales, uniform.view_as(blocks), layout.kind)
    layout.qdata.copy_(pack_e2m1(encode_e2m1(grid.view(rows, cols))))


def reference_update(layout: LowBitLayout, terms: UpdateTerms, rounding_seed: int) -> None:
    """The reference twin of :func:`fused_update` (same streams, same scales, same rounding)."""
    values = reference_updated_values(layout, terms)
    uniform = reference_uniform(rounding_seed, values.numel(), layout.device).view_as(values)
    quantize_into(layout, values, uniform)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:
    from lightning_nobp.kernels.philox import noise_at, uniform_at

    @triton.jit
    def _pow2(exponent):
        """``2 ** exponent`` exactly, for int32 exponents in [-126, 127]."""
        return ((exponent + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _floor_log2(magnitude):
        return ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127

    @triton.jit
    def _scale_exponent(amax, KIND: tl.constexpr):
        bits = amax.to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 127
        mantissa = bits & 0x7FFFFF
        if KIND == 0:
            result = exponent - 8 + (mantissa > 0x600000).to(tl.int32)
        elif KIND == 1:
            result = exponent - 6 + (mantissa > 0x7E0000).to(tl.int32)
        else:
            result = exponent - 2 + (mantissa > 0x400000).to(tl.int32)
        return tl.minimum(tl.maximum(result, -126), 127)

    @triton.jit
    def _round_to_grid(scaled, uniform, KIND: tl.constexpr):
        """Stochastic rounding of ``scaled`` onto the grid of KIND (0 e4m3, 1 int8, 2/3 e2m1)."""
        if KIND == 0:
            limit = 448.0
        elif KIND == 1:
            limit = 127.0
        else:
            limit = 6.0
        magnitude = tl.minimum(tl.abs(scaled), limit)
        if KIND == 1:
            step = tl.full(magnitude.shape, 1.0, tl.float32)
        elif KIND == 0:
            step = _pow2(tl.maximum(_floor_log2(magnitude), -6) - 3)
        else:
            step = _pow2(tl.maximum(_floor_log2(magnitude), 0) - 1)
        ratio = magnitude / step
        lower = tl.floor(ratio)
        rounded = tl.where(uniform < ratio - lower, lower + 1.0, lower)
        result = tl.minimum(rounded * step, limit)
        return tl.where(scaled < 0, -result, result)

    @triton.jit
    def _decode_e2m1(codes):
        index = (codes & 7).to(tl.float32)
        magnitude = tl.where(index < 4, index * 0.5, tl.where(index < 6, index - 2.0, (index - 4.0) * 2.0))
        return tl.where((codes & 8) > 0, -magnitude, magnitude)

    @triton.jit
    def _encode_e2m1(values):
        magnitude = tl.abs(values)
        index = tl.where(
            magnitude < 2, magnitude * 2.0, tl.where(magnitude < 4, magnitude + 2.0, magnitude * 0.5 + 4.0)
        )
        sign = tl.where((values < 0) & (magnitude > 0), 8, 0)
        return (index.to(tl.int32) | sign).to(tl.uint8)

    @triton.jit
    def _added_terms(
        values, rows, cols, N, K, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr,
        HAS_STREAMS: tl.constexpr, GAUSSIAN: tl.constexpr, HAS_LOW_RANK: tl.constexpr, HAS_DENSE: tl.constexpr,
        R_PAD: tl.constexpr,
    ):  # fmt: skip
        """``values + sum_m c_m z_m + A B^T + dense`` for the tile at ``rows[:, None], cols[None, :]``."""
        flat = rows[:, None].to(tl.int64) * K + cols[None, :]
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        if HAS_STREAMS:
            for m in range(M):
                seed = tl.load(seeds_ptr + m)
                coefficient = tl.load(coefs_ptr + m)
                values += coefficient * noise_at(seed, flat, GAUSSIAN)
        if HAS_LOW_RANK:
            ranks = tl.arange(0, R_PAD)
            a = tl.load(
                a_ptr + rows[:, None] * R + ranks[None, :], mask=(rows[:, None] < N) & (ranks[None, :] < R), other=0.0
            )
            b = tl.load(
                b_ptr + cols[:, None] * R + ranks[None, :], mask=(cols[:, None] < K) & (ranks[None, :] < R), other=0.0
            )
            values += tl.dot(a, tl.trans(b), input_precision="ieee")
        if HAS_DENSE:
            values += tl.load(dense_ptr + flat, mask=mask, other=0.0)
        return values

    @triton.jit
    def _row_update_kernel(
        q_ptr, scale_ptr, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr, decay, rounding_seed, N, K,
        KIND: tl.constexpr, HAS_STREAMS: tl.constexpr, GAUSSIAN: tl.constexpr, HAS_LOW_RANK: tl.constexpr,
        HAS_DENSE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        old_scale = tl.load(scale_ptr + rows, mask=row_mask, other=1.0)
        amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols[None, :] < K)
            q = tl.where(
                mask, tl.load(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask).to(tl.float32), 0.0
            )
            values = q * old_scale[:, None] * decay
            values = _added_terms(values, rows, cols, N, K, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr,
                                  HAS_STREAMS, GAUSSIAN, HAS_LOW_RANK, HAS_DENSE, R_PAD)  # fmt: skip
            amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(values), 0.0), axis=1))
        new_exponent = _scale_exponent(amax, KIND)
        new_scale = tl.where(amax > 0, _pow2(new_exponent), old_scale)
        inverse = _pow2(-_floor_log2(new_scale))  # 1 / new_scale, exactly (a power of two)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols[None, :] < K)
            flat = rows[:, None].to(tl.int64) * K + cols[None, :]
            q = tl.where(mask, tl.load(q_ptr + flat, mask=mask).to(tl.float32), 0.0)
            values = q * old_scale[:, None] * decay
            values = _added_terms(values, rows, cols, N, K, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr,
                                  HAS_STREAMS, GAUSSIAN, HAS_LOW_RANK, HAS_DENSE, R_PAD)  # fmt: skip
            grid = _round_to_grid(values * inverse[:, None], uniform_at(rounding_seed, flat), KIND)
            tl.store(q_ptr + flat, grid.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, new_scale, mask=row_mask)

    @triton.jit
    def _block_update_kernel(
        q_ptr, scale_ptr, per_tensor_scale, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr, decay,
        rounding_seed, N, K,
        KIND: tl.constexpr, HAS_STREAMS: tl.constexpr, GAUSSIAN: tl.constexpr, HAS_LOW_RANK: tl.constexpr,
        HAS_DENSE: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        HALF: tl.constexpr = BLOCK_K // 2
        BLOCKS: tl.constexpr = BLOCK_K // BLOCK
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        pairs = tl.program_id(1) * HALF + tl.arange(0, HALF)  # byte index within the row
        even, odd = pairs * 2, pairs * 2 + 1
        mask = (rows[:, None] < N) & (even[None, :] < K)
        byte_at = rows[:, None].to(tl.int64) * (K // 2) + pairs[None, :]
        packed = tl.load(q_ptr + byte_at, mask=mask, other=0).to(tl.int32)
        scale_at = rows[:, None].to(tl.int64) * (K // BLOCK) + even[None, :] // BLOCK
        if KIND == 2:
            old_scale = tl.where(mask, tl.load(scale_ptr + scale_at, mask=mask).to(tl.float32), 1.0) * per_tensor_scale
        else:
            old_exp = tl.maximum(tl.load(scale_ptr + scale_at, mask=mask, other=127).to(tl.int32), 1)
            old_scale = _pow2(old_exp - 127)
        low = _decode_e2m1(packed & 0xF) * old_scale * decay
        high = _decode_e2m1((packed >> 4) & 0xF) * old_scale * decay
        low = _added_terms(low, rows, even, N, K, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr,
                           HAS_STREAMS, GAUSSIAN, HAS_LOW_RANK, HAS_DENSE, R_PAD)  # fmt: skip
        high = _added_terms(high, rows, odd, N, K, seeds_ptr, coefs_ptr, M, a_ptr, b_ptr, R, dense_ptr,
                            HAS_STREAMS, GAUSSIAN, HAS_LOW_RANK, HAS_DENSE, R_PAD)  # fmt: skip
        magnitude = tl.maximum(tl.where(mask, tl.abs(low), 0.0), tl.where(mask, tl.abs(high), 0.0))
        amax = tl.max(tl.reshape(magnitude, (BLOCK_N, BLOCKS, BLOCK // 2)), axis=2)  # [BLOCK_N, BLOCKS]
        exponent = _scale_exponent(amax, KIND)
        if KIND == 2:
            target = _pow2(exponent) / per_tensor_scale
            stored = tl.minimum(tl.maximum(target, 0.001953125), 256.0).to(tl.float8e4nv)
            old_blocks = tl.reshape(old_scale, (BLOCK_N, BLOCKS, BLOCK // 2))
            old_stored = (tl.max(old_blocks, axis=2) / per_tensor_scale).to(tl.float8e4nv)
            stored = tl.where(amax > 0, stored.to(tl.float32), old_stored.to(tl.float32)).to(tl.float8e4nv)
            new_block_scale = stored.to(tl.float32) * per_tensor_scale
        else:
            old_blocks = tl.reshape(old_scale, (BLOCK_N, BLOCKS, BLOCK // 2))
            old_exp_blocks = _floor_log2(tl.max(old_blocks, axis=2)) + 127
            stored_exp = tl.where(amax > 0, tl.minimum(tl.maximum(exponent + 127, 1), 254), old_exp_blocks)
            stored = stored_exp.to(tl.uint8)
            new_block_scale = _pow2(stored_exp - 127)
        block_rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        block_cols = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
        block_mask = (block_rows[:, None] < N) & (block_cols[None, :] < K // BLOCK)
        tl.store(scale_ptr + block_rows[:, None].to(tl.int64) * (K // BLOCK) + block_cols[None, :], stored,
                 mask=block_mask)  # fmt: skip
        element_scale = tl.reshape(
            tl.broadcast_to(tl.reshape(new_block_scale, (BLOCK_N, BLOCKS, 1)), (BLOCK_N, BLOCKS, BLOCK // 2)),
            (BLOCK_N, HALF),
        )
        flat_even = rows[:, None].to(tl.int64) * K + even[None, :]
        low_code = _encode_e2m1(_round_to_grid(low / element_scale, uniform_at(rounding_seed, flat_even), KIND))
        high_code = _encode_e2m1(_round_to_grid(high / element_scale, uniform_at(rounding_seed, flat_even + 1), KIND))
        tl.store(q_ptr + byte_at, low_code | (high_code << 4), mask=mask)


def _term_arguments(layout: LowBitLayout, terms: UpdateTerms) -> tuple[list[object], dict[str, object]]:
    device = layout.device
    placeholder = torch.zeros(1, dtype=torch.float32, device=device)
    has_streams = terms.seeds is not None and terms.coefficients is not None and terms.seeds.numel() > 0
    has_low_rank = terms.factor_a is not None and terms.factor_b is not None
    seeds = terms.seeds.to(device=device, dtype=torch.int64).contiguous() if has_streams else placeholder.long()
    coefs = terms.coefficients.to(device=device, dtype=torch.float32).contiguous() if has_streams else placeholder
    rank = int(terms.factor_a.shape[1]) if has_low_rank else 0
    a = terms.factor_a.to(device=device, dtype=torch.float32).contiguous() if has_low_rank else placeholder
    b = terms.factor_b.to(device=device, dtype=torch.float32).contiguous() if has_low_rank else placeholder
    dense = terms.dense.to(device=device, dtype=torch.float32).contiguous() if terms.dense is not None else placeholder
    r_pad = max(16, triton.next_power_of_2(max(rank, 1)))
    args = [seeds, coefs, int(seeds.numel()) if has_streams else 0, a, b, rank, dense]
    flags = dict(
        HAS_STREAMS=has_streams,
        GAUSSIAN=terms.gaussian,
        HAS_LOW_RANK=has_low_rank,
        HAS_DENSE=terms.dense is not None,
        R_PAD=r_pad,
    )
    return args, flags


def triton_update(layout: LowBitLayout, terms: UpdateTerms, rounding_seed: int) -> None:
    """Run the Triton kernel of :func:`fused_update` (on CUDA, or on CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use reference_update)")
    if not layout.qdata.is_contiguous() or not layout.scale.is_contiguous():
        raise ValueError("the fused update needs contiguous qdata and scale tensors")
    args, flags = _term_arguments(layout, terms)
    rows, cols = layout.rows, layout.cols
    if layout.kind in ROW_KINDS:
        block_n, block_k = 16, min(512, max(16, triton.next_power_of_2(cols)))
        _row_update_kernel[(triton.cdiv(rows, block_n),)](
            layout.qdata, layout.scale.view(-1), *args, float(terms.decay), rounding_seed, rows, cols,
            KIND=KIND_CODES[layout.kind], BLOCK_N=block_n, BLOCK_K=block_k, **flags,
        )  # fmt: skip
        return
    block = BLOCK_SIZES[layout.kind]
    block_n, block_k = 16, 64
    per_tensor = float(layout.per_tensor_scale) if layout.per_tensor_scale is not None else 1.0
    scale = layout.scale if layout.kind == "nvfp4" else layout.scale.view(torch.uint8)
    _block_update_kernel[(triton.cdiv(rows, block_n), triton.cdiv(cols, block_k))](
        layout.qdata, scale, per_tensor, *args, float(terms.decay), rounding_seed, rows, cols,
        KIND=KIND_CODES[layout.kind], BLOCK=block, BLOCK_N=block_n, BLOCK_K=block_k, **flags,
    )  # fmt: skip


def fused_update(layout: LowBitLayout, terms: UpdateTerms, rounding_seed: int) -> None:
    """Update a low-bit weight in place: ``w <- SR(decay * w + sum_m c_m z_m + A B^T + dense)``.

    Triton on CUDA, the PyTorch reference elsewhere; both produce the same streams and scales (rounding may differ
    in about 1e-4 of the elements by one grid step where float sums differ in their last bit).

    Args:
        layout: the weight's inner tensors (written in place).
        terms: what to add (see :class:`UpdateTerms`).
        rounding_seed: seed of the stochastic-rounding stream (element ``i`` at offset ``i``).
    """
    if layout.cols % (BLOCK_SIZES.get(layout.kind, 1)) != 0:
        raise ValueError(f"{layout.kind} needs a column count divisible by {BLOCK_SIZES[layout.kind]}")
    if use_triton(layout.device):
        triton_update(layout, terms, rounding_seed)
    else:
        reference_update(layout, terms, rounding_seed)
