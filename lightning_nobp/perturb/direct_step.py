"""The direct path's step: the user's ``torch.optim.SGD`` (lr, weight decay, momentum) applied in place.

Without momentum the step keeps no state: ``w <- w - lr * (e + weight_decay * w)``, where ``e`` is the step's
estimate (divided by its root-mean-square with ``direct_step="normalized"``). With ``SGD(momentum=m)`` a momentum
buffer lives where ``torch.optim.SGD`` keeps it, in ``optimizer.state[p]["momentum_buffer"]`` (so Lightning's and
Fabric's checkpoints carry it), in the weight's dtype, or bfloat16 for low-bit weights (2 bytes a weight):

    b <- m b + (1 - dampening) e          (b = e on the first step, as torch.optim.SGD does)
    d <- e + m b  (nesterov)  or  b
    w <- w - lr * (d + weight_decay * w)   (decay applied to the weight, not fed through the buffer)

With ``direct_step="normalized"`` the direction ``d`` is divided by its root-mean-square as well, so ``lr`` stays
the typical change of one weight and momentum only averages the estimates' directions (evolution strategies'
estimates are noisy: averaging over about ``1 / (1 - m)`` steps keeps what they agree on).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: the optimizer-state key torch.optim.SGD uses for its momentum buffer
MOMENTUM_BUFFER = "momentum_buffer"


def rms(squared_norm: float | Tensor, numel: int) -> float | Tensor:
    """Root-mean-square from a squared norm (1 for an all-zero estimate, which then stays zero); a tensor stays a
    tensor (no host synchronisation)."""
    if isinstance(squared_norm, Tensor):
        return torch.where(squared_norm > 0, (squared_norm / numel).sqrt(), torch.ones_like(squared_norm))
    return math.sqrt(squared_norm / numel) if squared_norm > 0 else 1.0


@dataclass(frozen=True)
class DirectHyperparameters:
    """One parameter's step settings, read from its ``torch.optim.SGD`` param group every step.

    Args:
        lr: learning rate (the scheduler's current value).
        weight_decay: L2 decay (SGD, Adam: added to the estimate) or decoupled (AdamW: the weight shrinks first).
        momentum: SGD momentum ``m`` (0: no buffer, no state).
        dampening: SGD dampening.
        nesterov: SGD's Nesterov variant.
        adam: the group is ``torch.optim.Adam``'s or ``AdamW``'s: the step is Adam's (:func:`adam_direction`).
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's ``eps``.
        decoupled: AdamW's decoupled weight decay.
        step_limit: bound on the step's change of the weight, relative to its norm (``None``: no bound; see
            ``lightning_nobp.perturb.step_limit``); never applied to Adam's step.
    """

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    adam: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decoupled: bool = False
    step_limit: float | None = None

    @property
    def stateful(self) -> bool:
        """Whether the step keeps state in the optimizer (momentum buffers, Adam's moments)."""
        return bool(self.momentum) or self.adam

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> DirectHyperparameters:
        """The settings of an SGD, Adam or AdamW param group (missing keys take SGD's defaults)."""
        adam = "betas" in group
        return cls(
            lr=float(group["lr"]),
            weight_decay=float(group.get("weight_decay", 0.0)),
            momentum=0.0 if adam else float(group.get("momentum", 0.0)),
            dampening=float(group.get("dampening", 0.0)),
            nesterov=bool(group.get("nesterov", False)),
            adam=adam,
            betas=tuple(float(b) for b in group.get("betas", (0.9, 0.999))),  # type: ignore[arg-type]
            eps=float(group.get("eps", 1e-8)),
            decoupled=bool(group.get("decoupled_weight_decay", False)),
        )

    def decay(self) -> float:
        """What the weight is multiplied by before the step: ``1 - lr * weight_decay`` where weight decay acts on
        the weight directly (SGD, AdamW), else 1 (Adam adds it to the estimate)."""
        if self.adam and not self.decoupled:
            return 1.0
        return 1.0 - self.lr * self.weight_decay


def momentum_direction(
    estimate: Tensor, state: dict[str, Any], settings: DirectHyperparameters, normalize: bool, buffer_dtype: torch.dtype
) -> Tensor:
    """The direction ``d`` of a step with momentum, updating the buffer in ``state`` (see the module docstring).

    Args:
        estimate: the step's float32 estimate ``e`` (not modified).
        state: the parameter's optimizer state (``optimizer.state[p]``).
        settings: the parameter's step settings (``momentum > 0``).
        normalize: divide ``e`` and ``d`` by their root-mean-square (``direct_step="normalized"``).
        buffer_dtype: the dtype the buffer is kept in.

    Returns:
        ``d`` in float32 (a new tensor); zeros, with the buffer untouched, when ``estimate`` is not finite.
    """
    if not bool(torch.isfinite(estimate).all()):
        return torch.zeros_like(estimate)  # never let a non-finite estimate into the buffer: no step for this weight
    numel = max(estimate.numel(), 1)
    scaled = estimate / rms(float(estimate.square().sum()), numel) if normalize else estimate.clone()
    previous = state.get(MOMENTUM_BUFFER)
    if previous is None:
        buffer = scaled.clone()
    else:
        buffer = previous.to(torch.float32).view_as(scaled).mul(settings.momentum)
        buffer.add_(scaled, alpha=1.0 - settings.dampening)
    state[MOMENTUM_BUFFER] = buffer.to(buffer_dtype)
    direction = scaled.add_(buffer, alpha=settings.momentum) if settings.nesterov else buffer
    if normalize:
        direction = direction.div_(rms(float(direction.square().sum()), numel))
    return direction


EXP_AVG, EXP_AVG_SQ, STEP = "exp_avg", "exp_avg_sq", "step"


def adam_direction(
    estimate: Tensor, state: dict[str, Any], settings: DirectHyperparameters, weight: Tensor, buffer_dtype: torch.dtype
) -> Tensor:
    """Adam's step direction ``m_hat / (sqrt(v_hat) + eps)`` for the estimate (the step is ``-lr`` times it),
    updating the moments in ``state`` under ``torch.optim.Adam``'s keys (``exp_avg``, ``exp_avg_sq``, ``step``).

    Args:
        estimate: the step's float32 estimate (not modified).
        state: the parameter's optimizer state.
        settings: the group's Adam settings (``adam=True``).
        weight: the weight's float32 value (Adam's L2 weight decay adds ``weight_decay * weight``).
        buffer_dtype: the dtype the moments are kept in.

    Returns:
        The direction in float32; zeros, with the state untouched, when ``estimate`` is not finite.
    """
    if not bool(torch.isfinite(estimate).all()):
        return torch.zeros_like(estimate)
    grad = estimate
    if settings.weight_decay and not settings.decoupled:
        grad = estimate + settings.weight_decay * weight.view_as(estimate)
    beta1, beta2 = settings.betas
    step = int(state[STEP]) + 1 if STEP in state else 1
    previous_m, previous_v = state.get(EXP_AVG), state.get(EXP_AVG_SQ)
    m = grad * (1.0 - beta1)
    if previous_m is not None:
        m = m + previous_m.float().view_as(grad) * beta1
    v = grad.square() * (1.0 - beta2)
    if previous_v is not None:
        v = v + previous_v.float().view_as(grad) * beta2
    state[EXP_AVG], state[EXP_AVG_SQ] = m.to(buffer_dtype), v.to(buffer_dtype)
    state[STEP] = torch.tensor(float(step))
    return (m / (1.0 - beta1**step)) / ((v / (1.0 - beta2**step)).sqrt() + settings.eps)


__all__ = ["MOMENTUM_BUFFER", "DirectHyperparameters", "adam_direction", "momentum_direction", "rms"]
