"""Running statistics of normalization layers updated by the official pass only, never by perturbed members.

With backprop, a ``BatchNorm`` in training mode updates its running mean and variance once per step, from the batch
the model sees. A forward-only step also evaluates the batch at every member's perturbed weights; left alone, each
of those forwards would update the running statistics too, and the model evaluated later would carry statistics of
weights it never had. While members are evaluated, the training-mode batch norms that track running statistics lose
their statistics buffers for the time (the layer then normalizes with the batch's own statistics, exactly as in
training mode, and writes nothing; ``vmap`` batches it); the buffers come back afterwards, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _NormBase


def running_statistics_layers(roots: Iterable[nn.Module]) -> list[_NormBase]:
    """The batch and instance norms under ``roots`` (each once) that can track running statistics.

    Args:
        roots: the user's modules.
    """
    seen: dict[int, _NormBase] = {}
    for root in roots:
        for module in root.modules():
            if isinstance(module, _NormBase):
                seen.setdefault(id(module), module)
    return list(seen.values())


@contextmanager
def running_statistics_frozen(layers: Sequence[_NormBase]) -> Iterator[None]:
    """Within the context, the training-mode ``layers`` that track running statistics normalize with batch
    statistics and update nothing (running mean, variance and batch count).

    Args:
        layers: what :func:`running_statistics_layers` found.
    """
    saved = []
    for layer in layers:
        if layer.training and layer.track_running_stats and layer.running_mean is not None:
            saved.append((layer, layer.running_mean, layer.running_var, layer.num_batches_tracked))
            layer.running_mean = None
            layer.running_var = None
            layer.num_batches_tracked = None
    try:
        yield
    finally:
        for layer, mean, var, count in saved:
            layer.running_mean = mean
            layer.running_var = var
            layer.num_batches_tracked = count
