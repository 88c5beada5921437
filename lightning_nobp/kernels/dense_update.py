"""Fused in-place update and perturbed copy of a bf16 or float32 weight: a Triton kernel and its PyTorch twin.

The update, in one pass over the weight: ``w <- round(decay * w + sum_m c_m z_m + A B^T + dense)``, every member's
noise ``z_m`` regenerated from its Philox seed (element ``i`` of the flattened weight at offset ``i``, the streams
of ``lightning_nobp.kernels.philox``), the low-rank factors read once per tile, the sum kept in float32 registers,
rounded stochastically to bf16 (16 random bits from the rounding seed's Philox stream added below the bf16
mantissa, then truncated: unbiased) or stored as float32. Nothing of the weight's size is allocated.

The perturbed copy, for a member's evaluation: ``out = w + sum_m s_m z_m`` in the weight's dtype (round to nearest),
written into a new tensor of the weight's size: one layer's copy at a time instead of the whole model's noise.

Both are ``torch.library`` custom ops (``lightning_nobp::dense_update_``, ``lightning_nobp::dense_perturbed``) with
fake implementations, so they run under ``FakeTensorMode`` (memory measured at full scale without a GPU) and
``torch.compile`` treats them as single calls. The twin works through blocks of rows, so its temporaries stay a few
megabytes whatever the weight's size; it gives the same bits as the kernel under ``TRITON_INTERPRET=1`` (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_update import UpdateTerms
from lightning_nobp.kernels.philox import reference_noise, reference_words
from lightning_nobp.kernels.term_tables import block_table, decay_tensor, device_table, term_tables
from lightning_nobp.kernels.triton_support import tl, triton, use_triton

#: weight dtypes the fused update and the perturbed copy take
FUSED_DTYPES = (torch.bfloat16, torch.float32)
#: elements per block of the twin (its temporaries are a few float32 copies of one block)
TWIN_BLOCK_ELEMENTS = 1 << 18
#: elements per Triton program
KERNEL_BLOCK = 1024
_BF16_MAX = torch.finfo(torch.bfloat16).max


def check_fused_dtype(weight: Tensor) -> None:
    """Raise when ``weight`` is not a contiguous bf16 or float32 tensor (what the kernels take)."""
    if weight.dtype not in FUSED_DTYPES:
        raise TypeError(f"the fused dense update takes bf16 or float32 weights, not {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("the fused dense update takes contiguous weights")


# ----------------------------------------------------------------------------------------------------------------
# reference twin
# ----------------------------------------------------------------------------------------------------------------


def _row_blocks(rows: int, cols: int) -> range:
    """The first row of every twin block."""
    return range(0, rows, max(1, TWIN_BLOCK_ELEMENTS // max(cols, 1)))


def _stream_sum(
    values: Tensor, seeds: Tensor | None, coefficients: Tensor | None, gaussian: bool, start: int
) -> Tensor:
    """``values + sum_m c_m z_m`` over the elements ``start .. start + values.numel() - 1`` of each stream, added in
    the kernel's order (one member after the other)."""
    if seeds is None or coefficients is None:
        return values
    distribution = "gaussian" if gaussian else "rademacher"
    flat = values.view(-1)
    for seed, coefficient in zip(seeds.tolist(), coefficients.tolist()):
        noise = reference_noise(seed, flat.numel(), distribution, flat.device, start)
        flat = flat + torch.tensor(coefficient, dtype=torch.float32) * noise
    return flat.view_as(values)


def _low_rank_sum(values: Tensor, factor_a: Tensor | None, factor_b: Tensor | None) -> Tensor:
    """``values + A B^T`` for a block of rows, one rank after the other (the kernel's order)."""
    if factor_a is None or factor_b is None:
        return values
    factor_a, factor_b = factor_a.float(), factor_b.float()
    for k in range(factor_a.shape[1]):
        values = values + factor_a[:, k : k + 1] * factor_b[:, k].unsqueeze(0)
    return values


