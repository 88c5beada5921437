"""Which dtype the forward computes in: BF16 where the hardware multiplies it natively, float32 on CPUs that do not.

On a CPU without native BF16 arithmetic (x86 without AVX-512 or AMX, e.g. an AVX2-only AMD EPYC), PyTorch's BF16
matrix products take a slow generic path, many times slower than float32 (the measurements are in
``docs/results.md``). Low-bit weights dequantize to the compute dtype inside
each layer, so there they dequantize to float32: the weights stay stored in low bit, only activations are float32.
"""

from __future__ import annotations

import warnings

import torch


def has_native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies BF16 matrices at full speed (every CUDA device; a CPU with oneDNN BF16)."""
    device = torch.device(device)
    if device.type != "cpu":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_device() -> torch.device:
    """The device a Trainer with the default accelerator picks here: CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_compute_dtype(weights: str, compute_dtype: torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The forward's dtype for ``LowBitPrecision``: the user's, else BF16 where ``device`` has native BF16 or the
    weights are stored in BF16 (``weights="bf16"`` computes in its storage dtype), else float32.

    Warns when the forward will run in BF16 on a CPU without native BF16 (much slower matrix products).

    Args:
        weights: the storage format.
        compute_dtype: the user's choice (``None``: automatic).
        device: the device training will run on.
    """
    fast = has_native_bf16(device)
    chosen = compute_dtype or (torch.bfloat16 if fast or weights == "bf16" else torch.float32)
    if chosen == torch.bfloat16 and not fast:
        hint = (
            "store the weights in low bit (e.g. 'fp8_e4m3'), whose forward then computes in float32"
            if weights == "bf16"
            else "pass compute_dtype=None (float32 here) or torch.float32"
        )
        warnings.warn(
            f"LowBitPrecision({weights!r}) computes in bfloat16 on a CPU without native bf16 arithmetic, where bf16"
            f" matrix products run about 25 times slower than float32: {hint}.",
            stacklevel=3,
        )
    return chosen
