"""``NoiseCache``: keeps recently drawn noise so a step draws each member's noise once, not three times.

A step draws a member's noise for its ``+`` evaluation, again for its antithetic ``-`` twin and again when the
update is formed. Noise is a pure function of (seed, parameter, shape, device), so keeping the last few draws is
exact; the cache is bounded in bytes and evicts the least recently used draws first.

Draws are kept as the stacks they were drawn in (one tensor for a whole population's noise of a parameter, not one
small tensor per member): a later request for the same members returns one copy of that stack.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from itertools import count, repeat

import torch
from torch import Tensor

DEFAULT_NOISE_CACHE_BYTES = 64 * 1024 * 1024


class NoiseCache:
    """Least-recently-used cache of noise stacks, bounded by their total size in bytes.

    An entry is one key's row of a stack of draws (the tensors ``draw_many`` returned for several keys at once).
    What the cache returns is always a new tensor: callers may modify it in place.

    Args:
        max_bytes: the most bytes kept; ``0`` disables caching.
    """

    def __init__(self, max_bytes: int = DEFAULT_NOISE_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"NoiseCache(max_bytes={max_bytes}): the size must be >= 0 (0 disables the cache)")
        self.max_bytes = max_bytes
        self._stacks: OrderedDict[int, tuple[tuple[Tensor, ...], list[Hashable], int]] = OrderedDict()
        self._rows: dict[Hashable, tuple[int, int]] = {}  # key -> (stack id, row)
        self._whole: dict[tuple[Hashable, ...], int] = {}  # all keys of a stack, in order -> stack id
        self._bytes = 0
        self._next_id = 0
        #: a small integer per kind of entry (what, parameter, shape, device, ...), see :meth:`keys`
        self._kinds: dict[Hashable, int] = {}
        self.hits = 0
        self.misses = 0

    def keys(self, kind: Hashable, seeds: Sequence[int]) -> list[Hashable]:
        """The keys of ``seeds``' entries of one kind (e.g. ``("factors", param_index, shape, device)``).

        The kind is interned once as a small integer: a key is then a pair of integers, which hashes in a fraction
        of the time of a tuple holding a ``torch.Size`` and a ``torch.device`` (a step hashes hundreds of keys).
        """
        tag = self._kinds.get(kind)
        if tag is None:
            tag = self._kinds[kind] = len(self._kinds)
        return [(tag, seed) for seed in seeds]

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: Hashable, draw: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """The tensors cached under ``key`` (copies), drawing (and keeping) them with ``draw()`` when absent."""
        stacked = self.get_stacked([key], lambda missing: tuple(t.unsqueeze(0) for t in draw()))
        return tuple(t[0] for t in stacked)

    def get_stacked(
        self, keys: Sequence[Hashable], draw_many: Callable[[list[int]], tuple[Tensor, ...]]
    ) -> tuple[Tensor, ...]:
        """The entries of ``keys`` stacked along a first dimension (new tensors), drawing every absent one in a
        single ``draw_many(positions)`` call.

        Args:
            keys: the entries wanted, in order.
            draw_many: given the positions in ``keys`` of the absent entries, returns their entries stacked (each
                tensor's first dimension runs over those positions, in order), so a whole population's noise is
                drawn with one batched computation instead of one per member.
        """
        whole = self._whole.get(tuple(keys))
        if whole is not None:  # the same keys as one earlier draw (a population asked again): no per-key lookups
            self.hits += len(keys)
            return tuple(t.clone() for t in self._touch(whole))
        consecutive = self._consecutive_rows(keys)
        if consecutive is not None:  # a step's seeds in a window drawn for several steps: one slice
            stack_id, start = consecutive
            self.hits += len(keys)
            return tuple(t[start : start + len(keys)].clone() for t in self._touch(stack_id))
        places = [self._rows.get(key) for key in keys]
        if places and None not in places and len({stack_id for stack_id, _ in places}) == 1:
            # all rows of one stack (a window drawn for several steps): one gather
            self.hits += len(keys)
            stack = self._touch(places[0][0])
            index = torch.tensor([row for _, row in places], device=stack[0].device)
            return tuple(t.index_select(0, index) for t in stack)
        found: list[tuple[tuple[Tensor, ...], int] | None] = []
        missing: list[int] = []
        for position, where in enumerate(places):
            if where is None:
                missing.append(position)
                found.append(None)
            else:
                found.append((self._touch(where[0]), where[1]))
        self.hits += len(keys) - len(missing)
        if missing:
            self.misses += len(missing)
            drawn = tuple(draw_many(missing))
            self._keep([keys[position] for position in missing], drawn)
            if len(missing) == len(keys):
                return tuple(t.clone() for t in drawn)  # all new: the draw itself, in the keys' order
            for row, position in enumerate(missing):
                found[position] = (drawn, row)
        rows = [where for where in found if where is not None]
        first = rows[0][0]
        if all(tensors is first for tensors, _ in rows):  # one stack: one gather
            index = torch.tensor([row for _, row in rows], device=first[0].device)
            return tuple(t.index_select(0, index) for t in first)
        return tuple(torch.stack([tensors[part][row] for tensors, row in rows]) for part in range(len(first)))

    def holds(self, keys: Sequence[Hashable]) -> bool:
        """Whether every one of ``keys`` is cached."""
        if tuple(keys) in self._whole or self._consecutive_rows(keys) is not None:
            return True
        return all(key in self._rows for key in keys)

    def _consecutive_rows(self, keys: Sequence[Hashable]) -> tuple[int, int] | None:
        """``(stack id, first row)`` when ``keys`` are consecutive rows of one cached stack, else ``None``."""
        first = self._rows.get(keys[0]) if keys else None
        if first is None:
            return None
        stack_id, start = first
        stack_keys = self._stacks[stack_id][1]
        return first if stack_keys[start : start + len(keys)] == list(keys) else None

    def put(self, keys: Sequence[Hashable], tensors: tuple[Tensor, ...]) -> None:
        """Keep ``tensors`` (row ``i`` of each is the entry of ``keys[i]``), drawn ahead of the requests for them.

        Args:
            keys: the entries, in row order.
            tensors: the entries stacked along a first dimension (kept, not copied: do not modify them).
        """
        self.misses += len(keys)
        self._keep(list(keys), tensors)

    def _touch(self, stack_id: int) -> tuple[Tensor, ...]:
        self._stacks.move_to_end(stack_id)
        return self._stacks[stack_id][0]

    def _keep(self, keys: list[Hashable], tensors: tuple[Tensor, ...]) -> None:
        """Keep a drawn stack under ``keys`` (its rows, in order), unless it is larger than the whole cache."""
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.max_bytes:
            return
        stack_id = self._next_id
        self._next_id += 1
        self._stacks[stack_id] = (tensors, keys, size)
        self._bytes += size
        self._rows.update(zip(keys, zip(repeat(stack_id), count())))
        self._whole[tuple(keys)] = stack_id
        while self._bytes > self.max_bytes:
            evicted_id, (_, evicted_keys, evicted_size) = self._stacks.popitem(last=False)
            self._bytes -= evicted_size
            if self._whole.get(tuple(evicted_keys)) == evicted_id:
                del self._whole[tuple(evicted_keys)]
            for key in evicted_keys:
                if self._rows.get(key, (None,))[0] == evicted_id:
                    del self._rows[key]

    def clear(self) -> None:
        """Forget every entry."""
        self._stacks.clear()
        self._rows.clear()
        self._whole.clear()
        self._bytes = 0

    def __getstate__(self) -> dict:
        # pickled with an algorithm (spawned processes, checkpoints): the tensors are not worth shipping
        state = dict(self.__dict__)
        state.update(hits=0, misses=0, _stacks=OrderedDict(), _rows={}, _whole={}, _bytes=0, _kinds={})
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"_kinds": {}, **state})  # pickled before entry kinds were interned: none yet
