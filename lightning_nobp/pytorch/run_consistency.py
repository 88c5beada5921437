"""Every process must start the same run: compare a fingerprint of the configuration and initial state at the start.

Forward-only ranks exchange nothing but fitness scalars: each applies the update itself, from the shared seeds. Ranks
that were started with different seeds, algorithm settings, optimizer hyperparameters or checkpoints would therefore
drift apart silently. :func:`check_ranks_agree` gathers a small fingerprint from every rank before the first step
(one ``all_gather_object`` of a few strings) and raises the same clear error on every rank when they differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

SIMPLE_TYPES = (bool, int, float, str, type(None))


def describe(value: Any) -> str:
    """A stable, address-free description of a setting: simple values as they are, containers recursively, other
    objects by their type and their simple attributes.

    Args:
        value: the setting (an algorithm, a precision plugin, a hyperparameter).
    """
    if isinstance(value, SIMPLE_TYPES):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(describe(item) for item in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {describe(item)}" for key, item in sorted(value.items(), key=str)) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor({value.detach().cpu().tolist()})" if value.numel() <= 8 else f"tensor{tuple(value.shape)}"
    attributes = {
        key: item
        for key, item in sorted(vars(value).items())
        if not key.startswith("_") and isinstance(item, (*SIMPLE_TYPES, list, tuple))
    } if hasattr(value, "__dict__") else {}
    return f"{type(value).__name__}({', '.join(f'{k}={describe(v)}' for k, v in attributes.items())})"


def tensor_digest(tensors: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 of named tensors' bytes (low-bit tensor subclasses by their stored tensors), in the given order.

    Args:
        tensors: ``(name, tensor)`` pairs; other values are described by :func:`describe`.
    """
    digest = hashlib.sha256()
    pending = list(tensors)
    while pending:
        name, value = pending.pop(0)
        if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter) and hasattr(
            value, "__tensor_flatten__"
        ):
            names, _ = value.__tensor_flatten__()
            pending[:0] = [(f"{name}.{inner}", getattr(value, inner)) for inner in names if getattr(value, inner, None)
                           is not None]
            continue
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            plain = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{plain.dtype}{tuple(value.shape)}".encode())
            if plain.numel():
                digest.update(plain.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(describe(value).encode())
    return digest.hexdigest()[:16]


def optimizer_fingerprint(optimizer: Optimizer) -> str:
    """The optimizer's type and every parameter group's hyperparameters and size (not the parameters' values).

    Args:
        optimizer: the user's optimizer.
    """
    groups = [
        {**{key: value for key, value in group.items() if key != "params"}, "parameters": len(group["params"])}
        for group in optimizer.param_groups
    ]
    return f"{type(optimizer).__name__}{describe(groups)}"


def optimizer_state_digest(optimizer: Optimizer) -> str:
    """Digest of the optimizer's state (momentum buffers, Adam's moments, step counts), in parameter order."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    entries: list[tuple[str, Any]] = []
    for param, state in optimizer.state.items():
        for key, value in sorted(state.items()):
            entries.append((f"{index.get(id(param), -1)}.{key}", value))
    entries.sort(key=lambda entry: entry[0])
    return tensor_digest(entries)


def run_fingerprint(
    settings: dict[str, Any], module: nn.Module, optimizers: Sequence[Optimizer]
) -> dict[str, str]:
    """What must be equal on every rank: the settings, the optimizers, the weights and the optimizers' state.

    Args:
        settings: named settings of the strategy and trainer (algorithm, seed, update path, accumulation, ...).
        module: the model being trained (its ``state_dict``: parameters and buffers).
        optimizers: the user's optimizers.
    """
    fingerprint = {name: describe(value) for name, value in settings.items()}
    for index, optimizer in enumerate(optimizers):
        fingerprint[f"optimizer {index}"] = optimizer_fingerprint(optimizer)
        fingerprint[f"optimizer {index} state"] = optimizer_state_digest(optimizer)
    fingerprint["initial weights"] = tensor_digest(sorted(module.state_dict().items()))
    return fingerprint


class RanksDisagreeError(RuntimeError):
    """The processes of one run were started with different configurations, seeds or states."""


def check_ranks_agree(fingerprint: dict[str, str], group: Any = None) -> None:
    """Gather every rank's fingerprint and raise the same :class:`RanksDisagreeError` on every rank if they differ.

    Does nothing with one process. Every rank must call it (one collective).

    Args:
        fingerprint: this rank's :func:`run_fingerprint`.
        group: the process group (the default one when ``None``).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    gathered: list[dict[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, fingerprint, group=group)
    reference = gathered[0] or {}
    differences = []
    for rank, other in enumerate(gathered[1:], start=1):
        other = other or {}
        for key in sorted(set(reference) | set(other)):
            if reference.get(key) != other.get(key):
                differences.append(f"  {key}: rank 0 has {reference.get(key)}, rank {rank} has {other.get(key)}")
    if differences:
        raise RanksDisagreeError(
            "lightning_nobp: the processes of this run disagree before the first step, so their forward-only updates"
            " (regenerated on every rank from the same seeds) would silently drift apart:\n"
            + "\n".join(differences)
            + "\nStart every rank with the same seed (NoBackpropStrategy(seed=...) or seed_everything on every rank),"
            " the same algorithm, optimizer and trainer settings, and the same checkpoint."
        )


__all__ = [
    "RanksDisagreeError",
    "check_ranks_agree",
    "describe",
    "optimizer_fingerprint",
    "optimizer_state_digest",
    "run_fingerprint",
    "tensor_digest",
]
