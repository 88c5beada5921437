"""Which matmul a linear layer on low-bit weights runs: FP8 (``torch._scaled_mm``) or int8 (``torch._int_mm``) on
the stored data, with the activations quantized per row, or the layer's own ``F.linear``.

The population's member layers ask :func:`shared_weight_linear` for the shared product ``x W^T + b``; plain forwards
(validation, testing, inference) reach the same ops through :class:`LowBitLinearMode`, which ``LowBitPrecision``
enters around every forward. The weights stay torchao's own tensors either way.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_nobp.kernels.fp8_linear import fp8_linear, rowwise_fp8_linear, takes_fp8_linear
from lightning_nobp.kernels.int8_linear import int8_linear, rowwise_int8_linear, takes_int8_linear


def shared_weight_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
    """``x W^T + b`` on a low-bit weight's stored data (the ``lightning_nobp`` op, whose ``vmap`` rule folds a
    batched population's members into the rows), or ``None`` where the weight takes no such path.

    Args:
        x: ``[..., K]`` activations.
        weight: the layer's weight (a torchao tensor or a plain one).
        bias: the layer's bias or ``None``.
    """
    if takes_fp8_linear(weight, x):
        return fp8_linear(x, weight.qdata, weight.scale, bias)
    if takes_int8_linear(weight, x):
        return int8_linear(x, weight.qdata, weight.scale, bias)
    return None


class LowBitLinearMode(TorchFunctionMode):
    """Route ``F.linear`` on FP8 (e4m3, row scales) and int8 (symmetric, row scales) weights to the quantized
    matmuls where :func:`~lightning_nobp.kernels.fp8_linear.takes_fp8_linear` or
    :func:`~lightning_nobp.kernels.int8_linear.takes_int8_linear` holds, so a plain forward of a converted model
    runs the same matmul as the population; every other call goes on unchanged."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            batched = torch._C._functorch.is_functorch_wrapped_tensor(x)  # under vmap: the ops and their rules
            if takes_fp8_linear(weight, x):
                run = fp8_linear if batched else rowwise_fp8_linear  # eager: no dispatcher round trip
                return run(x, weight.qdata, weight.scale, bias)
            if takes_int8_linear(weight, x):
                run = int8_linear if batched else rowwise_int8_linear
                return run(x, weight.qdata, weight.scale, bias)
        return func(*args, **kwargs)
