"""Which module holds which trained parameter, and which parameters are read outside their owner's forward.

The member layers (:mod:`lightning_nobp.perturb.member_layers`) perturb a parameter inside the forward of the module
that holds it. A parameter no module holds (a bare ``nn.Parameter`` of the root module read in ``training_step``) or
one also read outside its owner's forward (a parent reading a child's weight) is swapped for the whole evaluation
instead: :class:`ParameterReadProbe` finds the second kind by watching one perturbed evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_nobp.perturb.row_losses import RowLocalLayer


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

    @property
    def low_rank_allowed(self) -> set[int]:
        """Parameters that take a low-rank correction in their layers' forwards (capable, not swapped whole)."""
        return self.low_rank_capable - self.whole_evaluation

    def unshared_layers(self, embeddings: bool = False) -> list[RowLocalLayer]:
        """``nn.Linear`` layers (and ``nn.Embedding`` layers if ``embeddings``: dense lookups without ``max_norm``)
        with a trained weight whose parameters no other module shares and that are not swapped whole."""
        holders: dict[int, int] = {}
        for slots in self.slots.values():
            for _, index in slots:
                holders[index] = holders.get(index, 0) + 1
        layers = []
        for module, slots in self.slots.items():
            plain_embedding = isinstance(module, nn.Embedding) and module.max_norm is None and not module.sparse
            if not (isinstance(module, nn.Linear) or (embeddings and plain_embedding)):
                continue
            indices = dict(slots)
            weight = indices.get("weight")
            if weight is None or weight in self.whole_evaluation:
                continue
            if any(holders[index] > 1 for index in indices.values()):
                continue
            layers.append(RowLocalLayer(module, weight, indices.get("bias")))
        return layers


def takes_low_rank_correction(module: nn.Module) -> bool:
    """Layers whose output under ``W + A B^T`` is their output under ``W`` plus a cheap low-rank term.

    ``nn.Linear``: ``x W^T + (x B) A^T``. ``nn.Embedding`` (without ``max_norm``, which rewrites the weight):
    ``W[i] + A[i] B^T``. Only these exact classes, with no ``forward`` of their own set on the instance.
    """
    if "forward" in module.__dict__ and not getattr(module.__dict__["forward"], "member_aware", False):
        return False
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Embedding and module.max_norm is None


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
