"""``x W^T + b`` on an int8 weight's stored data: activations quantized per row, one ``torch._int_mm``.

The weight is torchao's ``Int8Tensor`` (symmetric, one scale per row), read as it is stored: ``qdata`` and
``scale``. The activation's rows are quantized to int8 with one scale each (``amax / 127``, round to nearest), the
product of the codes runs as one integer matmul with int32 accumulation (int8 tensor cores on a GPU; exact on the
CPU as well), and the two row scales are applied to its output. Nothing of the weight's size is formed.

``lightning_nobp::int8_linear`` is a ``torch.library`` custom op with a fake implementation and a ``vmap`` rule, as
``lightning_nobp::fp8_linear``: a chunk of population members sharing the weight folds its member dimension into
the rows (each row quantized on its own, so batching changes no value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_nobp.kernels.shared_weight_vmap import register_shared_weight_vmap
from lightning_nobp.lowbit.formats import Int8Tensor

INT8_MAX = 127.0
#: ``torch._int_mm`` on CUDA needs more than 16 rows; shorter inputs are padded to this many
CUDA_MIN_ROWS = 17


def quantize_rows_int8(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric rowwise int8 quantization of a 2-D activation: ``(codes, scales [M, 1] float32)`` with
    ``rows ~= codes * scales`` (rounded to nearest, clamped to +-127 before the cast).

    Args:
        rows: ``[M, K]`` floating activations.
    """
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scales = amax.clamp_min_(1e-12).div_(INT8_MAX)
    codes = torch.div(rows, scales).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)  # float32 division
    return codes, scales


def integer_product(codes: Tensor, qdata: Tensor) -> Tensor:
    """``codes @ qdata^T`` accumulated exactly in int32 (``torch._int_mm``; on CUDA, inputs of at most 16 rows are
    zero-padded to the 17 it needs).

    Args:
        codes: ``[M, K]`` int8 activation codes.
        qdata: ``[N, K]`` int8 weight codes.
    """
    rows = codes.shape[0]
    if codes.is_cuda and rows < CUDA_MIN_ROWS:
        padded = F.pad(codes, (0, 0, 0, CUDA_MIN_ROWS - rows))
        return torch._int_mm(padded, qdata.t())[:rows]
    return torch._int_mm(codes, qdata.t())


def rowwise_int8_linear(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T + b`` with ``W = scale * qdata`` (int8 rows), ``x`` quantized per row: one integer matmul over all
    leading dimensions of ``x``, scaled by both rows' scales in float32. The computation of the
    ``lightning_nobp::int8_linear`` op, called directly where nothing needs the op.

    Args:
        x: ``[..., K]`` activations (bf16, fp16 or float32; the output has their dtype).
        qdata: the weight's int8 codes ``[N, K]`` (contiguous, as torchao stores them).
        scale: the weight's row scales ``[N, 1]``.
        bias: ``[N]`` or ``None``.
    """
    codes, scales = quantize_rows_int8(x.reshape(-1, x.shape[-1]))
    out = integer_product(codes, qdata).float().mul_(scales).mul_(scale.float().t())
    if bias is not None:
        out = out.add_(bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], qdata.shape[0])


int8_linear = torch.library.custom_op("lightning_nobp::int8_linear", rowwise_int8_linear, mutates_args=())


@int8_linear.register_fake
def _(x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


register_shared_weight_vmap(int8_linear, "int8_linear")


def takes_int8_linear(weight: Tensor, x: Tensor) -> bool:
    """Whether ``F.linear(x, weight)`` runs as :func:`int8_linear`: a symmetric ``Int8Tensor`` with row scales,
    whose activations are quantized (asked for at conversion, or the input is on a GPU, where int8 tensor cores
    make it the fast path), and a floating input of the weight's width."""
    if not isinstance(weight, Int8Tensor):
        return False
    qdata = weight.qdata
    if qdata.dim() != 2 or weight.zero_point is not None:
        return False
    rows, cols = qdata.shape
    if tuple(weight.scale.shape) != (rows, 1):
        return False
    wanted = getattr(weight, "act_quant_kwargs", None) is not None or x.is_cuda
    if not wanted or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.shape[-1] != cols:
        return False
    if x.is_cuda:  # cuBLASLt's int8 matmul takes widths in multiples of 8
        return rows % 8 == 0 and cols % 8 == 0
    return True
