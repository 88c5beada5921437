"""The exact gradient of a layer whose output is the logits of the step's cross-entropy (an output head).

For ``L = cross_entropy(z, y)`` with ``z_n = W h_n + b`` computed by one ``nn.Linear``, the gradient of that layer
is local and closed-form (the delta rule of the output layer):

    dL/dz_n = c_n (softmax(z_n) - onehot(y_n)),    dL/dW = sum_n dL/dz_n h_n^T,    dL/db = sum_n dL/dz_n,

with ``c_n`` the row's weight in the reduction (``1 / N`` for the mean over the ``N`` rows not ignored; with class
weights ``w_{y_n} / sum_m w_{y_m}``; ``1`` for a sum). It needs the layer's input rows ``h_n`` (kept from the
official training pass for per-row estimates anyway), its stored weight and the targets: no backward pass, no
activations of any other layer. A per-row estimate (``lightning_nobp.perturb.row_estimate``) measures the same
``dL/dz_n`` from the population's antithetic pairs, which is exact only when the pairs outnumber the outputs: a
256-byte head estimated from 16 pairs sees a 16-dimensional projection of each row's gradient.

:func:`find_logit_layers` decides, once on the first batch, which row-local layers qualify: shifting one row of the
layer's output must shift the same row of the cross-entropy's input by the same vector (a dtype cast or a reshape
in between is fine; a temperature, a soft cap or another loss term is not), and no other row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_nobp.perturb.row_losses import (
    CROSS_ENTROPY_ARGS,
    CrossEntropyTargets,
    RowLocalLayer,
    cross_entropy_targets,
    shifted_row,
)

#: logits rows computed at once by :func:`cross_entropy_layer_gradient` times the classes (bounds its memory)
GRADIENT_CHUNK_ELEMENTS = 1 << 24


class CrossEntropyInputs(TorchFunctionMode):
    """Keeps the logits and targets of every ``F.cross_entropy`` call a forward makes (the value is unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, CrossEntropyTargets | None]] = []

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            bound = dict(zip(CROSS_ENTROPY_ARGS, args)) | kwargs
            logits = bound.get("input")
            if isinstance(logits, Tensor):
                self.calls.append((logits.detach().clone(), cross_entropy_targets(args, kwargs)))
        return func(*args, **kwargs)


def _logits_of(evaluate: Callable[[], Any], restore_rng: Callable[[], None]) -> Tensor | None:
    """The logits of the one cross-entropy with usable targets a forward computes, else ``None``."""
    recorder = CrossEntropyInputs()
    with torch.no_grad(), recorder:
        restore_rng()
        evaluate()
    if len(recorder.calls) != 1 or recorder.calls[0][1] is None:
        return None
    return recorder.calls[0][0].float()


def _shift_passes_through(logits: Tensor, shifted: Tensor, row: int, shift: Tensor) -> bool:
    """Whether ``shifted`` is ``logits`` with ``shift`` added to row ``row`` (to the rounding of a bf16/fp16
    output) and every other row unchanged."""
    if shifted.shape != logits.shape:
        return False
    others = torch.ones(len(logits), dtype=torch.bool)
    others[row] = False
    if not torch.allclose(shifted[others], logits[others], rtol=1e-5, atol=1e-6):  # (a GPU's sums may differ)
        return False
    moved = shifted[row] - logits[row]
    scale = torch.maximum(logits[row].abs(), shifted[row].abs()).max().clamp_min(1.0)
    return bool(((moved - shift).abs() <= 2.0**-6 * scale).all())


def find_logit_layers(
    layers: Sequence[RowLocalLayer], evaluate: Callable[[], Any], restore_rng: Callable[[], None]
) -> list[RowLocalLayer]:
    """The row-local ``nn.Linear`` layers whose output is the logits of the step's one cross-entropy.

    Runs the forward once as it is and twice per layer with a random vector added to the first or the last row of
    its output: the cross-entropy's input must move by that vector in that row and nowhere else. Costs
    ``1 + 2 * len(layers)`` forwards, once.

    Args:
        layers: the row-local layers (embeddings are skipped).
        evaluate: computes the training loss at the current weights.
        restore_rng: called before every forward, so random layers draw the same numbers each time.
    """
    linears = [layer for layer in layers if not layer.is_embedding]
    if not linears:
        return []
    logits = _logits_of(evaluate, restore_rng)
    if logits is None:
        return []
    found = []
    generator = torch.Generator().manual_seed(0)
    for layer in linears:
        if logits.shape[-1] != layer.module.out_features:
            continue
        qualifies = True
        for row in sorted({0, len(logits) - 1}):
            shift = torch.randn(logits.shape[-1], generator=generator)
            handle = layer.module.register_forward_hook(shifted_row(row, shift))
            try:
                shifted = _logits_of(evaluate, restore_rng)
            finally:
                handle.remove()
            if shifted is None or not _shift_passes_through(logits, shifted, row, shift):
                qualifies = False
                break
        if qualifies:
            found.append(layer)
    return found


def cross_entropy_layer_gradient(
    inputs: Tensor, weight: Tensor, bias: Tensor | None, targets: CrossEntropyTargets
) -> tuple[Tensor, Tensor | None]:
    """The exact gradient of the cross-entropy with respect to the layer that computed its logits.

    Args:
        inputs: ``h`` ``(N, in)``: the layer's input rows.
        weight: its weight ``(out, in)`` (any floating dtype; computed in float32).
        bias: its bias ``(out,)``, or ``None``.
        targets: the cross-entropy's targets (``N`` of them) and options.

    Returns:
        ``(dL/dW (out, in), dL/db (out,) or None)`` in float32.
    """
    h = inputs.float()
    w = weight.float()
    b = None if bias is None else bias.float()
    target = targets.target.to(h.device)
    kept = target != targets.ignore_index
    safe = target.where(kept, torch.zeros_like(target))
    row_weights = kept.float()
    if targets.class_weight is not None:
        row_weights = row_weights * targets.class_weight.to(h.device).float()[safe]
    if targets.reduction == "mean":
        row_weights = row_weights / row_weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    weight_gradient = torch.zeros_like(w)
    bias_gradient = None if b is None else torch.zeros_like(b)
    step = max(1, GRADIENT_CHUNK_ELEMENTS // max(w.shape[0], 1))
    for start in range(0, len(h), step):
        rows = slice(start, start + step)
        logits = F.linear(h[rows], w, b)
        delta = logits.softmax(-1)
        delta[torch.arange(len(delta), device=delta.device), safe[rows]] -= 1.0
        delta.mul_(row_weights[rows].unsqueeze(1))
        weight_gradient.addmm_(delta.t(), h[rows])
        if bias_gradient is not None:
            bias_gradient.add_(delta.sum(0))
    return weight_gradient, bias_gradient
