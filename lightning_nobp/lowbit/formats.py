"""Low-bit weight formats stored in torchao's own tensor subclasses, and the kernel view of their inner tensors.

| format | torchao class | inner tensors | bytes per weight |
| --- | --- | --- | --- |
| ``fp8_e4m3`` | ``Float8Tensor`` | e4m3 ``qdata [N, K]``, fp32 power-of-two row ``scale [N, 1]`` | 1 + 4/K |
| ``int8`` | ``Int8Tensor`` | int8 ``qdata [N, K]`` (within +-127), fp32 power-of-two row ``scale [N, 1]`` | 1 + 4/K |
| ``nvfp4`` | ``NVFP4Tensor`` | e2m1 ``qdata [N, K/2]``, e4m3 ``scale [N, K/16]`` unswizzled, fp32 scalar | 0.5 + 1/16 |
| ``mxfp4`` | ``MXTensor`` | e2m1 packed ``qdata [N, K/2]``, e8m0 ``scale [N, K/32]`` (emulated kernels) | 0.5 + 1/32 |

No class of our own is needed: every torchao class above holds its format and runs ``F.linear`` on CPU and on
Hopper (``MXTensor`` and ``NVFP4Tensor`` through their emulated / dequantizing paths, with unswizzled scales).
Our kernels write ``qdata`` and ``scale`` in place.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_grids import BLOCK_SIZES
from lightning_nobp.kernels.lowbit_update import LowBitLayout, quantize_into

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CUDA-only extensions; the subclasses are Python


def _quietly_import_torchao() -> None:
    """Import torchao without its import-time log lines (skipped C++ extensions, pytree Enum notices)."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torchao.quantization")
        importlib.import_module("torchao.prototype.mx_formats.nvfp4_tensor")
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_quietly_import_torchao()

from torchao.prototype.mx_formats.mx_tensor import MXTensor, QuantizeTensorToMXKwargs  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor  # noqa: E402
from torchao.float8.inference import Float8MMConfig  # noqa: E402
from torchao.quantization import Float8Tensor, Int8Tensor  # noqa: E402
from torchao.quantization.granularity import PerRow  # noqa: E402
from torchao.quantization.quantize_.common import KernelPreference  # noqa: E402
from torchao.quantization.quantize_.workflows.float8.float8_tensor import QuantizeTensorToFloat8Kwargs  # noqa: E402
from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs  # noqa: E402

#: formats of ``LowBitPrecision(weights=...)``; ``int8_lattice`` stores like ``int8`` and moves by grid steps
FORMATS = ("fp8_e4m3", "int8", "int8_lattice", "nvfp4", "mxfp4", "bf16")
STORAGE_KIND = {"fp8_e4m3": "fp8_e4m3", "int8": "int8", "int8_lattice": "int8", "nvfp4": "nvfp4", "mxfp4": "mxfp4"}
LOW_BIT_CLASSES = (Float8Tensor, Int8Tensor, NVFP4Tensor, MXTensor)
NVFP4_SCALE_HEADROOM = 6  # block scales up to 2^6 x the initial largest one stay exact in e4m3


