"""Write one step's update into a low-bit weight: the fused stochastic-rounding kernel, or int8 lattice moves."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_nobp.kernels.lowbit_update import (
    LowBitLayout,
    UpdateTerms,
    fused_update,
    grouped_update,
    reference_updated_values,
)
from lightning_nobp.lowbit.convert import LATTICE_ATTRIBUTE
from lightning_nobp.lowbit.formats import layout_of


def lattice_update(layout: LowBitLayout, terms: UpdateTerms, threshold: float) -> int:
    """EGGROLL-style integer training: move int8 weights one grid step along the update where it stands out.

    The update ``u = sum_m c_m z_m + A B^T + dense`` is standardized over the tensor; every weight whose
    ``|u| / std(u)`` exceeds ``threshold`` moves by ``sign(u)`` grid steps (clamped to +-127). Scales never
    change and no float state is kept; the learning rate's size cancels in the standardization (its sign and
    zero still count) and ``terms.decay`` is ignored.

    Args:
        layout: an ``int8`` layout (written in place).
        terms: the step's update terms.
        threshold: in standard deviations of the update.

    Returns:
        How many weights moved.
    """
    if layout.kind != "int8":
        raise ValueError(f"lattice updates need int8 storage, got {layout.kind}")
    zero = LowBitLayout("int8", torch.zeros_like(layout.qdata), layout.scale)
    update = reference_updated_values(zero, UpdateTerms(1.0, terms.seeds, terms.coefficients, terms.gaussian,
                                                        terms.factor_a, terms.factor_b, terms.dense))  # fmt: skip
    spread = update.std()
    if not bool(torch.isfinite(spread)) or float(spread) == 0.0:
        return 0
    moves = torch.where(update.abs() > threshold * spread, torch.sign(update), torch.zeros_like(update))
    layout.qdata.copy_((layout.qdata.to(torch.int16) + moves.to(torch.int16)).clamp_(-127, 127).to(torch.int8))
    return int(moves.abs().sum())


def apply_low_bit_update(param: Tensor, terms: UpdateTerms, rounding_seed: int) -> None:
    """Update a low-bit parameter in place: the fused kernel, or lattice moves for ``int8_lattice`` weights.

    Args:
        param: a torchao low-bit weight (see ``lightning_nobp.lowbit.formats``).
        terms: ``decay * w + sum_m c_m z_m + A B^T + dense`` (learning rate folded into the coefficients).
        rounding_seed: seed of the stochastic-rounding stream.
    """
    layout = layout_of(param)
    threshold = getattr(param, LATTICE_ATTRIBUTE, None)
    if threshold is not None:
        lattice_update(layout, terms, float(threshold))
    else:
        fused_update(layout, terms, rounding_seed)


def apply_low_bit_updates(updates: list[tuple[Tensor, UpdateTerms, int]]) -> int:
    """Update many low-bit parameters in place: one fused launch per (format, stream distribution) on CUDA, lattice
    moves for ``int8_lattice`` weights; each parameter as :func:`apply_low_bit_update` would update it alone.

    Args:
        updates: ``(parameter, terms, rounding seed)`` of every parameter.

    Returns:
        How many fused groups it took.
    """
    fused = []
    for param, terms, seed in updates:
        threshold = getattr(param, LATTICE_ATTRIBUTE, None)
        if threshold is not None:
            lattice_update(layout_of(param), terms, float(threshold))
        else:
            fused.append((layout_of(param), terms, seed))
    return grouped_update(fused) if fused else 0
