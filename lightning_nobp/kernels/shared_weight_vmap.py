"""The ``vmap`` rule of the quantized linear ops: a chunk of population members shares the weight, so their rows fold
into one matmul (each row quantized on its own, so batching changes no value)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def register_shared_weight_vmap(op: Any, name: str) -> None:
    """Give ``op(x, qdata, scale, bias)`` its batching rule: batched ``x`` folds into the rows, a batched bias is added
    per member; a batched weight is refused.

    Args:
        op: a ``torch.library`` custom op taking ``(x, qdata, scale, bias)``.
        name: the op's name, for the error message.
    """

    @op.register_vmap
    def _(info, in_dims, x: Tensor, qdata: Tensor, scale: Tensor, bias: Tensor | None):  # type: ignore[no-untyped-def]
        x_dim, qdata_dim, scale_dim, bias_dim = in_dims
        if qdata_dim is not None or scale_dim is not None:
            raise NotImplementedError(f"{name} under vmap: the members share the weight (a batched one is not stored)")
        # only the bias varies: the shared product once, each member's bias added
        x = x.unsqueeze(0).expand(info.batch_size, *x.shape) if x_dim is None else x.movedim(x_dim, 0)
        if bias_dim is None:
            return op(x, qdata, scale, bias), 0
        batched_bias = bias.movedim(bias_dim, 0)  # type: ignore[union-attr]
        out = op(x, qdata, scale, None)
        return out + batched_bias.view(batched_bias.shape[0], *([1] * (out.dim() - 2)), -1).to(out.dtype), 0
