"""LRU eviction policy: decides which cached objects to drop, never drops them.

Only sealed objects that nobody pins are candidates; the store adds an object
when its last pin goes away (that moment counts as its last use) and removes
it when someone pins it again or it is deleted. ``choose`` then walks the
candidates from least to most recently used, as Ray's ``LRUCache`` does in
``eviction_policy.h``, and the store performs the eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EvictionChoice:
    """Objects to evict, oldest first, and the bytes still missing after them."""

    oids: list[bytes]
    short: int


class LruPolicy:
    """Least-recently-released-first candidate list. Not thread-safe."""

    def __init__(self) -> None:
        self._lru: OrderedDict[bytes, int] = OrderedDict()  # oid -> reserved bytes, oldest first
        self.evictable_bytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self._lru

    def __iter__(self) -> Iterator[bytes]:
        """Candidates, least recently used first."""
        return iter(self._lru)

    def items(self) -> Iterator[tuple[bytes, int]]:
        """``(oid, bytes)`` of the candidates, least recently used first."""
        return iter(self._lru.items())

    def add(self, oid: bytes, nbytes: int) -> None:
        """Make ``oid`` evictable as the most recently used entry."""
        old = self._lru.pop(oid, None)
        if old is not None:
            self.evictable_bytes -= old
        self._lru[oid] = nbytes
        self.evictable_bytes += nbytes

    def remove(self, oid: bytes) -> None:
        """Stop considering ``oid`` (it was pinned, deleted or evicted); no-op if absent."""
        nbytes = self._lru.pop(oid, None)
        if nbytes is not None:
            self.evictable_bytes -= nbytes

    def choose(self, need: int) -> EvictionChoice:
        """Pick the oldest candidates whose bytes add up to ``need``.

        Args:
            need: bytes to free; <= 0 means nothing to do.

        Returns:
            The oids to evict (oldest first) and how many bytes would still be
            missing if all of them were evicted (0 when ``need`` is covered).
        """
        picked: list[bytes] = []
        got = 0
        if need > 0:
            for oid, nbytes in self._lru.items():
                picked.append(oid)
                got += nbytes
                if got >= need:
                    break
        return EvictionChoice(picked, max(0, need - got))
