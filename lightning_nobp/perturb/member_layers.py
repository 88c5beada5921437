"""Member-aware layer computations, installed once per fit on the user's unmodified modules.

While a :class:`Perturbation` is active, every module that holds a trained parameter computes as if that parameter
were ``theta + delta`` without ``theta`` ever being written:

- ``nn.Linear`` with low-rank noise ``A B^T``: ``x W^T + b`` once, plus ``(x B) A^T`` (the bias's noise added in
  the same pass). With dense noise: the layer's own perturbed copy, formed when it runs and dropped after.
- ``nn.Embedding``: ``W[i] + A[i] B^T``, or a perturbed copy.
- ``nn.LayerNorm``: the normalized input times the perturbed gain plus the perturbed bias (the gains' noise is
  applied elementwise, the normalization itself is shared).
- Any other module holding a trained parameter (``nn.Conv2d``, ``nn.MultiheadAttention``, custom layers): its
  parameters are swapped for perturbed copies while its own ``forward`` runs.

The computations are installed as the instances' ``forward`` (:meth:`MemberLayers.install`), not as hooks
registered for every call: with no perturbation active each calls the class's own ``forward``, so the module is
unchanged from the outside (same parameters, same ``state_dict``, same outputs), and ``torch.compile`` traces
them like any other forward. The step's perturbation is handed over as explicit tensors (factors, deltas, noise
keys), which is what lets ``torch.func.vmap`` batch a whole population through them.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import is_batchedtensor

from lightning_nobp.kernels.fp8_linear import fp8_row_lookup, fp8_rows, takes_fp8_linear
from lightning_nobp.kernels.int8_linear import takes_int8_linear
from lightning_nobp.kernels.lowbit_linear import shared_weight_linear
from lightning_nobp.lowbit.formats import is_low_bit
from lightning_nobp.perturb.owners import ParameterOwners, ParameterReadProbe, takes_low_rank_correction

StreamValue = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""``value(stored, key, scale, param_index)``: the stored parameter plus ``scale`` times its noise stream ``key``."""


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


class Perturbation:
    """What every tracked parameter adds in one evaluation (one member, or one member's view under ``vmap``).

    Args:
        low_rank: factors ``(A (out, r), B (in, r))`` of ``nn.Linear`` / ``nn.Embedding`` weights perturbed by
            ``A B^T`` (the scale and sign folded into ``A``).
        dense: float32 deltas shaped like their parameters.
        streams: ``(key, scale)`` of parameters whose noise is regenerated from a counter-based stream when their
            layer runs (one layer's perturbed copy at a time); ``stream_value`` forms the copy.
        stream_value: forms ``stored + scale * noise(key)`` (the dense-noise kernel or its twin).
        delta_fn: the delta of any other parameter, computed when its layer runs (members one at a time).
        value_fn: a parameter's whole perturbed tensor where it can do better than ``stored + delta`` (the fused
            low-bit kernel); returns ``None`` to fall back.
        unperturbed: indices of parameters that compute with their stored value.
    """

    def __init__(
        self,
        low_rank: Mapping[int, tuple[Tensor, Tensor]] | None = None,
        dense: Mapping[int, Tensor] | None = None,
        streams: Mapping[int, tuple[Tensor, Tensor]] | None = None,
        stream_value: StreamValue | None = None,
        delta_fn: Callable[[int, Tensor], Tensor] | None = None,
        value_fn: Callable[[int, Tensor], Tensor | None] | None = None,
        unperturbed: frozenset[int] = frozenset(),
    ) -> None:
        self.low_rank = low_rank or {}
        self.dense = dense or {}
        self.streams = streams or {}
        self.stream_value = stream_value
        self.delta_fn = delta_fn
        self.value_fn = value_fn
        self.unperturbed = unperturbed
        #: parameters swapped for the whole evaluation (``MemberLayers.perturbed``): their layers see them swapped
        self.swapped: frozenset[int] = frozenset()

    def perturbs(self, index: int) -> bool:
        """Whether parameter ``index`` computes with anything but its stored value."""
        if index in self.unperturbed or index in self.swapped:
            return False
        return (
            index in self.low_rank
            or index in self.dense
            or index in self.streams
            or self.delta_fn is not None
            or self.value_fn is not None
        )

    def delta(self, index: int, stored: Tensor) -> Tensor:
        """The float32 delta of a perturbed parameter (not of low-rank ones)."""
        if index in self.dense:
            return self.dense[index]
        if index in self.streams:
            key, scale = self.streams[index]
            assert self.stream_value is not None
            return self.stream_value(torch.zeros_like(stored, dtype=torch.float32), key, scale, index)
        assert self.delta_fn is not None
        return self.delta_fn(index, stored)

    def value(self, index: int, stored: Tensor) -> Tensor:
        """The perturbed tensor a layer computes with in place of ``stored`` (``stored`` itself if unperturbed)."""
        if not self.perturbs(index) or index in self.low_rank:
            return stored
        if index in self.dense:
            return perturbed_value(stored, self.dense[index])
        if index in self.streams:
            key, scale = self.streams[index]
            assert self.stream_value is not None
            return self.stream_value(stored, key, scale, index)
        if self.value_fn is not None:
            whole = self.value_fn(index, stored)
            if whole is not None:
                return whole
        return perturbed_value(stored, self.delta(index, stored))


