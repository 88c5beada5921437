"""A bound on each step's change of each tensor, relative to the tensor: backprop-tuned learning rates stay stable.

A forward-only estimate of the gradient of ``d`` weights has about ``sqrt(d)`` times the gradient's norm (its
direction is mostly noise), so a learning rate tuned for backpropagation, applied to it by SGD, moves the weights
by far more than their own size and the run diverges. The step limit scales the step of every tensor ``w`` so that
its change stays within ``size_scaled_limit(limit, d) * max(||w||, NORM_FLOOR * sqrt(numel))`` (a trust ratio, as
LARS and LAMB bound layers' steps); a step already within the bound is not touched, so a run at a sensible learning
rate is unchanged.

The relative bound is ``limit`` up to ``FULL_BOUND_WEIGHTS`` perturbation-estimated weights and shrinks as
``1 / sqrt(d)`` beyond: a limited step is mostly noise (the estimate's noise grows as ``sqrt(d)``), nearly
orthogonal to the weight, so each one multiplies the tensor's squared norm by about ``1 + bound**2`` and the next
bound grows with it. A fixed 0.1 let a one-direction MeZO run of Lightning's demo transformer (1.3 M weights) at
its own ``SGD(lr=0.1)`` grow its weights until the loss exploded, while small models need the full 0.1 to move at
all (``benchmarks/measured/cpu-2026-12-06/demo_modules-step-limits.json``). Layers estimated from per-row losses
or by their exact gradient (a classifier's head) keep ``limit`` and do not count in ``d``: their estimate is mostly
signal (``benchmarks/measured/cpu-2026-12-06/demo_modules.json``).

It acts on steps proportional to the estimate: ``torch.optim.SGD`` (with or without momentum: each estimate's
contribution is bounded before it enters the buffer) on both update paths. Steps whose size per weight is set by
``lr`` are left alone: Adam's, AdamW's and the direct path's ``"normalized"`` step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_update import reference_dequantize
from lightning_nobp.lowbit.formats import is_low_bit, layout_of

#: the default bound on a step's change of a tensor, relative to the tensor's norm
DEFAULT_STEP_LIMIT = 0.1
#: up to this many trained weights the bound is ``limit`` itself; beyond, it shrinks as ``1 / sqrt(weights)``
FULL_BOUND_WEIGHTS = 10_000
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


def size_scaled_limit(limit: float, weights: int) -> float:
    """The relative bound for a perturbation estimate over ``weights`` weights: ``limit * min(1,
    sqrt(FULL_BOUND_WEIGHTS / weights))``.

    Args:
        limit: the user's ``step_limit``.
        weights: how many weights the perturbation estimate covers (trained weights outside per-row or exact layers).
    """
    return limit * min(1.0, math.sqrt(FULL_BOUND_WEIGHTS / max(weights, 1)))


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
