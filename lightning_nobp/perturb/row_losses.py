"""Per-row loss contributions of a training step, and the layers whose output rows feed exactly one loss row.

The user's ``training_step`` returns one scalar, but most losses are a mean over rows (samples, or tokens):
``F.cross_entropy(logits, y)`` is ``sum_n c_n`` with ``c_n = l_n / N``. :class:`RowLossRecorder` is a
``TorchFunctionMode`` that computes such a loss with ``reduction="none"``, keeps the row contributions ``c_n`` and
returns their sum (the same value). :func:`find_row_local_layers` then finds the ``nn.Linear`` layers whose output
row ``n`` changes loss row ``n`` only (a classifier's head; a language model's output projection), and, when asked,
the ``nn.Embedding`` layers of a causal sequence model (output row ``n`` changes loss row ``n`` and no earlier row):
for those, each member's per-row losses tell far more about the layer's gradient than its one scalar loss
(:mod:`lightning_nobp.perturb.row_estimate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_nobp.perturb.narrow_softmax import narrow_cross_entropy, narrow_softmax_call

#: ``F.cross_entropy``'s arguments, in order
CROSS_ENTROPY_ARGS = (
    "input",
    "target",
    "weight",
    "size_average",
    "ignore_index",
    "reduce",
    "reduction",
    "label_smoothing",
)
_NLL_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")
_ELEMENTWISE_ARGS = {
    F.mse_loss: ("input", "target", "size_average", "reduce", "reduction"),
    F.binary_cross_entropy_with_logits: ("input", "target", "weight", "size_average", "reduce", "reduction"),
}


def _mean_or_sum(bound: dict[str, Any]) -> str | None:
    """A loss call's ``reduction`` when it is ``"mean"`` or ``"sum"`` (without the deprecated ``size_average`` and
    ``reduce``), else ``None``."""
    reduction = bound.get("reduction", "mean")
    if bound.get("size_average") is not None or bound.get("reduce") is not None or reduction not in ("mean", "sum"):
        return None
    return reduction


def _class_index_rows(
    func: Callable, names: tuple[str, ...], args: tuple, kwargs: dict[str, Any], narrow: bool = False
) -> Tensor | None:
    """Row contributions of ``cross_entropy`` / ``nll_loss`` with class-index targets, or ``None`` if unsupported.
    ``narrow``: a cross-entropy over a narrow class dimension takes ``NarrowSoftmaxMode``'s fast form."""
    bound = dict(zip(names, args)) | kwargs
    target = bound.get("target")
    reduction = _mean_or_sum(bound)
    if reduction is None:
        return None
    if bound.get("label_smoothing", 0.0) != 0.0 or not isinstance(target, Tensor) or target.is_floating_point():
        return None
    unreduced = narrow_cross_entropy((), bound | {"reduction": "none"}) if narrow and func is F.cross_entropy else None
    if unreduced is None:
        unreduced = func(**(bound | {"reduction": "none"}))
    rows = unreduced.reshape(-1)
    if reduction == "sum":
        return rows
    ignore_index = bound.get("ignore_index", -100)
    flat_target = target.reshape(-1)
    kept = flat_target != ignore_index
    weight = bound.get("weight")
    if weight is None:
        denominator = kept.sum().to(rows.dtype)
    else:
        denominator = (weight[flat_target.where(kept, 0)] * kept).sum().to(rows.dtype)
    return rows / denominator


@dataclass(frozen=True)
class CrossEntropyTargets:
    """What a ``F.cross_entropy`` call with class-index targets needs besides its logits to give their gradient.

    Args:
        target: the class indices, one per logits row (flattened).
        class_weight: the ``weight`` argument (per-class weights), or ``None``.
        ignore_index: rows whose target equals it do not count.
        reduction: ``"mean"`` or ``"sum"``.
    """

    target: Tensor
    class_weight: Tensor | None
    ignore_index: int
    reduction: str