def per_member_weight_is_cheaper(module: nn.Module, x: Tensor) -> bool:
    """Whether a batched population's ``nn.Linear`` should compute with each member's whole weight ``W + A B^T``
    instead of the shared product plus the correction ``(x B) A^T``.

    Only eagerly on CPU in float32, for a batched input (each member feeds its own rows): the correction then reads
    the input once more and the output twice more (the corrections are memory-bound passes), while per-member
    weights cost writing and reading ``members * in * out`` numbers. Chosen when ``2 in out < rows (in + 2 out)``
    per member (an MLP's hidden layers and classifier head on a batch of 256). A shared input (the data entering
    the first layer) keeps the correction: its shared product is computed once. Compiled evaluations always take
    the correction, which the compiler fuses.

    Args:
        module: the ``nn.Linear``.
        x: its input as the layer sees it (inside ``vmap``: one member's view of a batched tensor).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or not is_batchedtensor(x):
        return False
    rows = x.numel() // module.in_features
    return 2 * module.in_features * module.out_features < rows * (module.in_features + 2 * module.out_features)


def _class_forward(module: nn.Module) -> Callable[..., Any]:
    """The module class's own ``forward`` bound to ``module`` (what a copy of the module calls)."""
    return types.MethodType(type(module).forward, module)