def round_to_bf16(values: Tensor, words: Tensor) -> Tensor:
    """Stochastic rounding of float32 ``values`` to bf16: the high 16 bits of each Philox word (``words``: uint32 in
    int64) added below the bf16 mantissa, then the low 16 bits cut (clamped to the largest bf16 first)."""
    clamped = values.clamp(-_BF16_MAX, _BF16_MAX).contiguous()
    bits = clamped.view(torch.int32) + (words >> 16).to(torch.int32)
    return (bits & -65536).view(torch.float32).to(torch.bfloat16)


def nearest_bf16(values: Tensor) -> Tensor:
    """Float32 ``values`` rounded to the nearest bf16 (ties to even) on their bits, as the kernel rounds (torch's own
    cast gives the same for finite values that do not overflow)."""
    bits = values.contiguous().view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def reference_dense_update_(weight: Tensor, terms: UpdateTerms, rounding_seed: int) -> None:
    """The twin of :func:`triton_dense_update_`: the same values, the same rounding, block by block."""
    rows = weight.shape[0] if weight.dim() else 1
    view = weight.view(rows, -1)
    cols = view.shape[1]
    dense = None if terms.dense is None else terms.dense.reshape(rows, cols)
    for first in _row_blocks(rows, cols):
        last = min(rows, first + max(1, TWIN_BLOCK_ELEMENTS // max(cols, 1)))
        start = first * cols
        values = view[first:last].float() * decay_tensor(terms.decay, view.device)[0]
        values = _stream_sum(values, terms.seeds, terms.coefficients, terms.gaussian, start)
        factor_a = None if terms.factor_a is None else terms.factor_a[first:last]
        values = _low_rank_sum(values, factor_a, terms.factor_b)
        if dense is not None:
            values = values + dense[first:last].float()
        if weight.dtype == torch.bfloat16:
            words = reference_words(rounding_seed, values.numel(), values.device, start).view_as(values)
            view[first:last] = round_to_bf16(values, words)
        else:
            view[first:last] = values


def reference_dense_perturbed(weight: Tensor, seeds: Tensor, scales: Tensor, gaussian: bool) -> Tensor:
    """The twin of :func:`triton_dense_perturbed`: ``w + sum_m s_m z_m`` in the weight's dtype (round to nearest)."""
    out = torch.empty_like(weight)
    rows = weight.shape[0] if weight.dim() else 1
    source, target = weight.view(rows, -1), out.view(rows, -1)
    cols = source.shape[1]
    for first in _row_blocks(rows, cols):
        last = min(rows, first + max(1, TWIN_BLOCK_ELEMENTS // max(cols, 1)))
        values = _stream_sum(source[first:last].float(), seeds, scales, gaussian, first * cols)
        target[first:last] = nearest_bf16(values) if weight.dtype == torch.bfloat16 else values
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:
    from lightning_nobp.kernels.philox import _word, noise_at

    @triton.jit
    def _dense_update_kernel(
        w_ptr,
        numel,
        cols,
        decay_ptr,
        seeds_ptr,
        coefficients_ptr,
        members,
        a_ptr,
        b_ptr,
        rank,
        dense_ptr,
        rounding_seed,
        GAUSSIAN: tl.constexpr,
        HAS_DENSE: tl.constexpr,
        TO_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        values = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(decay_ptr)
        for m in range(members):
            seed = tl.load(seeds_ptr + m)
            coefficient = tl.load(coefficients_ptr + m)
            values = values + coefficient * noise_at(seed, offsets, GAUSSIAN)
        row = offsets // cols
        col = offsets % cols
        for k in range(rank):
            a = tl.load(a_ptr + row * rank + k, mask=mask, other=0.0)
            b = tl.load(b_ptr + col * rank + k, mask=mask, other=0.0)
            values = values + a * b
        if HAS_DENSE:
            values = values + tl.load(dense_ptr + offsets, mask=mask, other=0.0)
        if TO_BF16:
            limit = 3.3895313892515355e38  # the largest bf16
            clamped = tl.minimum(tl.maximum(values, -limit), limit)
            random = (_word(rounding_seed, offsets, 4) >> 16).to(tl.int32)
            bits = (clamped.to(tl.int32, bitcast=True) + random) & -65536
            tl.store(w_ptr + offsets, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
        else:
            tl.store(w_ptr + offsets, values, mask=mask)

    @triton.jit
    def _dense_perturbed_kernel(
        w_ptr,
        out_ptr,
        numel,
        seeds_ptr,
        scales_ptr,
        members,
        GAUSSIAN: tl.constexpr,
        TO_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        values = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        for m in range(members):
            seed = tl.load(seeds_ptr + m)
            scale = tl.load(scales_ptr + m)
            values = values + scale * noise_at(seed, offsets, GAUSSIAN)
        if TO_BF16:  # round to nearest even on the bits (the interpreter's own bf16 cast truncates)
            bits = values.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            tl.store(out_ptr + offsets, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
        else:
            tl.store(out_ptr + offsets, values, mask=mask)


if triton is not None:

    @triton.jit
    def _grouped_dense_update_kernel(
        block_weight_ptr,
        first_block_ptr,
        w_addr_ptr,
        numel_ptr,
        cols_ptr,
        decay_addr_ptr,
        members_ptr,
        seeds_ptr,
        coefficients_ptr,
        max_members,
        a_addr_ptr,
        b_addr_ptr,
        rank_ptr,
        dense_addr_ptr,
        rounding_seed_ptr,
        GAUSSIAN: tl.constexpr,
        TO_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """:func:`_dense_update_kernel` for a table of weights of one dtype: program ``p`` updates block
        ``p - first_block[w]`` of weight ``w = block_weight[p]``, with the same arithmetic in the same order."""
        pid = tl.program_id(0)
        w = tl.load(block_weight_ptr + pid)
        local = pid - tl.load(first_block_ptr + w)
        numel = tl.load(numel_ptr + w)
        cols = tl.load(cols_ptr + w)
        offsets = local.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        if TO_BF16:
            w_ptr = tl.load(w_addr_ptr + w).to(tl.pointer_type(tl.bfloat16))
        else:
            w_ptr = tl.load(w_addr_ptr + w).to(tl.pointer_type(tl.float32))
        decay = tl.load(tl.load(decay_addr_ptr + w).to(tl.pointer_type(tl.float32)))
        values = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * decay
        members = tl.load(members_ptr + w)
        for m in range(members):
            seed = tl.load(seeds_ptr + w * max_members + m)
            coefficient = tl.load(coefficients_ptr + w * max_members + m)
            values = values + coefficient * noise_at(seed, offsets, GAUSSIAN)
        rank = tl.load(rank_ptr + w)
        if rank > 0:
            a_ptr = tl.load(a_addr_ptr + w).to(tl.pointer_type(tl.float32))
            b_ptr = tl.load(b_addr_ptr + w).to(tl.pointer_type(tl.float32))
            row = offsets // cols
            col = offsets % cols
            for k in range(rank):
                a = tl.load(a_ptr + row * rank + k, mask=mask, other=0.0)
                b = tl.load(b_ptr + col * rank + k, mask=mask, other=0.0)
                values = values + a * b
        dense_addr = tl.load(dense_addr_ptr + w)
        if dense_addr != 0:
            dense_ptr = dense_addr.to(tl.pointer_type(tl.float32))
            values = values + tl.load(dense_ptr + offsets, mask=mask, other=0.0)
        if TO_BF16:
            limit = 3.3895313892515355e38  # the largest bf16
            clamped = tl.minimum(tl.maximum(values, -limit), limit)
            random = (_word(tl.load(rounding_seed_ptr + w), offsets, 4) >> 16).to(tl.int32)
            bits = (clamped.to(tl.int32, bitcast=True) + random) & -65536
            tl.store(w_ptr + offsets, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)
        else:
            tl.store(w_ptr + offsets, values, mask=mask)


def _on(tensor: Tensor | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    return None if tensor is None else tensor.to(device=device, dtype=dtype).contiguous()


def triton_dense_update_(weight: Tensor, terms: UpdateTerms, rounding_seed: int) -> None:
    """The fused update as one Triton launch (see the module docstring)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use reference_dense_update_)")
    device = weight.device
    numel = weight.numel()
    cols = weight.view(weight.shape[0], -1).shape[1] if weight.dim() else 1
    seeds = _on(terms.seeds, device, torch.int64)
    coefficients = _on(terms.coefficients, device, torch.float32)
    factor_a = _on(terms.factor_a, device, torch.float32)
    factor_b = _on(terms.factor_b, device, torch.float32)
    dense = _on(terms.dense, device, torch.float32)
    decay = decay_tensor(terms.decay, device)
    placeholder = weight  # never read: its loop runs zero times or its flag is off
    _dense_update_kernel[(triton.cdiv(numel, KERNEL_BLOCK),)](
        weight,
        numel,
        cols,
        decay,
        placeholder if seeds is None else seeds,
        placeholder if coefficients is None else coefficients,
        0 if seeds is None else seeds.numel(),
        placeholder if factor_a is None else factor_a,
        placeholder if factor_b is None else factor_b,
        0 if factor_a is None else factor_a.shape[1],
        placeholder if dense is None else dense,
        rounding_seed,
        GAUSSIAN=terms.gaussian,
        HAS_DENSE=dense is not None,
        TO_BF16=weight.dtype == torch.bfloat16,
        BLOCK=KERNEL_BLOCK,
    )


def triton_dense_perturbed(weight: Tensor, seeds: Tensor, scales: Tensor, gaussian: bool) -> Tensor:
    """The perturbed copy as one Triton launch (see the module docstring)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use reference_dense_perturbed)")
    out = torch.empty_like(weight)
    device = weight.device
    seeds_on, scales_on = _on(seeds, device, torch.int64), _on(scales, device, torch.float32)
    _dense_perturbed_kernel[(triton.cdiv(weight.numel(), KERNEL_BLOCK),)](
        weight,
        out,
        weight.numel(),
        seeds_on,
        scales_on,
        seeds.numel(),
        GAUSSIAN=gaussian,
        TO_BF16=weight.dtype == torch.bfloat16,
        BLOCK=KERNEL_BLOCK,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# custom ops: Triton on CUDA, the twin elsewhere, an allocation-free fake for FakeTensorMode
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("lightning_nobp::dense_update_", mutates_args=("weight",))
def _dense_update_op(
    weight: Tensor,
    decay: Tensor,
    seeds: Tensor | None,
    coefficients: Tensor | None,
    gaussian: bool,
    factor_a: Tensor | None,
    factor_b: Tensor | None,
    dense: Tensor | None,
    rounding_seed: int,
) -> None:
    terms = UpdateTerms(decay, seeds, coefficients, gaussian, factor_a, factor_b, dense)
    if use_triton(weight.device):
        triton_dense_update_(weight, terms, rounding_seed)
    else:
        reference_dense_update_(weight, terms, rounding_seed)


@_dense_update_op.register_fake
def _(
    weight: Tensor,
    decay: Tensor,
    seeds: Tensor | None,
    coefficients: Tensor | None,
    gaussian: bool,
    factor_a: Tensor | None,
    factor_b: Tensor | None,
    dense: Tensor | None,
    rounding_seed: int,
) -> None:
    return None  # in place: the kernel allocates nothing


@torch.library.custom_op("lightning_nobp::dense_perturbed", mutates_args=())
def _dense_perturbed_op(weight: Tensor, seeds: Tensor, scales: Tensor, gaussian: bool) -> Tensor:
    if use_triton(weight.device):
        return triton_dense_perturbed(weight, seeds, scales, gaussian)
    return reference_dense_perturbed(weight, seeds, scales, gaussian)


@_dense_perturbed_op.register_fake
def _(weight: Tensor, seeds: Tensor, scales: Tensor, gaussian: bool) -> Tensor:
    return torch.empty_like(weight)


def dense_update_(weight: Tensor, terms: UpdateTerms, rounding_seed: int) -> None:
    """Update a bf16 or float32 weight in place: ``w <- round(decay * w + streams + A B^T + dense)``.

    Args:
        weight: the contiguous bf16 or float32 weight (``[rows, ...]``; ``A`` has ``rows`` rows and ``B`` one row
            per element of a row).
        terms: what to add (coefficients already scaled by the step; ``decay`` a float or a tensor on the weight's
            device).
        rounding_seed: seed of the stochastic rounding's stream (ignored for float32).
    """
    check_fused_dtype(weight)
    _dense_update_op(
        weight,
        decay_tensor(terms.decay, weight.device),
        terms.seeds,
        terms.coefficients,
        terms.gaussian,
        terms.factor_a,
        terms.factor_b,
        terms.dense,
        rounding_seed,
    )


def dense_perturbed(weight: Tensor, seeds: Tensor, scales: Tensor, gaussian: bool) -> Tensor:
    """A perturbed copy ``w + sum_m s_m z_m`` of a bf16 or float32 weight, in its dtype.

    Args:
        weight: the contiguous weight.
        seeds: int64 ``[M]`` Philox seeds of the members' noise streams.
        scales: float32 ``[M]`` each stream's multiplier (sigma times the member's sign).
        gaussian: Gaussian streams (else Rademacher).
    """
    check_fused_dtype(weight)
    return _dense_perturbed_op(weight, seeds, scales, gaussian)


def triton_grouped_dense_update_(weights: list[Tensor], terms: list[UpdateTerms], rounding_seeds: list[int]) -> None:
    """The fused update of several weights of one dtype and one stream distribution in one Triton launch."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use reference_dense_update_)")
    device = weights[0].device
    blocks = block_table([triton.cdiv(w.numel(), KERNEL_BLOCK) for w in weights], device)
    tables = term_tables(terms, rounding_seeds, device)
    _grouped_dense_update_kernel[(blocks.programs,)](
        blocks.block_weight,
        blocks.first_block,
        device_table([w.data_ptr() for w in weights], device),
        device_table([w.numel() for w in weights], device),
        device_table([w.view(w.shape[0], -1).shape[1] if w.dim() else 1 for w in weights], device),
        *tables.arguments(),
        GAUSSIAN=terms[0].gaussian,
        TO_BF16=weights[0].dtype == torch.bfloat16,
        BLOCK=KERNEL_BLOCK,
    )


@torch.library.custom_op("lightning_nobp::grouped_dense_update_", mutates_args=("weights",))
def _grouped_dense_update_op(
    weights: list[Tensor],
    decays: list[Tensor],
    seeds: list[Tensor | None],
    coefficients: list[Tensor | None],
    gaussian: bool,
    factor_a: list[Tensor | None],
    factor_b: list[Tensor | None],
    dense: list[Tensor | None],
    rounding_seeds: list[int],
) -> None:
    terms = [
        UpdateTerms(d, s, c, gaussian, a, b, e)
        for d, s, c, a, b, e in zip(decays, seeds, coefficients, factor_a, factor_b, dense)
    ]
    if use_triton(weights[0].device):
        triton_grouped_dense_update_(weights, terms, rounding_seeds)
        return
    for weight, term, seed in zip(weights, terms, rounding_seeds):
        reference_dense_update_(weight, term, seed)


@_grouped_dense_update_op.register_fake
def _(
    weights: list[Tensor],
    decays: list[Tensor],
    seeds: list[Tensor | None],
    coefficients: list[Tensor | None],
    gaussian: bool,
    factor_a: list[Tensor | None],
    factor_b: list[Tensor | None],
    dense: list[Tensor | None],
    rounding_seeds: list[int],
) -> None:
    return None  # in place: the kernel allocates nothing of the weights' size


def grouped_dense_update_(updates: list[tuple[Tensor, UpdateTerms, int]]) -> int:
    """Update many bf16/float32 weights in place, one launch per (dtype, device, stream distribution) group: each
    weight as :func:`dense_update_` would, with the same arithmetic (the twin runs weight by weight).

    Args:
        updates: ``(weight, terms, rounding seed)`` of every weight.

    Returns:
        How many groups (launches) it took.
    """
    groups: dict[tuple[torch.dtype, torch.device, bool], list[tuple[Tensor, UpdateTerms, int]]] = {}
    for weight, terms, seed in updates:
        check_fused_dtype(weight)
        groups.setdefault((weight.dtype, weight.device, terms.gaussian), []).append((weight, terms, seed))
    for (_, device, gaussian), members in groups.items():
        _grouped_dense_update_op(
            [w for w, _, _ in members],
            [decay_tensor(t.decay, device) for _, t, _ in members],
            [t.seeds for _, t, _ in members],
            [t.coefficients for _, t, _ in members],
            gaussian,
            [t.factor_a for _, t, _ in members],
            [t.factor_b for _, t, _ in members],
            [t.dense for _, t, _ in members],
            [seed for _, _, seed in members],
        )
    return len(groups)
