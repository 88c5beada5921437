"""A bound on each step's change of each tensor, relative to the tensor: backprop-tuned learning rates stay stable.

A forward-only estimate of the gradient of ``d`` weights has about ``sqrt(d)`` times the gradient's norm (its
direction is mostly noise), so a learning rate tuned for backpropagation, applied to it by SGD, moves the weights
by far more than their own size and the run diverges. The step limit scales the step of every tensor ``w`` so that
its change stays within ``limit * max(||w||, NORM_FLOOR * sqrt(numel))`` (a trust ratio, as LARS and LAMB bound
layers' steps); a step already within the bound is not touched, so a run at a sensible learning rate is unchanged.

It acts on steps proportional to the estimate: ``torch.optim.SGD`` (with or without momentum: each estimate's
contribution is bounded before it enters the buffer) on both update paths, and the direct path's ``"normalized"``
step. Adam's and AdamW's steps are left alone: their change of each weight is already bounded by ``lr``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_update import reference_dequantize
from lightning_nobp.lowbit.formats import is_low_bit, layout_of

#: the default bound on a step's change of a tensor, relative to the tensor's norm
DEFAULT_STEP_LIMIT = 0.1
#: a tensor counts as at least this root-mean-square, so zero-initialised tensors (biases) can still move
NORM_FLOOR = 1e-3


def check_step_limit(step_limit: float | None) -> float | None:
    """Return ``step_limit`` or raise naming the fix when it is not a positive finite number or ``None``."""
    if step_limit is None:
        return None
    if isinstance(step_limit, bool) or not isinstance(step_limit, (int, float)):
        raise TypeError(f"step_limit must be a number or None, got {type(step_limit).__name__}")
    if not math.isfinite(step_limit) or step_limit <= 0:
        raise ValueError(
            f"step_limit={step_limit}: give a positive bound on each step's change relative to the tensor (e.g."
            f" {DEFAULT_STEP_LIMIT}), or None to turn the limit off"
        )
    return float(step_limit)


def weight_norm(param: Tensor) -> Tensor:
    """The float32 norm of a weight (a low-bit weight's dequantized value), as a tensor on its device."""
    if is_low_bit(param):
        return reference_dequantize(layout_of(param)).norm()
    return torch.linalg.vector_norm(param.detach(), dtype=torch.float32)


def step_factor(param: Tensor, change_norm: float | Tensor, limit: float) -> Tensor:
    """What a step whose change of ``param`` has norm ``change_norm`` is multiplied by: 1 within the bound, else
    the bound over the change (a tensor on the weight's device: no host synchronisation).

    Args:
        param: the weight.
        change_norm: the norm of the step's change of it (``lr`` times the estimate's norm for SGD).
        limit: the bound, relative to the weight's norm.
    """
    floor = NORM_FLOOR * math.sqrt(max(param.numel(), 1))
    bound = weight_norm(param).clamp_min(floor) * limit
    change = torch.as_tensor(change_norm, dtype=torch.float32).to(bound.device)
    return torch.where(change > bound, bound / change, torch.ones_like(bound))
