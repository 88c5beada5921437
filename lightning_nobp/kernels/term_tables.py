"""The tables a grouped update kernel reads: one entry per weight of the group, and which weight each program takes.

A grouped kernel updates every weight of a group in one launch. Program ``p`` looks up its weight ``w`` in the
block table and reads that weight's addresses (its storage, its decay, its low-rank factors, its dense term) and
sizes from small device tables built here. Addresses are ``data_ptr()`` values; ``0`` means "no such term".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_nobp.kernels.lowbit_update import UpdateTerms


def decay_tensor(decay: float | Tensor, device: torch.device) -> Tensor:
    """The decay as a one-element float32 tensor on ``device`` (a tensor stays where it is computed: no host read)."""
    if isinstance(decay, Tensor):
        return decay.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), decay, dtype=torch.float32, device=device)


def device_table(values: Sequence[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``values`` as a small tensor on ``device``, copied without waiting for the host."""
    return torch.tensor(list(values), dtype=dtype).to(device, non_blocking=True)


@dataclass
class BlockTable:
    """Which weight each program of a grouped launch updates.

    Args:
        block_weight: int32 ``[programs]``: the weight of each program.
        first_block: int64 ``[weights]``: the first program of each weight.
        programs: how many programs the launch has.
    """

    block_weight: Tensor
    first_block: Tensor
    programs: int


def block_table(blocks: Sequence[int], device: torch.device) -> BlockTable:
    """The block table of weights that take ``blocks[w]`` programs each, built on the device.

    Args:
        blocks: how many programs each weight takes.
        device: where the kernel runs.
    """
    first_block = [sum(blocks[:i]) for i in range(len(blocks))]
    programs = sum(blocks)
    block_weight = torch.repeat_interleave(  # a large model has about a million blocks: made on the device
        torch.arange(len(blocks), dtype=torch.int32, device=device),
        device_table(blocks, device),
        output_size=programs,  # known on the host: no synchronisation
    )
    return BlockTable(block_weight, device_table(first_block, device), programs)


@dataclass
class TermTables:
    """Every weight's update terms as device tables, in the order the grouped kernels take them.

    Args:
        decays: int64 addresses of one-element float32 decays.
        members: int64 ``[weights]``: how many noise streams each weight adds.
        seeds: int64 ``[weights, max_members]`` Philox seeds of the streams.
        coefficients: float32 ``[weights, max_members]`` coefficients of the streams.
        max_members: the row length of ``seeds`` and ``coefficients``.
        factor_a: int64 addresses of float32 ``[rows, rank]`` factors (``0``: no low-rank term).
        factor_b: int64 addresses of float32 ``[cols, rank]`` factors.
        ranks: int64 ``[weights]`` ranks (``0``: no low-rank term).
        dense: int64 addresses of float32 dense terms (``0``: none).
        rounding_seeds: int64 ``[weights]`` seeds of the stochastic-rounding streams.
        keep: the converted tensors the addresses point to, alive until the launch is queued.
    """

    decays: Tensor
    members: Tensor
    seeds: Tensor
    coefficients: Tensor
    max_members: int
    factor_a: Tensor
    factor_b: Tensor
    ranks: Tensor
    dense: Tensor
    rounding_seeds: Tensor
    keep: list[Tensor] = field(default_factory=list)

    def arguments(self) -> tuple[object, ...]:
        """The kernels' term arguments, from ``decays`` to ``rounding_seeds``."""
        return (
            self.decays,
            self.members,
            self.seeds,
            self.coefficients,
            self.max_members,
            self.factor_a,
            self.factor_b,
            self.ranks,
            self.dense,
            self.rounding_seeds,
        )


def term_tables(terms: Sequence[UpdateTerms], rounding_seeds: Sequence[int], device: torch.device) -> TermTables:
    """The device tables of ``terms`` (one entry per weight).

    Args:
        terms: each weight's update terms.
        rounding_seeds: each weight's stochastic-rounding seed.
        device: where the kernel runs.
    """
    keep: list[Tensor] = []

    def address(tensor: Tensor | None) -> int:
        if tensor is None:
            return 0
        converted = tensor.to(device=device, dtype=torch.float32).contiguous()
        keep.append(converted)
        return converted.data_ptr()

    counts = [0 if t.seeds is None or t.coefficients is None else t.seeds.numel() for t in terms]
    max_members = max(counts + [1])
    seeds = torch.zeros(len(terms), max_members, dtype=torch.int64)
    coefficients = torch.zeros(len(terms), max_members, dtype=torch.float32, device=device)
    for i, (term, count) in enumerate(zip(terms, counts)):
        if count:
            seeds[i, :count] = term.seeds.to(torch.int64)
            coefficients[i, :count] = term.coefficients.to(device=device, dtype=torch.float32)
    decays = [decay_tensor(t.decay, device) for t in terms]
    keep.extend(decays)
    has_low_rank = [t.factor_a is not None and t.factor_b is not None for t in terms]
    return TermTables(
        decays=device_table([d.data_ptr() for d in decays], device),
        members=device_table(counts, device),
        seeds=seeds.to(device, non_blocking=True),
        coefficients=coefficients,
        max_members=max_members,
        factor_a=device_table([address(t.factor_a) if low else 0 for t, low in zip(terms, has_low_rank)], device),
        factor_b=device_table([address(t.factor_b) if low else 0 for t, low in zip(terms, has_low_rank)], device),
        ranks=device_table([t.factor_a.shape[1] if low else 0 for t, low in zip(terms, has_low_rank)], device),
        dense=device_table([address(t.dense) for t in terms], device),
        rounding_seeds=device_table(rounding_seeds, device),
        keep=keep,
    )
