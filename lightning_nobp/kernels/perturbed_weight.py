"""The perturbed value of a low-bit weight, ``dequantize(w) + sum_m c_m z_m``, as a Triton kernel and its twin.

The stored weight is only read: the perturbed copy (in the compute dtype) lives for one layer's forward and the
noise is regenerated from its seeds inside the kernel, never written to storage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_grids import BLOCK_KINDS, BLOCK_SIZES
from lightning_nobp.kernels.lowbit_update import KIND_CODES, LowBitLayout, reference_dequantize
from lightning_nobp.kernels.philox import reference_noise
from lightning_nobp.kernels.triton_support import tl, triton, use_triton

if triton is not None:
    from lightning_nobp.kernels.lowbit_update import _decode_e2m1, _pow2
    from lightning_nobp.kernels.philox import noise_at

    @triton.jit
    def _perturbed_weight_kernel(
        q_ptr, scale_ptr, per_tensor_scale, seeds_ptr, coefs_ptr, M, out_ptr, numel, K,
        KIND: tl.constexpr, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        offsets = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
        mask = offsets < numel
        rows = offsets // K
        if KIND < 2:
            q = tl.where(mask, tl.load(q_ptr + offsets, mask=mask).to(tl.float32), 0.0)
            values = q * tl.load(scale_ptr + rows, mask=mask, other=1.0)
        else:
            packed = tl.load(q_ptr + offsets // 2, mask=mask, other=0).to(tl.int32)
            codes = (packed >> ((offsets % 2) * 4).to(tl.int32)) & 0xF
            scale_at = rows * (K // BLOCK) + (offsets % K) // BLOCK
            if KIND == 2:
                block_scale = tl.where(mask, tl.load(scale_ptr + scale_at, mask=mask).to(tl.float32), 1.0)
                block_scale = block_scale * per_tensor_scale
            else:
                exponent = tl.maximum(tl.load(scale_ptr + scale_at, mask=mask, other=127).to(tl.int32), 1)
                block_scale = _pow2(exponent - 127)
            values = _decode_e2m1(codes) * block_scale
        for m in range(M):
            values += tl.load(coefs_ptr + m) * noise_at(tl.load(seeds_ptr + m), offsets, GAUSSIAN)
        tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=mask)


def reference_perturbed_weight(
    layout: LowBitLayout, seeds: list[int], coefficients: list[float], gaussian: bool, dtype: torch.dtype
) -> Tensor:
    """The reference twin of :func:`perturbed_weight`."""
    values = reference_dequantize(layout)
    distribution = "gaussian" if gaussian else "rademacher"
    for seed, coefficient in zip(seeds, coefficients):
        values.view(-1).add_(reference_noise(seed, values.numel(), distribution, layout.device), alpha=coefficient)
    return values.to(dtype)


def triton_perturbed_weight(
    layout: LowBitLayout, seeds: list[int], coefficients: list[float], gaussian: bool, dtype: torch.dtype
) -> Tensor:
    """Run the Triton kernel of :func:`perturbed_weight` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed: pip install triton (or use reference_perturbed_weight)")
    device = layout.device
    out = torch.empty(layout.rows, layout.cols, dtype=dtype, device=device)
    seed_tensor = torch.tensor(seeds or [0], dtype=torch.int64, device=device)
    coef_tensor = torch.tensor(coefficients or [0.0], dtype=torch.float32, device=device)
    scale = layout.scale.view(torch.uint8) if layout.kind == "mxfp4" else layout.scale
    per_tensor = float(layout.per_tensor_scale) if layout.per_tensor_scale is not None else 1.0
    tile = 1024
    numel = out.numel()
    _perturbed_weight_kernel[(triton.cdiv(numel, tile),)](
        layout.qdata, scale.reshape(-1), per_tensor, seed_tensor, coef_tensor, len(seeds), out, numel, layout.cols,
        KIND=KIND_CODES[layout.kind], BLOCK=BLOCK_SIZES.get(layout.kind, 1), GAUSSIAN=gaussian, TILE=tile,
    )  # fmt: skip
    return out


def perturbed_weight(
    layout: LowBitLayout,
    seeds: list[int],
    coefficients: list[float],
    gaussian: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """``dequantize(w) + sum_m coefficients[m] * z(seeds[m])`` as a new ``[rows, cols]`` tensor of ``dtype``.

    Triton on CUDA, the reference elsewhere. ``w`` is not written.

    Args:
        layout: the stored weight's inner tensors.
        seeds: Philox seeds of the noise streams (element ``i`` at offset ``i``).
        coefficients: the scale of each stream (e.g. ``sigma * sign``).
        gaussian: Gaussian streams (else Rademacher).
        dtype: the dtype of the result (the compute dtype).
    """
    if layout.kind in BLOCK_KINDS and layout.cols % BLOCK_SIZES[layout.kind]:
        raise ValueError(f"{layout.kind} needs a column count divisible by {BLOCK_SIZES[layout.kind]}")
    if use_triton(layout.device):
        return triton_perturbed_weight(layout, seeds, coefficients, gaussian, dtype)
    return reference_perturbed_weight(layout, seeds, coefficients, gaussian, dtype)