def check_format(name: str) -> str:
    """Return ``name`` if it is a known format, else raise a ``ValueError`` listing the valid ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown low-bit weight format {name!r}: choose one of {', '.join(map(repr, FORMATS))}")
    return name


def block_size_of(name: str) -> int:
    """The number of weights along K that share one scale in format ``name`` (1 for row formats)."""
    return BLOCK_SIZES.get(STORAGE_KIND.get(name, name), 1)


def is_low_bit(tensor: object) -> bool:
    """Whether ``tensor`` is one of the torchao low-bit subclasses this package trains."""
    return isinstance(tensor, LOW_BIT_CLASSES)


def _empty_layout(
    kind: str, rows: int, cols: int, device: torch.device, per_tensor_scale: Tensor | None
) -> LowBitLayout:
    if kind == "fp8_e4m3":
        return LowBitLayout(kind, torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=device),
                            torch.ones(rows, 1, device=device))  # fmt: skip
    if kind == "int8":
        return LowBitLayout(kind, torch.empty(rows, cols, dtype=torch.int8, device=device),
                            torch.ones(rows, 1, device=device))  # fmt: skip
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=device)
    if kind == "nvfp4":
        scale = torch.ones(rows, cols // 16, dtype=torch.float8_e4m3fn, device=device)
        return LowBitLayout(kind, packed, scale, per_tensor_scale)
    scale = torch.full((rows, cols // 32), 127, dtype=torch.uint8, device=device).view(torch.float8_e8m0fnu)
    return LowBitLayout(kind, packed, scale)


def nvfp4_per_tensor_scale(weight: Tensor) -> Tensor:
    """A power-of-two per-tensor scale leaving ``2^NVFP4_SCALE_HEADROOM`` of growth to the e4m3 block scales."""
    amax = float(weight.detach().abs().max().float())
    exponent = (torch.tensor(max(amax, 1e-30)) / 6.0).log2().ceil().item() if amax > 0 else 0.0
    return torch.tensor(2.0 ** (int(exponent) - 8 + NVFP4_SCALE_HEADROOM), dtype=torch.float32, device=weight.device)


def quantize_weight(
    weight: Tensor, name: str, compute_dtype: torch.dtype = torch.bfloat16, activation_quantization: bool = False
) -> Tensor:
    """Round a 2-D weight to format ``name`` (to nearest, power-of-two scales) and wrap it in its torchao class.

    Args:
        weight: the floating-point ``[N, K]`` weight.
        name: ``"fp8_e4m3"``, ``"int8"``, ``"int8_lattice"``, ``"nvfp4"`` or ``"mxfp4"``.
        compute_dtype: the dtype the weight dequantizes to in the forward.
        activation_quantization: fp8 and int8: quantize activations per row too, so ``F.linear`` runs
            ``torch._scaled_mm`` (fast on GPUs with fp8 tensor cores, slow on CPU).
    """
    kind = STORAGE_KIND[check_format(name)]
    if weight.dim() != 2:
        raise ValueError(f"low-bit storage holds 2-D weights; got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    values = weight.detach().float()
    per_tensor = nvfp4_per_tensor_scale(values) if kind == "nvfp4" else None
    layout = _empty_layout(kind, rows, cols, weight.device, per_tensor)
    quantize_into(layout, values, torch.full_like(values, 0.5))
    return wrap_layout(layout, compute_dtype, activation_quantization)


def wrap_layout(layout: LowBitLayout, compute_dtype: torch.dtype, activation_quantization: bool = False) -> Tensor:
    """The torchao tensor holding ``layout``'s inner tensors (no copy)."""
    cols = layout.cols
    if layout.kind == "fp8_e4m3":
        act = QuantizeTensorToFloat8Kwargs(granularity=PerRow()) if activation_quantization else None
        # torch._scaled_mm (quantized activations) needs a matrix-product configuration: torchao's default one
        mm_config = Float8MMConfig(use_fast_accum=True) if activation_quantization else None
        return Float8Tensor(
            layout.qdata, layout.scale, block_size=[1, cols], mm_config=mm_config, act_quant_kwargs=act,
            dtype=compute_dtype,
        )  # fmt: skip
    if layout.kind == "int8":
        act = QuantizeTensorToInt8Kwargs(granularity=PerRow()) if activation_quantization else None
        return Int8Tensor(layout.qdata, layout.scale, block_size=[1, cols], dtype=compute_dtype, act_quant_kwargs=act)
    if layout.kind == "nvfp4":
        return NVFP4Tensor(layout.qdata, layout.scale, 16, compute_dtype, per_tensor_scale=layout.per_tensor_scale)
    act = QuantizeTensorToMXKwargs(
        elem_dtype=torch.float4_e2m1fn_x2, block_size=32, kernel_preference=KernelPreference.EMULATED
    )
    return MXTensor(layout.qdata, layout.scale, torch.float4_e2m1fn_x2, 32, compute_dtype,
                    KernelPreference.EMULATED, act, False)  # fmt: skip


def layout_of(tensor: Tensor) -> LowBitLayout:
    """The kernel view of a torchao low-bit weight's inner tensors (the same storage, written in place).

    Raises:
        ValueError: for layouts the kernels do not write (per-tensor or grouped fp8 scales, asymmetric int8,
            swizzled scales, fp8/fp6 MX elements), naming what is supported.
    """
    if tensor.dim() != 2:
        raise ValueError(f"low-bit weights must be 2-D, got {tuple(tensor.shape)}")
    rows, cols = tensor.shape
    supported = (
        "supported: Float8Tensor e4m3 with per-row scales, Int8Tensor symmetric per-row, NVFP4Tensor and"
        " MXTensor (fp4) with unswizzled scales; convert with lightning_nobp.LowBitPrecision(weights=...)"
    )
    if isinstance(tensor, Float8Tensor):
        if tensor.qdata.dtype != torch.float8_e4m3fn or tuple(tensor.scale.shape) != (rows, 1):
            raise ValueError(f"Float8Tensor {tensor.qdata.dtype} with scale {tuple(tensor.scale.shape)}: {supported}")
        return LowBitLayout("fp8_e4m3", tensor.qdata, tensor.scale)
    if isinstance(tensor, Int8Tensor):
        zero_point = getattr(tensor, "zero_point", None)
        if tuple(tensor.scale.shape) != (rows, 1) or (zero_point is not None and bool((zero_point != 0).any())):
            raise ValueError(f"Int8Tensor with scale {tuple(tensor.scale.shape)} or a zero point: {supported}")
        return LowBitLayout("int8", tensor.qdata, tensor.scale)
    if isinstance(tensor, NVFP4Tensor):
        if tensor.is_swizzled_scales or tensor.block_size != 16:
            raise ValueError(f"NVFP4Tensor with swizzled scales: {supported}")
        return LowBitLayout("nvfp4", tensor.qdata, tensor.scale, tensor.per_tensor_scale)
    if isinstance(tensor, MXTensor):
        if tensor.is_swizzled_scales or tensor.elem_dtype != torch.float4_e2m1fn_x2 or tensor.block_size != 32:
            raise ValueError(f"MXTensor {tensor.elem_dtype} / swizzled scales: {supported}")
        return LowBitLayout("mxfp4", tensor.qdata, tensor.scale)
    raise ValueError(f"{type(tensor).__name__} is not a low-bit weight: {supported}")


def inner_tensors(tensor: Tensor) -> dict[str, Tensor]:
    """The plain tensors a torchao subclass stores (``qdata``, ``scale``, ...), by name."""
    names, _ = tensor.__tensor_flatten__()
    return {name: getattr(tensor, name) for name in names if getattr(tensor, name, None) is not None}