class MemberForward:
    """The member-aware ``forward`` installed on one module (see the module docstring).

    Args:
        layers: the installation it belongs to (holds the active perturbation).
        module: the module.
        slots: ``(attribute name, parameter index)`` of the tracked parameters the module holds.
        compute: the member-aware computation ``compute(forward, perturbation, *args, **kwargs)``.
    """

    member_aware = True

    def __init__(
        self,
        layers: MemberLayers,
        module: nn.Module,
        slots: list[tuple[str, int]],
        compute: Callable[..., Any],
    ) -> None:
        self.layers = layers
        self.module = module
        self.slots = dict(slots)
        self.compute = compute
        #: what the instance called before (its class's ``forward``, or one the user set on the instance)
        self.original: Callable[..., Any] = module.__dict__.get("forward") or _class_forward(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        perturbation = self.layers.active
        if perturbation is None:
            return self.original(*args, **kwargs)
        if self.layers.probe is None or self.compute is _swapped:
            return self.compute(self, perturbation, *args, **kwargs)
        with self.layers.unwatched():  # the layer's own reads of its stored parameters are not reads from outside
            return self.compute(self, perturbation, *args, **kwargs)

    # a copied or pickled module gets its class's forward back: the installation belongs to this module only
    def __deepcopy__(self, memo: dict) -> Callable[..., Any]:
        return _class_forward(memo.get(id(self.module), self.module))

    def __reduce__(self) -> tuple:
        return _class_forward, (self.module,)


def _linear(owner: MemberForward, p: Perturbation, x: Tensor) -> Tensor:
    """``nn.Linear`` under a perturbation: low-rank correction (with the bias's noise folded in) or copies."""
    module = owner.module
    weight_index, bias_index = owner.slots.get("weight"), owner.slots.get("bias")
    weight, bias = module.weight, module.bias
    factors = p.low_rank.get(weight_index) if weight_index is not None else None
    if factors is None:
        if weight_index is not None:
            weight = p.value(weight_index, weight)
        if bias_index is not None:
            bias = p.value(bias_index, bias)
        return F.linear(x, weight, bias)
    a, b = factors
    shift = p.delta(bias_index, bias) if bias_index is not None and p.perturbs(bias_index) else None
    # the shared product on the stored FP8 or int8 data: one rowwise-scaled quantized matmul
    quantized = takes_fp8_linear(weight, x) or takes_int8_linear(weight, x)
    if not quantized and not torch.compiler.is_compiling() and per_member_weight_is_cheaper(module, x):
        whole = perturbed_value(weight, a.float() @ b.float().transpose(-1, -2))
        return F.linear(x, whole, bias if shift is None else perturbed_value(bias, shift))
    output = shared_weight_linear(x, weight, bias) if quantized else F.linear(x, weight, bias)
    if a.shape[-1] == 1 and x.dim() > 1:
        # rank 1: x b as a matrix-vector product (one product for a whole batched population), then (x b) a^T in one
        # fused pass; contiguous() puts a batched population's member dimension first in memory, so the output is
        # member-major too (else the next layer's batched product copies it)
        xb = (x @ b[:, 0].to(x.dtype)).contiguous().unsqueeze(-1).to(output.dtype)
        a_t = a.to(output.dtype).transpose(-1, -2)
        if shift is None:
            return torch.addcmul(output, xb, a_t)
        return torch.addcmul(shift.to(output.dtype), xb, a_t).add_(output)
    corrected = output + ((x @ b.to(x.dtype)) @ a.to(x.dtype).transpose(-1, -2)).to(output.dtype)
    return corrected if shift is None else corrected.add_(shift.to(output.dtype))


def _embedding(owner: MemberForward, p: Perturbation, indices: Tensor) -> Tensor:
    """``nn.Embedding`` under a perturbation: ``W[i] + A[i] B^T``, or a perturbed copy of the table."""
    module = owner.module
    assert isinstance(module, nn.Embedding)
    weight_index = owner.slots.get("weight")
    weight = module.weight
    factors = p.low_rank.get(weight_index) if weight_index is not None else None
    if factors is None and weight_index is not None:
        weight = p.value(weight_index, weight)
    if fp8_row_lookup(weight, module):  # only the rows looked up are dequantized, not the whole table
        output = fp8_rows(weight, indices)
    else:
        output = F.embedding(
            indices, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq,
            module.sparse,
        )
    if factors is None:
        return output
    a, b = factors
    return output + (F.embedding(indices, a) @ b.transpose(-1, -2)).to(output.dtype)


def _layer_norm(owner: MemberForward, p: Perturbation, x: Tensor) -> Tensor:
    """``nn.LayerNorm`` under a perturbation: the shared normalization, then the perturbed gain and bias."""
    module = owner.module
    assert isinstance(module, nn.LayerNorm)
    weight_index, bias_index = owner.slots.get("weight"), owner.slots.get("bias")
    gain_perturbed = weight_index is not None and p.perturbs(weight_index)
    bias_perturbed = bias_index is not None and p.perturbs(bias_index)
    if not (gain_perturbed or bias_perturbed):
        return owner.original(x)
    weight, bias = module.weight, module.bias
    if gain_perturbed:
        weight = p.value(weight_index, weight)  # type: ignore[arg-type]
    if bias_perturbed:
        bias = p.value(bias_index, bias)  # type: ignore[arg-type]
    batched = torch.compiler.is_compiling() or any(
        t is not None and is_batchedtensor(t) for t in (weight, bias)
    )
    if not batched:  # one member: the fused layer norm with its perturbed gain and bias
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    # a batch of members: normalize once, then each member's gain and bias elementwise (a batched gain would make
    # the layer norm itself run per member)
    normalized = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if weight is not None:
        normalized = normalized * weight
    return normalized if bias is None else normalized + bias


def _swapped(owner: MemberForward, p: Perturbation, *args: Any, **kwargs: Any) -> Any:
    """Any other module: its tracked parameters swapped for perturbed copies while its own forward runs."""
    module = owner.module
    params = owner.layers.owners.params
    saved: list[tuple[str, Tensor]] = []
    with owner.layers.unwatched():
        values = [(name, p.value(index, params[index])) for name, index in owner.slots.items() if p.perturbs(index)]
    try:
        for name, value in values:
            saved.append((name, module._parameters[name]))  # type: ignore[arg-type]
            module._parameters[name] = value  # type: ignore[assignment]
        return owner.original(*args, **kwargs)
    finally:
        for name, stored in reversed(saved):
            module._parameters[name] = stored  # type: ignore[assignment]


def _computation(module: nn.Module, slots: list[tuple[str, int]]) -> Callable[..., Any]:
    """The member-aware computation of ``module``: a dedicated one for the plain layer types, else swapping."""
    if "forward" in module.__dict__:
        return _swapped  # the user's own forward on the instance: run it with swapped parameters
    names = {name for name, _ in slots}
    if takes_low_rank_correction(module) and isinstance(module, nn.Linear) and names <= {"weight", "bias"}:
        return _linear
    if takes_low_rank_correction(module) and isinstance(module, nn.Embedding) and names == {"weight"}:
        return _embedding
    if type(module) is nn.LayerNorm and names <= {"weight", "bias"}:
        return _layer_norm
    return _swapped


class MemberLayers:
    """The member-aware forwards of every module holding a tracked parameter, and the active perturbation.

    Args:
        owners: the parameter-to-module map.
    """

    def __init__(self, owners: ParameterOwners) -> None:
        self.owners = owners
        #: the perturbation the installed forwards compute with (``None``: the modules compute as they are)
        self.active: Perturbation | None = None
        #: an active ``ParameterReadProbe`` to pause while the layers read their own stored parameters
        self.probe: ParameterReadProbe | None = None
        self._installed: dict[nn.Module, tuple[MemberForward, Callable[..., Any] | None]] = {}

    @property
    def installed(self) -> bool:
        """Whether every owning module computes through these layers now (another estimator over the same modules,
        one per optimizer, takes them over while it evaluates)."""
        return len(self._installed) == len(self.owners.slots) and all(
            module.__dict__.get("forward") is member_forward
            for module, (member_forward, _) in self._installed.items()
        )

    def install(self) -> None:
        """Set the member-aware ``forward`` on every owning module (idempotent); a module that computes through
        another estimator's layers is taken over, and keeps its own ``forward`` to give back."""
        for module, slots in self.owners.slots.items():
            current = module.__dict__.get("forward")
            mine = self._installed.get(module)
            if mine is not None and current is mine[0]:
                continue
            if isinstance(current, MemberForward):  # another estimator's: give the module its own forward back first
                _, kept = current.layers._installed.pop(module)
                if kept is None:
                    del module.forward
                else:
                    module.forward = kept  # type: ignore[method-assign]
            previous = module.__dict__.get("forward")
            member_forward = MemberForward(self, module, slots, _computation(module, slots))
            module.forward = member_forward  # type: ignore[method-assign]
            self._installed[module] = (member_forward, previous)

    def remove(self) -> None:
        """Give every module back the ``forward`` it had before :meth:`install`."""
        for module, (member_forward, previous) in self._installed.items():
            if module.__dict__.get("forward") is member_forward:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous  # type: ignore[method-assign]
        self._installed.clear()
        self.active = None

    @contextmanager
    def unwatched(self) -> Iterator[None]:
        """The probe (if any) paused: the layers' own reads of their stored parameters are not outside reads."""
        probe = self.probe
        if probe is None:
            yield
            return
        paused = probe.paused
        probe.paused = True
        try:
            yield
        finally:
            probe.paused = paused

    @contextmanager
    def perturbed(self, perturbation: Perturbation, probe: ParameterReadProbe | None = None) -> Iterator[None]:
        """Within the context the installed forwards compute with ``perturbation``; parameters read outside their
        owners' forwards (``owners.whole_evaluation``) are swapped for their perturbed values for the whole time.

        Args:
            perturbation: what each parameter adds.
            probe: an active ``ParameterReadProbe`` watching this evaluation.
        """
        if not self.installed:
            self.install()
        saved: list[tuple[nn.Module, str, Tensor]] = []
        self.probe = probe
        try:
            with self.unwatched(), torch.no_grad() if probe is not None else nullcontext():
                values = {
                    index: perturbation.value(index, self.owners.params[index])
                    for index in self.owners.whole_evaluation
                    if perturbation.perturbs(index)
                }
            for module, slots in self.owners.slots.items():
                for name, index in slots:
                    if index in values:
                        saved.append((module, name, module._parameters[name]))  # type: ignore[arg-type]
                        module._parameters[name] = values[index]  # type: ignore[assignment]
            perturbation.swapped = frozenset(values)
            self.active = perturbation
            yield
        finally:
            self.active = None
            self.probe = None
            for module, name, stored in reversed(saved):
                module._parameters[name] = stored  # type: ignore[assignment]