def cross_entropy_targets(args: tuple, kwargs: dict[str, Any]) -> CrossEntropyTargets | None:
    """The targets of a ``F.cross_entropy`` call whose logits' gradient ``lightning_nobp.perturb.logit_layers`` can
    give: 2-D logits, class-index targets, no label smoothing, ``reduction`` ``"mean"`` or ``"sum"``; else ``None``."""
    bound = dict(zip(CROSS_ENTROPY_ARGS, args)) | kwargs
    logits, target = bound.get("input"), bound.get("target")
    reduction = _mean_or_sum(bound)
    if reduction is None:
        return None
    if bound.get("label_smoothing", 0.0) != 0.0:
        return None
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not isinstance(target, Tensor):
        return None
    if target.is_floating_point() or target.numel() != logits.shape[0]:
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(target):  # batched per member: not one set of targets
        return None
    class_weight = bound.get("weight")
    return CrossEntropyTargets(
        target.detach().reshape(-1), class_weight, int(bound.get("ignore_index", -100)), str(reduction)
    )


def _elementwise_rows(func: Callable, args: tuple, kwargs: dict[str, Any]) -> Tensor | None:
    """Row contributions (summed over the last dimension) of ``mse_loss`` and ``binary_cross_entropy_with_logits``."""
    bound = dict(zip(_ELEMENTWISE_ARGS[func], args)) | kwargs
    reduction = _mean_or_sum(bound)
    if reduction is None:
        return None
    unreduced = func(**(bound | {"reduction": "none"}))
    if unreduced.dim() == 0:
        return None
    rows = unreduced.reshape(-1, unreduced.shape[-1]).sum(-1)
    return rows / unreduced.numel() if reduction == "mean" else rows


class RowLossRecorder(TorchFunctionMode):
    """Records the per-row contributions of the loss a forward computes; the loss's value is unchanged.

    Recognized: ``F.cross_entropy`` and ``F.nll_loss`` with class-index targets (``ignore_index`` and class
    ``weight`` included, no label smoothing), ``F.mse_loss`` and ``F.binary_cross_entropy_with_logits`` (rows: the
    last dimension summed), each with ``reduction`` ``"mean"`` or ``"sum"``. After a forward, :attr:`rows` holds
    the contributions (their sum is the recorded loss, :attr:`total`) when exactly one recognized loss ran, else
    ``None``; :attr:`targets` the targets of that loss when it is a cross-entropy whose logits' gradient
    ``lightning_nobp.perturb.logit_layers`` can give.
    """

    def __init__(self, narrow_softmax: bool = False) -> None:
        super().__init__()
        #: also do ``NarrowSoftmaxMode``'s work (one mode instead of two on every call of a population's forward)
        self.narrow_softmax = narrow_softmax
        self.rows: Tensor | None = None
        #: the value the recorded loss returned (a training step that returns anything else added terms to it)
        self.total: Tensor | None = None
        self.targets: CrossEntropyTargets | None = None
        self.calls = 0

    def reset(self) -> None:
        """Forget the last forward's record."""
        self.rows = None
        self.total = None
        self.targets = None
        self.calls = 0

    def mismatch(self, loss: Tensor) -> Tensor:
        """``loss - total`` as float32: zero exactly when the step returned the recorded loss unchanged."""
        if self.total is None:
            return loss.new_full((), float("nan"), dtype=torch.float32)
        return loss.reshape(()).float() - self.total.float()

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        rows: Tensor | None = None
        if func is F.cross_entropy:
            rows = _class_index_rows(F.cross_entropy, CROSS_ENTROPY_ARGS, args, kwargs, self.narrow_softmax)
        elif func is F.nll_loss:
            rows = _class_index_rows(F.nll_loss, _NLL_ARGS, args, kwargs)
        elif func in _ELEMENTWISE_ARGS:
            rows = _elementwise_rows(func, args, kwargs)
        if rows is None:
            if self.narrow_softmax:
                return narrow_softmax_call(func, args, kwargs)
            return func(*args, **kwargs)
        self.calls += 1
        self.rows = rows if self.calls == 1 else None  # two losses in one step: rows of which? none
        one_cross_entropy = self.calls == 1 and func is F.cross_entropy
        self.targets = cross_entropy_targets(args, kwargs) if one_cross_entropy else None
        self.total = rows.sum()
        return self.total


@dataclass(frozen=True)
class RowLocalLayer:
    """An ``nn.Linear`` whose output row ``n`` changes loss row ``n`` only, or an ``nn.Embedding`` of a causal
    sequence model: its output row ``n`` changes loss row ``n`` and no earlier row (output rows repeat over the loss
    rows when the embedding is broadcast over the batch, as position embeddings are).

    Args:
        module: the layer.
        weight_index: its weight's position in the trained parameter list.
        bias_index: its bias's position, or ``None`` (no bias, an untrained one, or an embedding).
    """

    module: nn.Linear | nn.Embedding
    weight_index: int
    bias_index: int | None

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)


