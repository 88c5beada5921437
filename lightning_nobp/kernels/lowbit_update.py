"""Fused in-place update of a low-bit weight, as a Triton kernel and its pure-PyTorch reference twin.

One pass over the stored weight: dequantize, add ``decay * w + sum_m c_m z_m + A B^T + dense`` in float32 registers
(each member's noise ``z_m`` regenerated from its seed, low-rank factors read once), choose the new power-of-two
row or block scale, round stochastically with its own Philox stream, pack and store in place: one read and one
write of each weight. Row formats (fp8 e4m3, int8) hold whole rows in registers, so the row maximum is known before
the write; block formats (nvfp4, mxfp4) hold whole scale blocks. Every weight of one kind is updated in one launch
(:func:`grouped_update`: a table of pointers, one program per few rows or per tile). Where the rows start on a
Philox counter, one Philox call gives four rounding numbers or four normals. Nothing of the weight's size is
allocated besides the reference twin's temporaries.
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
from lightning_nobp.kernels.term_tables import block_table, device_table, term_tables
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
    def _normal_tile(seed, rows, K, ROWS: tl.constexpr, WIDTH: tl.constexpr):
        """``normal_at(seed, rows * K + cols)`` for ``cols = 0 .. WIDTH-1``, one Philox call per four normals and
        one logarithm per two (``K`` divisible by 4, so a row starts on a counter)."""
        counters = rows[:, None].to(tl.int64) * (K // 4) + tl.arange(0, WIDTH // 4)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, counters)
        radius_a = tl.sqrt(-2.0 * tl.log(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w0))))
        radius_b = tl.sqrt(-2.0 * tl.log(tl.maximum(1.0e-7, tl.uint_to_uniform_float(w2))))
        angle_a = 6.283185307179586 * tl.uint_to_uniform_float(w1)
        angle_b = 6.283185307179586 * tl.uint_to_uniform_float(w3)
        first = tl.join(radius_a * tl.cos(angle_a), radius_b * tl.cos(angle_b))  # elements 0 and 2
        second = tl.join(radius_a * tl.sin(angle_a), radius_b * tl.sin(angle_b))  # elements 1 and 3
        return tl.reshape(tl.join(first, second), (ROWS, WIDTH))

    @triton.jit
    def _uniform_tile(seed, rows, K, ROWS: tl.constexpr, WIDTH: tl.constexpr):
        """``uniform_at(seed, rows * K + cols)`` for ``cols = 0 .. WIDTH-1``, one Philox call per four numbers."""
        counters = rows[:, None].to(tl.int64) * (K // 4) + tl.arange(0, WIDTH // 4)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, counters)
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (ROWS, WIDTH))
        return tl.uint_to_uniform_float(words)

    @triton.jit
    def _low_rank_and_dense(
        values, w, rows, cols, row_mask, col_mask, flat, a_addr_ptr, b_addr_ptr, rank_ptr, dense_addr_ptr
    ):
        """``values + A B^T + dense`` of weight ``w`` at ``rows[:, None], cols[None, :]`` (``flat`` offsets)."""
        rank = tl.load(rank_ptr + w)
        if rank > 0:
            a_ptr = tl.load(a_addr_ptr + w).to(tl.pointer_type(tl.float32))
            b_ptr = tl.load(b_addr_ptr + w).to(tl.pointer_type(tl.float32))
            low_rank = tl.zeros(values.shape, dtype=tl.float32)
            for k in range(rank):  # a few rank-one FMAs per element: far below the kernel's memory time
                a = tl.load(a_ptr + rows * rank + k, mask=row_mask, other=0.0)
                b = tl.load(b_ptr + cols * rank + k, mask=col_mask, other=0.0)
                low_rank += a[:, None] * b[None, :]
            values += low_rank
        dense_addr = tl.load(dense_addr_ptr + w)
        if dense_addr != 0:
            mask = row_mask[:, None] & col_mask[None, :]
            values += tl.load(dense_addr.to(tl.pointer_type(tl.float32)) + flat, mask=mask, other=0.0)
        return values

    @triton.jit
    def _row_tile(
        w, local, q_addr_ptr, scale_addr_ptr, rows_ptr, cols_ptr,
        decay_addr_ptr, members_ptr, seeds_ptr, coefficients_ptr, max_members, a_addr_ptr, b_addr_ptr, rank_ptr,
        dense_addr_ptr, rounding_seed_ptr,
        KIND: tl.constexpr, GAUSSIAN: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
    ):  # fmt: skip
        """Rows ``local * ROWS ..`` of row-scaled weight ``w``, whole rows in registers: one read, one write."""
        N = tl.load(rows_ptr + w)
        K = tl.load(cols_ptr + w)
        rows = local * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, WIDTH)
        row_mask = rows < N
        mask = row_mask[:, None] & (cols[None, :] < K)
        flat = rows[:, None].to(tl.int64) * K + cols[None, :]
        if KIND == 0:
            q_ptr = tl.load(q_addr_ptr + w).to(tl.pointer_type(tl.float8e4nv))
        else:
            q_ptr = tl.load(q_addr_ptr + w).to(tl.pointer_type(tl.int8))
        scale_ptr = tl.load(scale_addr_ptr + w).to(tl.pointer_type(tl.float32))
        decay = tl.load(tl.load(decay_addr_ptr + w).to(tl.pointer_type(tl.float32)))
        old_scale = tl.load(scale_ptr + rows, mask=row_mask, other=1.0)
        q = tl.where(mask, tl.load(q_ptr + flat, mask=mask).to(tl.float32), 0.0)
        values = q * old_scale[:, None] * decay
        for m in range(tl.load(members_ptr + w)):
            seed = tl.load(seeds_ptr + w * max_members + m)
            coefficient = tl.load(coefficients_ptr + w * max_members + m)
            if ALIGNED and GAUSSIAN:
                values += coefficient * _normal_tile(seed, rows, K, ROWS, WIDTH)
            else:
                values += coefficient * noise_at(seed, flat, GAUSSIAN)
        values = _low_rank_and_dense(values, w, rows, cols, row_mask, cols < K, flat, a_addr_ptr, b_addr_ptr,
                                     rank_ptr, dense_addr_ptr)  # fmt: skip
        amax = tl.max(tl.where(mask, tl.abs(values), 0.0), axis=1)
        new_scale = tl.where(amax > 0, _pow2(_scale_exponent(amax, KIND)), old_scale)
        inverse = _pow2(-_floor_log2(new_scale))  # 1 / new_scale, exactly (a power of two)
        rounding_seed = tl.load(rounding_seed_ptr + w)
        if ALIGNED:
            uniform = _uniform_tile(rounding_seed, rows, K, ROWS, WIDTH)
        else:
            uniform = uniform_at(rounding_seed, flat)
        grid = _round_to_grid(values * inverse[:, None], uniform, KIND)
        tl.store(q_ptr + flat, grid.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, new_scale, mask=row_mask)

    @triton.jit
    def _grouped_row_update_kernel(
        block_weight_ptr, first_block_ptr, q_addr_ptr, scale_addr_ptr, rows_ptr, cols_ptr,
        decay_addr_ptr, members_ptr, seeds_ptr, coefficients_ptr, max_members, a_addr_ptr, b_addr_ptr, rank_ptr,
        dense_addr_ptr, rounding_seed_ptr,
        KIND: tl.constexpr, GAUSSIAN: tl.constexpr, ALIGNED: tl.constexpr, NARROW: tl.constexpr,
        NARROW_ROWS: tl.constexpr, WIDE: tl.constexpr, WIDE_ROWS: tl.constexpr,
    ):  # fmt: skip
        """The row-scaled update of a table of weights (fp8 e4m3 or int8): program ``p`` takes whole rows of
        weight ``block_weight[p]``, ``NARROW_ROWS`` rows of width ``<= NARROW`` or ``WIDE_ROWS`` wider ones."""
        pid = tl.program_id(0)
        w = tl.load(block_weight_ptr + pid)
        local = pid - tl.load(first_block_ptr + w)
        if tl.load(cols_ptr + w) <= NARROW:
            _row_tile(w, local, q_addr_ptr, scale_addr_ptr, rows_ptr, cols_ptr, decay_addr_ptr, members_ptr,
                      seeds_ptr, coefficients_ptr, max_members, a_addr_ptr, b_addr_ptr, rank_ptr, dense_addr_ptr,
                      rounding_seed_ptr, KIND, GAUSSIAN, ALIGNED, NARROW_ROWS, NARROW)  # fmt: skip
        else:
            _row_tile(w, local, q_addr_ptr, scale_addr_ptr, rows_ptr, cols_ptr, decay_addr_ptr, members_ptr,
                      seeds_ptr, coefficients_ptr, max_members, a_addr_ptr, b_addr_ptr, rank_ptr, dense_addr_ptr,
                      rounding_seed_ptr, KIND, GAUSSIAN, ALIGNED, WIDE_ROWS, WIDE)  # fmt: skip

    @triton.jit
    def _grouped_block_update_kernel(
        block_weight_ptr, first_block_ptr, q_addr_ptr, scale_addr_ptr, per_tensor_addr_ptr, rows_ptr, cols_ptr,
        decay_addr_ptr, members_ptr, seeds_ptr, coefficients_ptr, max_members, a_addr_ptr, b_addr_ptr, rank_ptr,
        dense_addr_ptr, rounding_seed_ptr,
        KIND: tl.constexpr, GAUSSIAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """The block-scaled update of a table of weights (nvfp4, mxfp4): program ``p`` takes one ``BLOCK_N x
        BLOCK_K`` tile of weight ``block_weight[p]``; every scale block lies inside one tile (one pass)."""
        HALF: tl.constexpr = BLOCK_K // 2
        BLOCKS: tl.constexpr = BLOCK_K // BLOCK
        pid = tl.program_id(0)
        w = tl.load(block_weight_ptr + pid)
        local = pid - tl.load(first_block_ptr + w)
        N = tl.load(rows_ptr + w)
        K = tl.load(cols_ptr + w)
        col_tiles = tl.cdiv(K, BLOCK_K)
        row_tile, col_tile = local // col_tiles, local % col_tiles
        q_ptr = tl.load(q_addr_ptr + w).to(tl.pointer_type(tl.uint8))
        if KIND == 2:
            scale_ptr = tl.load(scale_addr_ptr + w).to(tl.pointer_type(tl.float8e4nv))
        else:
            scale_ptr = tl.load(scale_addr_ptr + w).to(tl.pointer_type(tl.uint8))
        per_tensor_scale = 1.0
        per_tensor_addr = tl.load(per_tensor_addr_ptr + w)
        if per_tensor_addr != 0:
            per_tensor_scale = tl.load(per_tensor_addr.to(tl.pointer_type(tl.float32)))
        decay = tl.load(tl.load(decay_addr_ptr + w).to(tl.pointer_type(tl.float32)))
        rows = row_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        pairs = col_tile * HALF + tl.arange(0, HALF)  # byte index within the row
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
        flat_even = rows[:, None].to(tl.int64) * K + even[None, :]
        low = _decode_e2m1(packed & 0xF) * old_scale * decay
        high = _decode_e2m1((packed >> 4) & 0xF) * old_scale * decay
        for m in range(tl.load(members_ptr + w)):
            seed = tl.load(seeds_ptr + w * max_members + m)
            coefficient = tl.load(coefficients_ptr + w * max_members + m)
            low += coefficient * noise_at(seed, flat_even, GAUSSIAN)
            high += coefficient * noise_at(seed, flat_even + 1, GAUSSIAN)
        low = _low_rank_and_dense(low, w, rows, even, rows < N, even < K, flat_even, a_addr_ptr, b_addr_ptr,
                                  rank_ptr, dense_addr_ptr)  # fmt: skip
        high = _low_rank_and_dense(high, w, rows, odd, rows < N, odd < K, flat_even + 1, a_addr_ptr, b_addr_ptr,
                                   rank_ptr, dense_addr_ptr)  # fmt: skip
        magnitude = tl.maximum(tl.where(mask, tl.abs(low), 0.0), tl.where(mask, tl.abs(high), 0.0))
        amax = tl.max(tl.reshape(magnitude, (BLOCK_N, BLOCKS, BLOCK // 2)), axis=2)  # [BLOCK_N, BLOCKS]
        exponent = _scale_exponent(amax, KIND)
        old_blocks = tl.reshape(old_scale, (BLOCK_N, BLOCKS, BLOCK // 2))
        if KIND == 2:
            target = _pow2(exponent) / per_tensor_scale
            stored = tl.minimum(tl.maximum(target, 0.001953125), 256.0).to(tl.float8e4nv)
            old_stored = (tl.max(old_blocks, axis=2) / per_tensor_scale).to(tl.float8e4nv)
            stored = tl.where(amax > 0, stored.to(tl.float32), old_stored.to(tl.float32)).to(tl.float8e4nv)
            new_block_scale = stored.to(tl.float32) * per_tensor_scale
        else:
            old_exp_blocks = _floor_log2(tl.max(old_blocks, axis=2)) + 127
            stored_exp = tl.where(amax > 0, tl.minimum(tl.maximum(exponent + 127, 1), 254), old_exp_blocks)
            stored = stored_exp.to(tl.uint8)
            new_block_scale = _pow2(stored_exp - 127)
        block_cols = col_tile * BLOCKS + tl.arange(0, BLOCKS)
        block_mask = (rows[:, None] < N) & (block_cols[None, :] < K // BLOCK)
        tl.store(scale_ptr + rows[:, None].to(tl.int64) * (K // BLOCK) + block_cols[None, :], stored,
                 mask=block_mask)  # fmt: skip
        element_scale = tl.reshape(
            tl.broadcast_to(tl.reshape(new_block_scale, (BLOCK_N, BLOCKS, 1)), (BLOCK_N, BLOCKS, BLOCK // 2)),
            (BLOCK_N, HALF),
        )
        rounding_seed = tl.load(rounding_seed_ptr + w)
        low_code = _encode_e2m1(_round_to_grid(low / element_scale, uniform_at(rounding_seed, flat_even), KIND))
        high_code = _encode_e2m1(_round_to_grid(high / element_scale, uniform_at(rounding_seed, flat_even + 1), KIND))
        tl.store(q_ptr + byte_at, low_code | (high_code << 4), mask=mask)


#: elements per program of the row kernel for rows narrower than this (wider rows take one row per program)
ROW_TILE_ELEMENTS = 4096
#: the widest row (columns) the row kernel holds in registers
MAX_ROW_WIDTH = 32768
#: the block kernel's tile: rows x columns (every scale block inside one tile)
BLOCK_TILE = (16, 256)


def _row_widths(cols: list[int]) -> tuple[int, int]:
    """The two tile widths of a row-kernel launch: the widest rows' and the next widest class's (powers of two)."""
    widths = sorted({max(16, triton.next_power_of_2(k)) for k in cols})
    if widths[-1] > MAX_ROW_WIDTH:
        raise ValueError(
            f"the fused low-bit update holds whole rows in registers, up to {MAX_ROW_WIDTH} columns; a weight has "
            f"{max(cols)}: store it in bf16 (leave it out of LowBitPrecision's formats)"
        )
    return (widths[-2] if len(widths) > 1 else widths[-1]), widths[-1]


def _rows_per_program(width: int) -> int:
    return max(1, min(64, ROW_TILE_ELEMENTS // width))


def triton_grouped_update(layouts: list[LowBitLayout], terms: list[UpdateTerms], rounding_seeds: list[int]) -> None:
    """The fused update of several weights of one low-bit kind and one stream distribution in one Triton launch
    (on CUDA, or on CPU under ``TRITON_INTERPRET=1``): each weight as :func:`reference_update` updates it alone."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use reference_update)")
    kind, device = layouts[0].kind, layouts[0].device
    if any(layout.kind != kind for layout in layouts):
        raise ValueError("a grouped low-bit update takes layouts of one kind")
    for layout in layouts:
        if not layout.qdata.is_contiguous() or not layout.scale.is_contiguous():
            raise ValueError("the fused update needs contiguous qdata and scale tensors")
    rows, cols = [layout.rows for layout in layouts], [layout.cols for layout in layouts]
    tables = term_tables(terms, rounding_seeds, device)
    shapes = (device_table(rows, device), device_table(cols, device))
    scales = [layout.scale if layout.kind != "mxfp4" else layout.scale.view(torch.uint8) for layout in layouts]
    storage = (
        device_table([layout.qdata.data_ptr() for layout in layouts], device),
        device_table([scale.data_ptr() for scale in scales], device),
    )
    if kind in ROW_KINDS:
        narrow, wide = _row_widths(cols)
        narrow_rows, wide_rows = _rows_per_program(narrow), _rows_per_program(wide)
        blocks = block_table(
            [triton.cdiv(n, narrow_rows if k <= narrow else wide_rows) for n, k in zip(rows, cols)], device
        )
        _grouped_row_update_kernel[(blocks.programs,)](
            blocks.block_weight, blocks.first_block, *storage, *shapes, *tables.arguments(),
            KIND=KIND_CODES[kind], GAUSSIAN=terms[0].gaussian, ALIGNED=all(k % 4 == 0 for k in cols),
            NARROW=narrow, NARROW_ROWS=narrow_rows, WIDE=wide, WIDE_ROWS=wide_rows,
            num_warps=max(4, min(16, wide * wide_rows // 512)),
        )  # fmt: skip
        return
    block_n, block_k = BLOCK_TILE
    blocks = block_table([triton.cdiv(n, block_n) * triton.cdiv(k, block_k) for n, k in zip(rows, cols)], device)
    per_tensor = []
    for layout in layouts:
        if layout.per_tensor_scale is None:
            per_tensor.append(0)
            continue
        scale = layout.per_tensor_scale.to(device=device, dtype=torch.float32).reshape(1)
        tables.keep.append(scale)
        per_tensor.append(scale.data_ptr())
    _grouped_block_update_kernel[(blocks.programs,)](
        blocks.block_weight, blocks.first_block, *storage, device_table(per_tensor, device), *shapes,
        *tables.arguments(), KIND=KIND_CODES[kind], GAUSSIAN=terms[0].gaussian, BLOCK=BLOCK_SIZES[kind],
        BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def triton_update(layout: LowBitLayout, terms: UpdateTerms, rounding_seed: int) -> None:
    """Run the Triton kernel of :func:`fused_update` on one weight (a group of one)."""
    triton_grouped_update([layout], [terms], [rounding_seed])


def grouped_update(updates: list[tuple[LowBitLayout, UpdateTerms, int]]) -> int:
    """Update many low-bit weights in place, one launch per (kind, device, stream distribution) group on CUDA;
    each weight as :func:`fused_update` would (the twin runs weight by weight elsewhere).

    Args:
        updates: ``(layout, terms, rounding seed)`` of every weight.

    Returns:
        How many groups (launches on CUDA) it took.
    """
    groups: dict[tuple[str, torch.device, bool], list[tuple[LowBitLayout, UpdateTerms, int]]] = {}
    for layout, terms, seed in updates:
        check_columns(layout)
        groups.setdefault((layout.kind, layout.device, terms.gaussian), []).append((layout, terms, seed))
    for (_, device, _), members in groups.items():
        if use_triton(device):
            triton_grouped_update([m[0] for m in members], [m[1] for m in members], [m[2] for m in members])
        else:
            for layout, terms, seed in members:
                reference_update(layout, terms, seed)
    return len(groups)


def check_columns(layout: LowBitLayout) -> None:
    """Raise when a block-scaled layout's column count is not a multiple of its block."""
    if layout.cols % (BLOCK_SIZES.get(layout.kind, 1)) != 0:
        raise ValueError(f"{layout.kind} needs a column count divisible by {BLOCK_SIZES[layout.kind]}")


def fused_update(layout: LowBitLayout, terms: UpdateTerms, rounding_seed: int) -> None:
    """Update a low-bit weight in place: ``w <- SR(decay * w + sum_m c_m z_m + A B^T + dense)``.

    Triton on CUDA, the PyTorch reference elsewhere; both produce the same streams and scales (rounding may differ
    in about 1e-4 of the elements by one grid step where float sums differ in their last bit).

    Args:
        layout: the weight's inner tensors (written in place).
        terms: what to add (see :class:`UpdateTerms`).
        rounding_seed: seed of the stochastic-rounding stream (element ``i`` at offset ``i``).
    """
    grouped_update([(layout, terms, rounding_seed)])
