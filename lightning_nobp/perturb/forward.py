"""Make an unmodified module compute with perturbed parameters ``theta + delta`` without writing ``theta``.

While a :class:`PerturbedForward` context is active, each tracked parameter is swapped for a freshly computed
perturbed tensor only while the module that owns it runs its ``forward`` (a forward pre-hook swaps it in, a
forward hook swaps the stored tensor back). At most one layer's perturbed parameters exist at a time, so the
extra memory is one layer, and the stored parameter tensors are never written: after the context they are
bit-identical to before, in every dtype.

Parameters read outside their owner's ``forward`` (a bare ``nn.Parameter`` used in ``training_step``, a weight
read by a parent module) are swapped for the whole evaluation instead. :class:`ParameterReadProbe` finds them:
it watches one evaluation for torch calls that receive a stored (unperturbed) parameter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_batchedtensor
from torch.overrides import TorchFunctionMode

from lightning_nobp.lowbit.formats import is_low_bit

DeltaFn = Callable[[int, Tensor], Tensor]
"""``delta(param_index, stored_param) -> Tensor``: the perturbation to add, in float32, shaped like the param."""

ValueFn = Callable[[int, Tensor], "Tensor | None"]
"""``value(param_index, stored_param)``: the whole perturbed tensor (e.g. from a fused low-bit kernel), or ``None``
to fall back to ``stored + delta``."""


class ParameterOwners:
    """Which module holds which tracked parameter, by identity (tied parameters have several owners).

    Args:
        roots: modules whose submodules may own the parameters.
        params: the tracked parameters; their position in this sequence is their ``param_index``.
    """

    def __init__(self, roots: Iterable[nn.Module], params: Sequence[Tensor]) -> None:
        self.params = list(params)
        index_of = {id(p): i for i, p in enumerate(self.params)}
        self.slots: dict[nn.Module, list[tuple[str, int]]] = defaultdict(list)
        seen_modules: set[int] = set()
        owned: set[int] = set()
        for root in roots:
            for module in root.modules():
                if id(module) in seen_modules:
                    continue
                seen_modules.add(id(module))
                for name, param in module._parameters.items():
                    if param is not None and id(param) in index_of:
                        self.slots[module].append((name, index_of[id(param)]))
                        owned.add(index_of[id(param)])
        #: parameters that no module holds (swapped for the whole evaluation)
        self.unowned: set[int] = set(range(len(self.params))) - owned
        #: parameters also read outside their owner's forward (found by ParameterReadProbe)
        self.read_outside: set[int] = set()
        #: parameters held only as ``nn.Linear`` or plain ``nn.Embedding`` weights (tied pairs included): these
        #: can take a low-rank correction in the forward instead of a perturbed copy
        self.low_rank_capable: set[int] = set(range(len(self.params))) - self.unowned
        for module, slots in self.slots.items():
            for name, index in slots:
                if not (name == "weight" and takes_low_rank_correction(module)):
                    self.low_rank_capable.discard(index)

    @property
    def whole_evaluation(self) -> set[int]:
        """Indices of the parameters that must stay swapped for the whole evaluation."""
        return self.unowned | self.read_outside


def takes_low_rank_correction(module: nn.Module) -> bool:
    """Layers whose output under ``W + A B^T`` is their output under ``W`` plus a cheap low-rank term.

    ``nn.Linear``: ``x W^T + (x B) A^T``. ``nn.Embedding`` (without ``max_norm``, which rewrites the weight):
    ``W[i] + A[i] B^T``.
    """
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Embedding and module.max_norm is None


def low_rank_correction(module: nn.Module, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The change of ``module(x)`` when its weight gains ``A B^T`` (``a``: ``(out, r)``, ``b``: ``(in, r)``)."""
    if isinstance(module, nn.Embedding):
        return F.embedding(x, a) @ b.transpose(-1, -2)
    return (x @ b.to(x.dtype)) @ a.to(x.dtype).transpose(-1, -2)


