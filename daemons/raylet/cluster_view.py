"""The raylet's picture of the cluster: each node's resources, liveness and labels.

Theory of operation
  * gcsd re-broadcasts every raylet's resource snapshot (total, available,
    version, labels) to the other raylets; the shell hands each one to
    :meth:`ClusterView.update`. A snapshot is a whole state, not a delta, so
    a receiver only needs the newest: versions that are not newer than the
    one held are dropped, which makes reordered or repeated deliveries
    harmless.
  * Dead is forever. A node marked dead (``mark_dead`` or ``update(...,
    alive=False)``) never comes back under the same id: a restarted raylet
    joins as a new node, so a late snapshot cannot resurrect a dead one.
  * Optimism. When this raylet spills a lease to another node it subtracts
    the demand from that node here at once (``subtract``), so that the next
    decisions in the same burst do not all pick the same node. The node's
    next real snapshot replaces the guess. If none arrives within
    ``optimism_timeout`` of the first guess, ``expire_optimism(now)`` puts
    the last real snapshot back, so a lost snapshot cannot leave a node
    looking full forever.
  * Change log. Every change to a node's effective state appends its id to a
    log read through ``cursor`` / ``changed_since``, so a consumer such as
    the scheduler's per-demand rankings re-scores only the nodes that
    changed instead of all of them on every pass (Ray re-ran a whole round
    per sync message at 10k nodes, PR #66036).

All amounts are :class:`ResourceSet` (integer fixed point). No I/O, no clock:
time enters only as the ``now`` argument, in any unit as long as the caller
is consistent and never goes backwards. Not thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from daemons.raylet.resources import ResourceSet

NodeId = bytes

# Log entries kept before the oldest half is dropped; a reader further behind
# than that is told to rebuild (``changed_since`` returns None).
_LOG_MIN = 4096


@dataclass(frozen=True)
class NodeInfo:
    """One node as this raylet currently sees it.

    ``available`` is the last real snapshot minus any live optimistic
    subtractions; it may be negative (a worker that stopped blocking takes
    its CPU back even when that overcommits the node, as Ray does).
    """

    node_id: NodeId
    total: ResourceSet
    available: ResourceSet
    version: int
    alive: bool
    labels: Mapping[str, str] = field(default_factory=dict)


class _Node:
    __slots__ = ("total", "real", "guess", "available", "version", "alive", "labels", "info")

    def __init__(self, total: ResourceSet, available: ResourceSet, version: int,
                 alive: bool, labels: dict[str, str]) -> None:
        self.total = total
        self.real = available          # last snapshot as received
        self.guess = ResourceSet()     # optimistic subtractions since then
        self.available = available     # real - guess, kept ready for the hot path
        self.version = version
        self.alive = alive
        self.labels = labels
        self.info: NodeInfo | None = None  # frozen copy handed out until the next change


class ClusterView:
    """Every known node's total and available resources, version, liveness and labels.

    Args:
        optimism_timeout: how long (in the caller's ``now`` units) an
            optimistic subtraction may stand without a fresh snapshot before
            ``expire_optimism`` reverts the node to its last real snapshot.
            Ray uses 3 s.
    """

    def __init__(self, optimism_timeout: float = 3.0) -> None:
        if optimism_timeout <= 0:
            raise ValueError("optimism_timeout must be positive")
        self.optimism_timeout = optimism_timeout
        self._nodes: dict[NodeId, _Node] = {}
        self._alive_sorted: list[NodeId] | None = []
        self._alive_count = 0
        # node -> `now` of its first optimistic subtraction since its last real
        # snapshot. Insertion order is time order (now never goes backwards),
        # so expiry stops at the first entry that is still young.
        self._optimistic: dict[NodeId, float] = {}
        self._log: list[NodeId] = []
        self._log_start = 0

    # ---- inputs -----------------------------------------------------------
    def update(self, node_id: NodeId, total: ResourceSet, available: ResourceSet,
               version: int, alive: bool = True,
               labels: Mapping[str, str] | None = None) -> bool:
        """Apply a node's snapshot if it is newer than the one held.

        Args:
            node_id: the node the snapshot describes.
            total, available: its resources at ``version``.
            version: the node's own counter, larger for newer snapshots.
            alive: False records the node as dead (forever).
            labels: the node's labels; None keeps the ones held.
        Returns:
            True if the snapshot was applied; False if it was stale, or the
            node is already dead.
        Raises:
            TypeError, ValueError: malformed arguments (nothing is changed).
        """
        _check_id(node_id)
        if not isinstance(total, ResourceSet) or not isinstance(available, ResourceSet):
            raise TypeError("total and available must be ResourceSet")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version {version!r} must be a non-negative int")
        if labels is not None:
            if not isinstance(labels, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
                raise TypeError("labels must map str to str")
            labels = dict(labels)
        node = self._nodes.get(node_id)
        if node is not None and (not node.alive or version <= node.version):
            return False
        if node is None:
            node = _Node(total, available, version, bool(alive), labels or {})
            self._nodes[node_id] = node
            if node.alive:
                self._alive_changed(+1)
        else:
            node.total = total
            node.real = available
            node.guess = ResourceSet()
            node.available = available
            node.version = version
            if labels is not None:
                node.labels = labels
            self._optimistic.pop(node_id, None)
            if not alive:
                node.alive = False
                self._alive_changed(-1)
        self._changed(node_id)
        return True

    def mark_dead(self, node_id: NodeId) -> bool:
        """Record that a node died (gcsd said so). Unknown nodes are remembered as dead.

        Returns:
            True if this changed anything.
        """
        _check_id(node_id)
        node = self._nodes.get(node_id)
        if node is None:
            self._nodes[node_id] = _Node(ResourceSet(), ResourceSet(), 0, False, {})
            self._changed(node_id)
            return True
        if not node.alive:
            return False
        node.alive = False
        self._optimistic.pop(node_id, None)
        self._alive_changed(-1)
        self._changed(node_id)
        return True

    def subtract(self, node_id: NodeId, demand: ResourceSet, now: float) -> None:
        """Optimistically take ``demand`` off a live node we just sent work to.

        Raises:
            KeyError: unknown node. ValueError: dead node. TypeError: bad demand.
            (Nothing is changed in either case.)
        """
        if not isinstance(demand, ResourceSet):
            raise TypeError("demand must be a ResourceSet")
        node = self._nodes[node_id]
        if not node.alive:
            raise ValueError(f"node {node_id.hex()} is dead")
        node.guess = node.guess + demand
        node.available = node.real - node.guess
        self._optimistic.setdefault(node_id, now)
        self._changed(node_id)

    def expire_optimism(self, now: float) -> list[NodeId]:
        """Revert nodes whose optimistic guess outlived ``optimism_timeout``.

        Returns:
            The nodes reverted to their last real snapshot, oldest guess first.
        """
        expired = []
        for node_id, since in self._optimistic.items():
            if now - since < self.optimism_timeout:
                break
            expired.append(node_id)
        for node_id in expired:
            del self._optimistic[node_id]
            node = self._nodes[node_id]
            node.guess = ResourceSet()
            node.available = node.real
            self._changed(node_id)
        return expired

    # ---- queries ----------------------------------------------------------
    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[NodeId]:
        """Every known node id, dead ones included."""
        return iter(list(self._nodes))

    def node(self, node_id: NodeId) -> NodeInfo:
        """A frozen copy of one node's state. Raises KeyError for an unknown node."""
        n = self._nodes[node_id]
        if n.info is None:
            n.info = NodeInfo(node_id, n.total, n.available, n.version, n.alive,
                              MappingProxyType(n.labels))
        return n.info

    def alive_nodes(self) -> list[NodeId]:
        """Ids of live nodes in sorted order (a fresh list)."""
        return list(self._sorted_alive())

    @property
    def alive_count(self) -> int:
        return self._alive_count

    def is_alive(self, node_id: NodeId) -> bool:
        n = self._nodes.get(node_id)
        return n is not None and n.alive

    def is_feasible(self, node_id: NodeId, demand: ResourceSet) -> bool:
        """True if the node is alive and its total could ever hold ``demand``."""
        n = self._nodes.get(node_id)
        return n is not None and n.alive and demand.fits_in(n.total)

    def is_available(self, node_id: NodeId, demand: ResourceSet) -> bool:
        """True if the node is alive and ``demand`` fits what it has free now."""
        n = self._nodes.get(node_id)
        return n is not None and n.alive and demand.fits_in(n.available)

    def feasible_nodes(self, demand: ResourceSet) -> list[NodeId]:
        """Live nodes whose total could hold ``demand``, sorted by id."""
        nodes = self._nodes
        return [i for i in self._sorted_alive() if demand.fits_in(nodes[i].total)]

    def any_feasible(self, demand: ResourceSet) -> bool:
        nodes = self._nodes
        return any(demand.fits_in(nodes[i].total) for i in self._sorted_alive())

    # ---- change log -------------------------------------------------------
    @property
    def cursor(self) -> int:
        """Position after the newest change; pass it to ``changed_since`` later."""
        return self._log_start + len(self._log)

    def changed_since(self, cursor: int) -> list[NodeId] | None:
        """Nodes changed after ``cursor`` (repeats possible), or None if the log
        no longer reaches back that far and the reader must rebuild."""
        if cursor < self._log_start:
            return None
        return self._log[cursor - self._log_start:]

    # ---- private ----------------------------------------------------------
    def _changed(self, node_id: NodeId) -> None:
        self._nodes[node_id].info = None
        self._log.append(node_id)
        if len(self._log) > max(_LOG_MIN, 8 * len(self._nodes)):
            drop = len(self._log) // 2
            del self._log[:drop]
            self._log_start += drop

    def _alive_changed(self, delta: int) -> None:
        self._alive_count += delta
        self._alive_sorted = None

    def _sorted_alive(self) -> list[NodeId]:
        if self._alive_sorted is None:
            self._alive_sorted = sorted(i for i, n in self._nodes.items() if n.alive)
        return self._alive_sorted


def _check_id(node_id: object) -> None:
    if not isinstance(node_id, bytes) or not node_id:
        raise TypeError(f"node id {node_id!r} must be non-empty bytes")
