"""Side effects of a training step kept to the official pass: normalization layers' running statistics and
torchmetrics states are never updated by perturbed members.

With backprop, a ``BatchNorm`` in training mode updates its running mean and variance once per step, from the batch
the model sees. A forward-only step also evaluates the batch at every member's perturbed weights; left alone, each
of those forwards would update the running statistics too, and the model evaluated later would carry statistics of
weights it never had. While members are evaluated, the training-mode batch norms that track running statistics lose
their statistics buffers for the time (the layer then normalizes with the batch's own statistics, exactly as in
training mode, and writes nothing; ``vmap`` batches it); the buffers come back afterwards, also after an exception.
torchmetrics objects updated inside ``training_step`` get their state back after the members' evaluations (an
update inside ``vmap`` makes the evaluation fall back to one member at a time, where the restore applies).
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


def metrics_of(roots: Iterable[nn.Module]) -> list[nn.Module]:
    """The torchmetrics ``Metric`` modules under ``roots`` (each once; none when torchmetrics is not installed).

    Args:
        roots: the user's modules.
    """
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        return []
    seen: dict[int, nn.Module] = {}
    for root in roots:
        for module in root.modules():
            if isinstance(module, Metric):
                seen.setdefault(id(module), module)
    return list(seen.values())


def _copied(value: object) -> object:
    if isinstance(value, list):
        return [v.clone() if hasattr(v, "clone") else v for v in value]
    return value.clone() if hasattr(value, "clone") else value


@contextmanager
def metric_states_kept(metrics: Sequence[nn.Module]) -> Iterator[None]:
    """Within the context, torchmetrics objects may be updated (a ``training_step`` that updates its metrics);
    afterwards every metric has the state it had before (its accumulated values, update count, cached result).

    Args:
        metrics: what :func:`metrics_of` found.
    """
    saved = [
        (
            metric,
            {name: _copied(getattr(metric, name)) for name in metric._defaults},
            metric._update_count,
            metric._computed,
        )
        for metric in metrics
    ]
    try:
        yield
    finally:
        for metric, states, count, computed in saved:
            for name, value in states.items():
                setattr(metric, name, value)
            metric._update_count = count
            metric._computed = computed