def shifted_row(row: int, shift: Tensor) -> Callable[[nn.Module, Any, Tensor], Tensor]:
    """A forward hook that adds ``shift`` to one flattened row of the layer's output."""

    def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        shifted = output.clone()
        shifted.view(-1, output.shape[-1])[row] += shift.to(device=output.device, dtype=output.dtype)
        return shifted

    return hook


def _output_width(layer: RowLocalLayer) -> int:
    module = layer.module
    return module.embedding_dim if isinstance(module, nn.Embedding) else module.out_features


def _rows_qualify(candidate: RowLocalLayer, output_rows: int, loss_rows: int, shifted: int, changed: Tensor) -> bool:
    """Whether shifting output row ``shifted`` changed the loss rows (boolean ``changed``) a row-local layer may.

    ``nn.Linear``: exactly loss row ``shifted``. ``nn.Embedding``: every loss row the output row feeds directly
    (``n = shifted`` modulo the output's rows) and no row of an earlier position.
    """
    if not candidate.is_embedding:
        return output_rows == loss_rows and changed.nonzero().flatten().tolist() == [shifted]
    if loss_rows % output_rows:
        return False
    position = torch.arange(loss_rows) % output_rows
    return bool(changed[position == shifted].all()) and not bool(changed[position < shifted].any())


def _counting_hooks(candidates: Sequence[RowLocalLayer]) -> tuple[list[list[int]], list[Any]]:
    """Forward hooks that record, per candidate, the rows of its output at every call."""
    calls: list[list[int]] = [[] for _ in candidates]
    handles = [
        candidate.module.register_forward_hook(
            lambda module, args, output, seen=seen: seen.append(output.numel() // output.shape[-1])
        )
        for candidate, seen in zip(candidates, calls)
    ]
    return calls, handles


def find_row_local_layers(
    candidates: Sequence[RowLocalLayer], evaluate: Callable[[], Tensor], restore_rng: Callable[[], None]
) -> list[RowLocalLayer]:
    """The candidates whose output rows map onto the loss's rows, tested on the current batch.

    Runs the loss once as it is and, for each candidate, twice more with a random shift added to its first or its
    last output row. An ``nn.Linear`` qualifies when exactly that loss row changes each time and its output has as
    many rows as the loss; an ``nn.Embedding`` when the loss rows it feeds directly change and no earlier row does
    (at the last row: nothing but its own rows, so a bidirectional model fails). Either must run once per forward.
    Costs ``1 + 2 * len(candidates)`` forwards, once.

    Args:
        candidates: the layers to test.
        evaluate: computes the loss at the current weights (its rows are recorded).
        restore_rng: called before every forward, so random layers draw the same numbers each time.
    """
    if not candidates:
        return []
    recorder = RowLossRecorder()
    calls, handles = _counting_hooks(candidates)
    try:
        with torch.no_grad(), recorder:
            restore_rng()
            evaluate()
    finally:
        for handle in handles:
            handle.remove()
    baseline = recorder.rows
    if baseline is None or baseline.numel() == 0:
        return []
    baseline = baseline.detach().float().cpu()
    rows = baseline.numel()
    found: list[RowLocalLayer] = []
    for candidate, seen in zip(candidates, calls):
        if len(seen) != 1 or seen[0] < 1:  # not run, or run twice per forward (shared): rows of which call?
            continue
        output_rows = seen[0]
        qualifies = True
        for row in sorted({0, output_rows - 1}):
            noise = torch.randn(_output_width(candidate), generator=torch.Generator().manual_seed(row))
            shift = candidate.module.register_forward_hook(shifted_row(row, noise))
            recorder.reset()
            try:
                with torch.no_grad(), recorder:
                    restore_rng()
                    evaluate()
            finally:
                shift.remove()
            if recorder.rows is None or recorder.rows.numel() != rows:
                qualifies = False
                break
            changed = (recorder.rows.detach().float().cpu() - baseline).abs() > 1e-6 * (baseline.abs() + 1e-6)
            if not _rows_qualify(candidate, output_rows, rows, row, changed):
                qualifies = False
                break
        if qualifies:
            found.append(candidate)
    return found
