"""Activations that run in place during a batched population's forward.

In ``nn.Sequential(..., nn.Linear(...), nn.ReLU(), ...)`` the activation receives the layer's output, a fresh
tensor that only the container refers to, which passes it on and drops it. Computing the activation in place
there is exact and spares a population-sized buffer (the in-place activation is also faster on the CPU), and a
population's activations are the largest tensors of its forward. The training step runs under ``no_grad``, so
no saved tensor is overwritten either.

Only pairs whose safety shows in the module tree are used: a plain ``nn.Sequential`` (its own ``forward``), an
``nn.Linear`` (no forward hooks of the user's that could keep its output) directly followed by a deterministic
activation module that is registered once in the model (so no other code path calls it) and has no hooks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules import module as module_internals

#: activation modules with an exact ``inplace`` mode that ``vmap`` supports (``nn.RReLU`` draws random slopes and
#: has no batching rule for ``rrelu_``; dropout is not an activation)
IN_PLACE_CAPABLE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.Mish,
    nn.Threshold,
)


def activations_after_linear(roots: Iterable[nn.Module]) -> list[tuple[nn.Linear, nn.Module]]:
    """The ``(linear, activation)`` pairs of plain ``nn.Sequential`` containers in ``roots`` whose activation
    may run in place: an exact ``IN_PLACE_CAPABLE`` type, not in place already, registered once in ``roots``.

    Args:
        roots: the modules to search (the model).
    """
    roots = list(roots)
    registered = Counter(id(module) for root in roots for _, module in root.named_modules(remove_duplicate=False))
    pairs: list[tuple[nn.Linear, nn.Module]] = []
    seen: set[int] = set()
    for root in roots:
        for container in root.modules():
            if type(container) is not nn.Sequential or id(container) in seen:
                continue
            seen.add(id(container))
            children = list(container)
            for before, after in zip(children, children[1:]):
                if (
                    type(before) is nn.Linear
                    and type(after) in IN_PLACE_CAPABLE
                    and not getattr(after, "inplace", True)
                    and registered[id(after)] == 1
                ):
                    pairs.append((before, after))
    return pairs


def _unhooked(linear: nn.Linear, activation: nn.Module) -> bool:
    """No hook that could hold the layer's output or the activation's input (checked on every use: hooks come
    and go)."""
    return not (linear._forward_hooks or activation._forward_pre_hooks or activation._forward_hooks)


@contextmanager
def activations_in_place(pairs: list[tuple[nn.Linear, nn.Module]]) -> Iterator[None]:
    """Within the context, the activations of ``pairs`` (see :func:`activations_after_linear`) compute in place.

    Nothing changes while a global forward hook is registered (it sees every module's output). Each module's
    ``inplace`` flag is restored on exit, also after an exception.

    Args:
        pairs: the ``(linear, activation)`` pairs; enter before the evaluation registers its own hooks.
    """
    if module_internals._global_forward_hooks or module_internals._global_forward_pre_hooks:
        yield
        return
    switched = [activation for linear, activation in pairs if _unhooked(linear, activation)]
    for activation in switched:
        activation.inplace = True
    try:
        yield
    finally:
        for activation in switched:
            activation.inplace = False
