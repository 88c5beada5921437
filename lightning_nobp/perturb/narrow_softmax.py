"""A faster ``log_softmax`` over a narrow last dimension on the CPU, for the population's loss evaluations.

PyTorch's CPU ``log_softmax`` over the last dimension runs a vectorized kernel per row; a row narrower than one
SIMD vector (10 classes against 16 floats of AVX-512) falls to a slow path. Moving the classes to the first
dimension and normalizing there is several times faster for the population's logits, a noticeable part of a small
model's EggRoll step (``python benchmarks/micro/narrow_softmax.py`` measures it; figures in ``docs/results.md``).

``NarrowSoftmaxMode`` is a ``TorchFunctionMode`` that rewrites ``F.cross_entropy`` (class-index targets, no label
smoothing) and ``log_softmax`` over such a dimension into the transposed form while the strategy evaluates its
population. The result is the same function; values agree to float32 rounding. Everything else passes through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: widest last dimension that takes the transposed path (narrower than one AVX-512 vector of float32)
NARROW = 15

_LOG_SOFTMAX = {F.log_softmax, torch.log_softmax, Tensor.log_softmax}


def _is_narrow(tensor: object, dim: int) -> bool:
    return (
        isinstance(tensor, Tensor)
        and tensor.device.type == "cpu"
        and tensor.dtype in (torch.float32, torch.float64)
        and tensor.dim() >= 2
        and dim in (-1, tensor.dim() - 1)
        and 1 < tensor.shape[-1] <= NARROW
    )


def transposed_log_softmax(logits: Tensor) -> Tensor:
    """``log_softmax(logits, -1)`` computed with the last dimension moved first (same values, other strides)."""
    return torch.log_softmax(logits.movedim(-1, 0).contiguous(), 0).movedim(0, -1)


def narrow_cross_entropy(args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """The fast form of ``F.cross_entropy(*args, **kwargs)``, or ``None`` when the call is not the narrow case."""
    names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
    bound = dict(zip(names, args)) | kwargs
    logits, target = bound.get("input"), bound.get("target")
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        return None
    if bound.get("label_smoothing", 0.0) != 0.0 or not isinstance(target, Tensor) or target.is_floating_point():
        return None
    if not (_is_narrow(logits, -1) and logits.dim() == 2):
        return None
    log_probs = transposed_log_softmax(logits)
    weight, ignore_index = bound.get("weight"), bound.get("ignore_index", -100)
    reduction = bound.get("reduction", "mean")
    if reduction == "none" and target.dim() == 1:
        return picked_negative_log_probs(log_probs, target, weight, ignore_index)
    return F.nll_loss(log_probs, target, weight=weight, ignore_index=ignore_index, reduction=reduction)


def picked_negative_log_probs(
    log_probs: Tensor, target: Tensor, weight: Tensor | None = None, ignore_index: int = -100
) -> Tensor:
    """``F.nll_loss(log_probs, target, weight, ignore_index=ignore_index, reduction="none")`` for 2-D ``log_probs``,
    as a gather: the same values, bit for bit. Under ``torch.func.vmap`` (the population's evaluation)
    ``nll_loss`` runs a Python decomposition (slow enough to show in a small model's step);
    ``gather`` has a native batching rule.

    Args:
        log_probs: ``(N, C)`` log-probabilities.
        target: ``(N,)`` class indices.
        weight: ``(C,)`` class weights, or ``None``.
        ignore_index: rows whose target equals it give 0.
    """
    kept = target != ignore_index
    safe = target.where(kept, 0)
    picked = log_probs.gather(1, safe.unsqueeze(1)).squeeze(1).neg()
    if weight is not None:
        picked = picked * weight[safe]
    return picked.where(kept, 0.0)


def _log_softmax(args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """The fast form of ``log_softmax(input, dim)``, or ``None`` when the call is not the narrow case."""
    bound = dict(zip(("input", "dim", "_stacklevel", "dtype"), args)) | kwargs
    if bound.get("dtype") is not None or set(bound) - {"input", "dim", "_stacklevel", "dtype"}:
        return None  # a dtype conversion: leave it to PyTorch
    logits, dim = bound.get("input"), bound.get("dim")
    if not isinstance(dim, int) or not _is_narrow(logits, dim):
        return None
    return transposed_log_softmax(logits)


def narrow_softmax_call(func: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)``, in the fast form where it is a narrow ``F.cross_entropy`` or ``log_softmax``."""
    fast: Tensor | None = None
    if func is F.cross_entropy:
        fast = narrow_cross_entropy(args, kwargs)
    elif func in _LOG_SOFTMAX:
        fast = _log_softmax(args, kwargs)
    return fast if fast is not None else func(*args, **kwargs)


class NarrowSoftmaxMode(TorchFunctionMode):
    """Routes ``F.cross_entropy`` and ``log_softmax`` over a last dimension of 2 to 15 entries (CPU, float) to
    :func:`transposed_log_softmax`; every other call runs unchanged."""

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        return narrow_softmax_call(func, args, kwargs or {})
