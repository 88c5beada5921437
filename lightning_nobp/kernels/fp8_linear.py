"""``x W^T + b`` on an FP8 weight's stored data: activations quantized per row, one ``torch._scaled_mm``.

The weight is torchao's ``Float8Tensor`` (e4m3, one scale per row), read as it is stored: ``qdata`` and ``scale``.
The activation's rows are quantized to e4m3 with one power-free scale each (``amax / 448``), and the product runs
as one rowwise-scaled FP8 matmul (tensor cores on a GPU; ``torch._scaled_mm`` also runs on the CPU). Nothing of
the weight's size is formed.

Embedding lookups read the looked-up rows only (:func:`fp8_rows`). Plain forwards (validation, testing, inference)
reach the same op through :class:`~lightning_nobp.kernels.lowbit_linear.LowBitLinearMode`, which ``LowBitPrecision``
enters around every forward.

``lightning_nobp::fp8_linear`` is a ``torch.library`` custom op with a fake implementation and a ``vmap`` rule: a
chunk of population members sharing the weight folds its member dimension into the rows, so the whole chunk is one
matmul with ``M = members x tokens`` (each row quantized on its own, so batching changes no value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.kernels.shared_weight_vmap import register_shared_weight_vmap
from lightning_nobp.lowbit.formats import Float8Tensor

E4M3_MAX = 448.0


def quantize_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Rowwise e4m3 quantization of a 2-D activation: ``(codes, scales [M, 1] float32)`` with
    ``rows ~= codes * scales`` (clamped before the cast, so nothing overflows).

    Args:
        rows: ``[M, K]`` floating activations.
    """
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scales = amax.clamp_min_(1e-12).div_(E4M3_MAX)
    codes = torch.div(rows, scales).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # float32 division
    return codes, scales


def rowwise_fp8_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` with ``W = scale * qdata`` (e4m3 rows), ``x`` quantized per row: one rowwise-scaled FP8
    matmul over all leading dimensions of ``x``. The computation of the ``lightning_nobp::fp8_linear`` op, called
    directly where nothing needs the op (a plain eager forward: no dispatcher round trip).

    Args:
        x: ``[..., K]`` activations (bf16 or float32; the output has their dtype).
        qdata: the weight's e4m3 codes ``[N, K]`` (contiguous, as torchao stores them).
        scale: the weight's float32 row scales ``[N, 1]``.
        bias: ``[N]`` or ``None``.
    """
    codes, scales = quantize_rows(x.reshape(-1, x.shape[-1]))
    # rowwise scaling produces bf16 on CUDA; the CPU takes the input's dtype directly
    out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
    out = torch._scaled_mm(
        codes,
        qdata.t(),
        scale_a=scales,
        scale_b=scale.float().t(),  # [1, N]: a view of torchao's [N, 1] float32 scales
        bias=bias if bias is None or bias.dtype == out_dtype else bias.to(out_dtype),
        out_dtype=out_dtype,
    )
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out.reshape(*x.shape[:-1], qdata.shape[0])


fp8_linear = torch.library.custom_op("lightning_nobp::fp8_linear", rowwise_fp8_linear, mutates_args=())


@fp8_linear.register_fake
def _(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


register_shared_weight_vmap(fp8_linear, "fp8_linear")


def takes_fp8_linear(weight: Tensor, x: Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` runs as :func:`fp8_linear`: an e4m3 ``Float8Tensor`` with row scales, whose
    activations are quantized (asked for at conversion, or the input is on a GPU, where FP8 tensor cores make it
    the fast path), and a floating input of the weight's width."""
    if Float8Tensor is None or not isinstance(weight, Float8Tensor):
        return False
    qdata = weight.qdata  # the stored tensors' own shapes: a subclass's properties go through __torch_function__
    rows, cols = qdata.shape
    if qdata.dtype != torch.float8_e4m3fn or tuple(weight.scale.shape) != (rows, 1):
        return False
    wanted = getattr(weight, "act_quant_kwargs", None) is not None or x.is_cuda
    if not wanted or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1] != cols:
        return False
    if x.is_cuda:  # FP8 tensor cores (compute capability 8.9 and newer) take sizes in multiples of 16
        return rows % 16 == 0 and cols % 16 == 0 and _has_fp8_tensor_cores(x.device)
    return True


_FP8_DEVICES: dict[torch.device, bool] = {}


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether a CUDA device runs FP8 matmuls (Ada, Hopper and newer), asked once per device."""
    if device not in _FP8_DEVICES:
        _FP8_DEVICES[device] = torch.cuda.get_device_capability(device) >= (8, 9)
    return _FP8_DEVICES[device]


def fp8_row_lookup(weight: Tensor, module: torch.nn.Module) -> bool:
    """Whether an ``nn.Embedding``'s lookup can read an e4m3 row-scaled ``Float8Tensor`` row by row (no
    ``max_norm``, which rewrites the table)."""
    return (
        isinstance(weight, Float8Tensor)
        and weight.qdata.dtype == torch.float8_e4m3fn
        and tuple(weight.scale.shape) == (weight.shape[0], 1)
        and getattr(module, "max_norm", None) is None
    )


def fp8_rows(weight: Tensor, indices: Tensor) -> Tensor:
    """The rows ``indices`` of an FP8 table, dequantized in the weight's dtype (``qdata[i] * scale[i]``): what
    ``F.embedding`` returns, without dequantizing the whole table first."""
    return (weight.qdata[indices].float() * weight.scale[indices].float()).to(weight.dtype)