def per_member_weight_is_cheaper(module: nn.Module, x: Tensor) -> bool:
    """Whether a batched population's ``nn.Linear`` should compute with each member's whole weight ``W + A B^T``
    instead of the shared product plus the correction ``(x B) A^T``.

    Only on CPU in float32, for a batched input (each member feeds its own rows): the correction then reads the
    input once more and the output twice more (the corrections are memory-bound passes), while per-member weights
    cost writing and reading ``members * in * out`` numbers. Chosen when ``2 in out < rows (in + 2 out)`` per
    member (an MLP's hidden layers and classifier head on a batch of 256: 1.7-2.3x faster, ``/tmp`` benchmark). A
    shared input (the data entering the first layer) keeps the correction: its shared product is computed once.

    Args:
        module: the ``nn.Linear``.
        x: its input as the layer sees it (inside ``vmap``: one member's view of a batched tensor).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not is_batchedtensor(x):
        return False
    rows = x.numel() // module.in_features
    return 2 * module.in_features * module.out_features < rows * (module.in_features + 2 * module.out_features)


def perturbed_value(stored: Tensor, delta: Tensor) -> Tensor:
    """``stored + delta`` computed in float32 (at least) and returned in the stored dtype; ``stored`` is not written.

    A low-bit ``stored`` (a torchao tensor subclass) is dequantized first; the result is a plain tensor of its
    compute dtype.
    """
    if is_low_bit(stored):
        return (stored.dequantize().to(torch.float32) + delta).to(stored.dtype)
    if stored.dtype == torch.float64:
        return stored + delta.to(torch.float64)
    return (stored.to(torch.float32) + delta).to(stored.dtype)


class PerturbedForward:
    """Context manager: the tracked parameters compute as ``theta + delta(param_index, theta)`` in every forward.

    Args:
        owners: the parameter-to-module map (built once, reused every step).
        delta: returns the perturbation of one parameter; called each time the owner's forward runs.
        probe: an active :class:`ParameterReadProbe` to pause while the perturbed values are computed.
        low_rank: for ``nn.Linear`` and ``nn.Embedding`` weights, factors ``(A, B)`` of a perturbation ``A B^T``:
            the layer keeps its stored weight and adds ``(x B) A^T`` (``A[x] B^T``) to its output instead (the
            shared weight is read once for a whole batched population; no perturbed matrix is formed).
        value: computes a parameter's whole perturbed tensor where it can do better than ``stored + delta`` (the
            fused low-bit kernel); returns ``None`` to fall back.
        unperturbed: indices of parameters that compute with their stored value (no perturbation).
    """

    def __init__(
        self,
        owners: ParameterOwners,
        delta: DeltaFn,
        probe: ParameterReadProbe | None = None,
        low_rank: Mapping[int, tuple[Tensor, Tensor]] | None = None,
        value: ValueFn | None = None,
        unperturbed: Collection[int] = (),
    ) -> None:
        self.owners = owners
        self.unperturbed = frozenset(unperturbed)
        self.delta = delta
        self.value = value
        self.probe = probe
        self.low_rank = low_rank or {}
        self._handles: list[Any] = []
        self._saved_whole: list[tuple[nn.Module, str, Tensor]] = []
        self._depth: dict[nn.Module, int] = defaultdict(int)
        self._saved_layer: dict[nn.Module, list[tuple[str, Tensor]]] = {}
        #: low-rank layers computing with whole per-member weights in the current call (their stored tensors)
        self._whole_weights: dict[nn.Module, list[tuple[str, Tensor]]] = {}

    @contextmanager
    def _unwatched(self) -> Iterator[None]:
        """No gradients, and the probe paused: computing perturbed values reads the stored parameters."""
        if self.probe is not None:
            self.probe.paused = True
        try:
            with torch.no_grad():
                yield
        finally:
            if self.probe is not None:
                self.probe.paused = False

    def _value(self, index: int) -> Tensor:
        stored = self.owners.params[index]
        with self._unwatched():
            whole = self.value(index, stored) if self.value is not None else None
            return whole if whole is not None else perturbed_value(stored, self.delta(index, stored))

    def __enter__(self) -> PerturbedForward:
        whole = self.owners.whole_evaluation
        values: dict[int, Tensor] = {}
        for module, owned_slots in self.owners.slots.items():
            slots = [(name, index) for name, index in owned_slots if index not in self.unperturbed]
            layer_slots = [(name, index) for name, index in slots if index not in whole]
            if takes_low_rank_correction(module):
                for name, index in list(layer_slots):
                    if name == "weight" and index in self.low_rank:
                        layer_slots.remove((name, index))
                        bias = self._foldable_bias(module, layer_slots)
                        if bias is not None:
                            layer_slots.remove(bias)
                        folded = None if bias is None else bias[1]
                        if type(module) is nn.Linear:
                            self._handles.append(
                                module.register_forward_pre_hook(self._make_whole_weight(index, folded))
                            )
                        self._handles.append(module.register_forward_hook(self._make_correction(index, folded)))
            if layer_slots:
                self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(layer_slots)))
                self._handles.append(module.register_forward_hook(self._restore_hook, always_call=True))
            for name, index in slots:
                if index in whole:
                    if index not in values:
                        values[index] = self._value(index)
                    self._saved_whole.append((module, name, module._parameters[name]))
                    module._parameters[name] = values[index]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, saved in self._saved_layer.items():  # an exception inside a forward
            for name, stored in saved:
                module._parameters[name] = stored
        self._saved_layer.clear()
        for module, saved in self._whole_weights.items():
            for name, stored in saved:
                module._parameters[name] = stored
        self._whole_weights.clear()
        self._depth.clear()
        for module, name, stored in self._saved_whole:
            module._parameters[name] = stored
        self._saved_whole.clear()

    def _make_pre_hook(self, slots: list[tuple[str, int]]) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            self._depth[module] += 1
            if self._depth[module] > 1:  # re-entrant call: already swapped
                return
            self._saved_layer[module] = [(name, module._parameters[name]) for name, _ in slots]
            for name, index in slots:
                module._parameters[name] = self._value(index)

        return pre_hook

    def _foldable_bias(self, module: nn.Module, layer_slots: list[tuple[str, int]]) -> tuple[str, int] | None:
        """The slot of an ``nn.Linear`` bias whose perturbation the weight's correction can add to the output.

        The layer then computes with its stored bias (its output is shared by a whole batched population) and the
        correction adds ``delta_bias`` in the same pass as ``(x B) A^T``, instead of a perturbed bias being added to
        every member's copy of the output first. Not with a fused low-bit ``value`` (it forms whole tensors).
        """
        if self.value is not None or not isinstance(module, nn.Linear):
            return None
        return next(((name, index) for name, index in layer_slots if name == "bias"), None)

    def _delta(self, index: int) -> Tensor:
        with self._unwatched():
            return self.delta(index, self.owners.params[index])

    def _make_correction(self, index: int, bias_index: int | None = None) -> Callable[[nn.Module, Any, Any], Tensor]:
        a, b = self.low_rank[index]

        def add_low_rank_correction(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            saved = self._whole_weights.pop(module, None)
            if saved is not None:  # computed with the member's whole weight (and bias): nothing to add
                for name, stored in saved:
                    module._parameters[name] = stored
                return None
            x = args[0]
            shift = None if bias_index is None else self._delta(bias_index).to(output.dtype)
            if a.shape[-1] == 1 and x.dim() > 1 and not isinstance(module, nn.Embedding):
                # rank 1: x b as a matrix-vector product (one matrix product for a whole batched population, where a
                # (..., in, 1) factor makes a batched product per member), then (x b) a^T in one fused pass.
                # contiguous() puts a batched population's member dimension first in memory, so the output is
                # member-major too (else the next layer's batched product copies it)
                xb = (x @ b[:, 0].to(x.dtype)).contiguous().unsqueeze(-1).to(output.dtype)
                a_t = a.to(output.dtype).transpose(-1, -2)
                if shift is None:
                    return torch.addcmul(output, xb, a_t)
                return torch.addcmul(shift, xb, a_t).add_(output)
            corrected = output + low_rank_correction(module, x, a, b).to(output.dtype)
            return corrected if shift is None else corrected.add_(shift)

        return add_low_rank_correction

    def _make_whole_weight(self, index: int, bias_index: int | None) -> Callable[[nn.Module, Any], None]:
        """Pre-hook of a low-rank ``nn.Linear``: swap in the member's whole weight ``W + A B^T`` (and its folded
        bias) where :func:`per_member_weight_is_cheaper`; the correction hook then restores the stored ones."""
        a, b = self.low_rank[index]

        def use_whole_weight(module: nn.Module, args: Any) -> None:
            if not args or not isinstance(args[0], Tensor) or not per_member_weight_is_cheaper(module, args[0]):
                return
            saved = [("weight", module._parameters["weight"])]
            if bias_index is not None:
                saved.append(("bias", module._parameters["bias"]))
            with self._unwatched():
                whole = [perturbed_value(saved[0][1], a.float() @ b.float().transpose(-1, -2))]
                if bias_index is not None:
                    whole.append(perturbed_value(saved[1][1], self.delta(bias_index, saved[1][1])))
            for (name, _), value in zip(saved, whole):
                module._parameters[name] = value
            self._whole_weights[module] = saved

        return use_whole_weight

    def _restore_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth[module] -= 1
        if self._depth[module] > 0:
            return
        for name, stored in self._saved_layer.pop(module, []):
            module._parameters[name] = stored


_METADATA_CALLS = frozenset({"__get__", "size", "dim", "numel", "data_ptr", "is_floating_point", "element_size"})


class ParameterReadProbe(TorchFunctionMode):
    """Records stored parameters that reach a torch call while a perturbation is active.

    A stored parameter reaching a torch call means the call sees ``theta`` instead of ``theta + delta``: the
    parameter is read outside its owner's forward and must be swapped for the whole evaluation.

    Args:
        owners: the parameter map whose parameters to watch.
    """

    def __init__(self, owners: ParameterOwners) -> None:
        super().__init__()
        self._index_of = {id(p): i for i, p in enumerate(owners.params)}
        self.read: set[int] = set()
        self.paused = False

    def _scan(self, value: Any) -> None:
        if isinstance(value, Tensor):
            index = self._index_of.get(id(value))
            if index is not None:
                self.read.add(index)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, Tensor):
                    self._scan(item)

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.paused and getattr(func, "__name__", "") not in _METADATA_CALLS:
            for value in args:
                self._scan(value)
            for value in kwargs.values():
                self._scan(value)
        return func(*args, **kwargs)
