"""``NoiseCache``: keeps recently drawn noise so a step draws each member's noise once, not three times.

A step draws a member's noise for its ``+`` evaluation, again for its antithetic ``-`` twin and again when the
update is formed. Noise is a pure function of (seed, parameter, shape, device), so keeping the last few draws is
exact; the cache is bounded in bytes and evicts the least recently used draws first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from torch import Tensor

DEFAULT_NOISE_CACHE_BYTES = 64 * 1024 * 1024


class NoiseCache:
    """Least-recently-used cache of noise tensors, bounded by their total size in bytes.

    Cached tensors are shared: callers must not modify what ``get`` returns in place (clone it first).

    Args:
        max_bytes: the most bytes kept; ``0`` disables caching.
    """

    def __init__(self, max_bytes: int = DEFAULT_NOISE_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"NoiseCache(max_bytes={max_bytes}): the size must be >= 0 (0 disables the cache)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Tensor, ...]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: Hashable, draw: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """The tensors cached under ``key``, drawing (and keeping) them with ``draw()`` when absent."""
        (entry,) = self.get_many([key], lambda missing: [draw()])
        return entry

    def get_many(
        self, keys: Sequence[Hashable], draw_many: Callable[[list[int]], Sequence[tuple[Tensor, ...]]]
    ) -> list[tuple[Tensor, ...]]:
        """The entries of ``keys``, drawing every absent one in a single ``draw_many(positions)`` call.

        Args:
            keys: the entries wanted, in order.
            draw_many: given the positions in ``keys`` of the absent entries, returns their entries in that order
                (so a whole population's noise is drawn with one batched computation instead of one per member).
        """
        entries: list[tuple[Tensor, ...] | None] = []
        missing: list[int] = []
        for position, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None:
                missing.append(position)
            else:
                self._entries.move_to_end(key)
            entries.append(entry)
        self.hits += len(keys) - len(missing)
        if missing:
            self.misses += len(missing)
            drawn = draw_many(missing)
            for position, entry in zip(missing, drawn):
                entries[position] = entry
                self._keep(keys[position], entry)
        return entries  # type: ignore[return-value]

    def _keep(self, key: Hashable, entry: tuple[Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry)
        if size <= self.max_bytes and key not in self._entries:
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= sum(t.numel() * t.element_size() for t in evicted)

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()
        self._bytes = 0

    def __getstate__(self) -> dict:
        # pickled with an algorithm (spawned processes, checkpoints): the tensors are not worth shipping
        return {"max_bytes": self.max_bytes, "hits": 0, "misses": 0, "_entries": OrderedDict(), "_bytes": 0}
