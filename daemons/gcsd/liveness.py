"""Which nodes have gone quiet: a pure timer table, driven by the caller's clock.

Ray's GCS marks a node dead when its raylet misses heartbeats for a while;
here the caller reports each heartbeat with :meth:`Liveness.heard` and asks
:meth:`Liveness.expired` on every tick. Times are whatever monotonic clock
the caller uses; this module never reads one.
"""

from __future__ import annotations


class Liveness:
    """Last-heard times per node. Not thread-safe."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("node timeout must be > 0")
        self.timeout_s = timeout_s
        self._last: dict[bytes, float] = {}

    def heard(self, node_id: bytes, now: float) -> None:
        """Record a sign of life from ``node_id`` at time ``now``."""
        self._last[node_id] = now

    def forget(self, node_id: bytes) -> None:
        """Stop watching a node (it left, or was declared dead)."""
        self._last.pop(node_id, None)

    def watching(self, node_id: bytes) -> bool:
        return node_id in self._last

    def expired(self, now: float) -> list[bytes]:
        """Return and stop watching every node silent for more than the timeout."""
        dead = [n for n, t in self._last.items() if now - t > self.timeout_s]
        for n in dead:
            del self._last[n]
        return dead
