"""A population's attention as one call: the member dimension folded into the batch of the fused kernel.

PyTorch's fused CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no ``vmap`` batching rule,
so under ``torch.func.vmap`` (the population's batched evaluation) it runs once per member, with a "performance
drop" warning, and its math backend is slower still. ``lightning_nobp::attention`` is a custom op whose ``vmap``
rule folds the member dimension into the batch dimension and calls the fused kernel once. Every member's rows are
computed as they would be alone (attention mixes nothing across the batch), so the values do not change.

:class:`MemberAttentionMode` routes ``F.scaled_dot_product_attention`` calls on batched tensors to it during a
batched evaluation on the CPU: ``nn.MultiheadAttention`` (``need_weights=False``), ``nn.TransformerEncoderLayer``
and Hugging Face models with ``attn_implementation="sdpa"``. Calls with dropout go on unchanged (the members must
share their dropout masks, which folding would not keep).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@torch.library.custom_op("lightning_nobp::attention", mutates_args=())
def attention(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None,
    enable_gqa: bool,
) -> Tensor:  # fmt: skip
    """``F.scaled_dot_product_attention`` without dropout (see the module docstring).

    Args:
        query: ``[..., heads, L, E]``.
        key: ``[..., heads, S, E]``.
        value: ``[..., heads, S, Ev]``.
        attn_mask: a mask broadcastable to ``[..., heads, L, S]``, or ``None``.
        is_causal: a causal mask.
        scale: the scores' scale (``None``: ``1 / sqrt(E)``).
        enable_gqa: grouped-query attention (fewer key/value heads).
    """
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


@attention.register_fake
def _(query, key, value, attn_mask, is_causal, scale, enable_gqa):  # type: ignore[no-untyped-def]
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


@attention.register_vmap
def _(info, in_dims, query, key, value, attn_mask, is_causal, scale, enable_gqa):  # type: ignore[no-untyped-def]
    members = info.batch_size
    unbatched = query.dim() - (in_dims[0] is not None)  # one member's query rank

    def leading(tensor: Tensor, dim: int | None, rank: int) -> Tensor:
        """``tensor`` with the member dimension first, at one member's full rank ``rank`` (leading dims of 1
        broadcast by expansion, so the members can be folded into the batch)."""
        tensor = tensor.movedim(dim, 0) if dim is not None else tensor.unsqueeze(0).expand(members, *tensor.shape)
        while tensor.dim() < rank + 1:
            tensor = tensor.unsqueeze(1)
        return tensor

    q, k, v = (leading(t, d, unbatched) for t, d in zip((query, key, value), in_dims[:3]))
    batch = q.shape[1:-3] if unbatched >= 4 else ()
    mask = None
    if attn_mask is not None:
        mask = leading(attn_mask, in_dims[3], unbatched)
        mask = mask.expand(members, *batch, *mask.shape[-3:]) if unbatched >= 4 else mask

    def folded(tensor: Tensor) -> Tensor:
        return tensor.reshape(-1, *tensor.shape[-3:]) if unbatched >= 3 else tensor

    out = attention(folded(q), folded(k), folded(v), None if mask is None else folded(mask), is_causal, scale,
                    enable_gqa)  # fmt: skip
    return out.reshape(members, *batch, *out.shape[-3:]) if unbatched >= 4 else out, 0


class MemberAttentionMode(TorchFunctionMode):
    """Send ``F.scaled_dot_product_attention`` on a population's batched tensors (no dropout) to
    :func:`attention`, whose ``vmap`` rule runs the fused kernel once for all members."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = dict(zip(_ARGUMENTS, args), **kwargs)
            query = bound["query"]
            if bound.get("dropout_p", 0.0) == 0.0 and torch._C._functorch.is_functorch_wrapped_tensor(query):
                return attention(
                    query, bound["key"], bound["value"], bound.get("attn_mask"), bool(bound.get("is_causal", False)),
                    bound.get("scale"), bool(bound.get("enable_gqa", False)),
                )  # fmt: skip
        return func(*args, **kwargs)
