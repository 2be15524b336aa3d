"""Placement groups: where each bundle goes, and the two-phase reservation that puts it there.

Theory of operation
  A placement group is a list of *bundles* (resource maps) to reserve
  atomically across nodes, with a strategy. The raylet where the group is
  created coordinates it (see docs/architecture.md, *Placement groups*, for
  why a raylet and not gcsd); this module is its brain and does no I/O:

  1. ``create`` queues the group PENDING.
  2. ``step(nodes, now, epoch)`` picks one pending group (one attempt in
     flight at a time, as Ray's GCS scheduler does), plans its unplaced
     bundles onto nodes with :func:`plan_bundles` from the cluster view's
     free resources, and returns :class:`Prepare` actions, one per bundle.
     A group that fits nowhere stays PENDING and is planned again when the
     view changes (``epoch``), i.e. when nodes join or resources free.
  3. Each node answers its prepare (``prepared(ok)``): the raylet there
     locked the resources, or refused (they were taken meanwhile, or the
     node is gone). All yes: :class:`Commit` to every node. Any no: every
     bundle already prepared gets :class:`Return` (rollback), the group goes
     back to PENDING and is retried after a backoff (0.1 s, x1.5, up to 1 s).
  4. All commits acknowledged: the group is CREATED (:class:`Persist`). A
     failed commit (the node died between phases) rolls the attempt back
     the same way.
  5. ``remove`` returns every reserved bundle and marks the group REMOVED;
     replies for a removed group's attempt turn into returns.
  6. ``node_dead`` un-places the bundles on that node: the group goes
     RESCHEDULING, keeps its other bundles (and what runs in them), and is
     planned first, for the missing bundles only, as Ray does.
  7. ``owner_gone`` removes the non-detached groups its creator made.

  Replies are matched by (group, bundle index, node) and ignored when they
  no longer match the attempt, so late, duplicate or reordered replies are
  harmless. Not thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from daemons.raylet.resources import ResourceSet

NodeId = bytes

PACK = "PACK"
SPREAD = "SPREAD"
STRICT_PACK = "STRICT_PACK"
STRICT_SPREAD = "STRICT_SPREAD"
STRATEGIES = (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD)

PENDING = "PENDING"
CREATED = "CREATED"
RESCHEDULING = "RESCHEDULING"
REMOVED = "REMOVED"

_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 1.0
_BACKOFF_FACTOR = 1.5
_SEARCH_LIMIT = 20_000  # STRICT_SPREAD backtracking steps before giving up


# ---- where bundles go ---------------------------------------------------------
def plan_bundles(bundles: list[ResourceSet], strategy: str,
                 available: Mapping[NodeId, ResourceSet], *,
                 placed: Mapping[int, NodeId] | None = None,
                 prefer: NodeId | None = None) -> dict[int, NodeId] | None:
    """Choose a node for every bundle not in ``placed``; None if they cannot all fit now.

    Args:
        bundles: every bundle of the group, by index.
        strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.
        available: free resources of each live node (the cluster view).
        placed: bundles already reserved (index -> node), e.g. the survivors
            of a dead node; they constrain the strict strategies.
        prefer: tried first among equals (the coordinator's own node, where
            prepare costs no network round trip).
    Returns:
        index -> node for the unplaced bundles, or None.

    Rules: STRICT_PACK puts every bundle on one node; PACK does that if it
    can, else packs onto as few nodes as it can (busiest-fitting first);
    STRICT_SPREAD puts each bundle on a different node (searching, so a
    plan is found whenever one exists); SPREAD prefers nodes the group does
    not use yet, then the one it uses least. Big bundles are placed first
    (scarce ones are hardest to fit). Ties: ``prefer``, then lower node id.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown placement strategy {strategy!r}")
    placed = dict(placed or {})
    todo = [i for i in range(len(bundles)) if i not in placed]
    if not todo:
        return {}
    free = dict(available)
    order = sorted(free, key=lambda n: (n != prefer, n))
    todo.sort(key=lambda i: (*_weight(bundles[i]), i))
    if strategy == STRICT_PACK:
        return _one_node(bundles, todo, free, order, set(placed.values()))
    if strategy == PACK:
        used = set(placed.values())
        if len(used) <= 1:
            plan = _one_node(bundles, todo, free, order, used)
            if plan is not None:
                return plan
        return _greedy(bundles, todo, free, order, placed, spread=False)
    if strategy == STRICT_SPREAD:
        return _distinct(bundles, todo, free, order, set(placed.values()))
    return _greedy(bundles, todo, free, order, placed, spread=True)


def _weight(r: ResourceSet) -> tuple[int, int]:
    """Sort key: GPU bundles first, then bigger ones."""
    return (0 if r.get("GPU") else 1, -sum(r.get(k) for k in r.names()))


def _one_node(bundles: list[ResourceSet], todo: list[int], free: dict[NodeId, ResourceSet],
              order: list[NodeId], used: set[NodeId]) -> dict[int, NodeId] | None:
    need = ResourceSet()
    for i in todo:
        need = need + bundles[i]
    candidates = list(used) if used else order
    for node in candidates:
        if node in free and need.fits_in(free[node]):
            return {i: node for i in todo}
    return None


def _greedy(bundles: list[ResourceSet], todo: list[int], free: dict[NodeId, ResourceSet],
            order: list[NodeId], placed: Mapping[int, NodeId], spread: bool
            ) -> dict[int, NodeId] | None:
    count: dict[NodeId, int] = {}
    for node in placed.values():
        count[node] = count.get(node, 0) + 1
    plan: dict[int, NodeId] = {}
    rank = {n: k for k, n in enumerate(order)}
    for i in todo:
        fits = [n for n in order if bundles[i].fits_in(free[n])]
        if not fits:
            return None
        if spread:  # least used by this group first
            node = min(fits, key=lambda n: (count.get(n, 0), rank[n]))
        else:       # a node the group already uses first, then the preferred order
            node = min(fits, key=lambda n: (count.get(n, 0) == 0, rank[n]))
        plan[i] = node
        free[node] = free[node] - bundles[i]
        count[node] = count.get(node, 0) + 1
    return plan


def _distinct(bundles: list[ResourceSet], todo: list[int], free: dict[NodeId, ResourceSet],
              order: list[NodeId], used: set[NodeId]) -> dict[int, NodeId] | None:
    nodes = [n for n in order if n not in used]
    if len(nodes) < len(todo):
        return None
    plan: dict[int, NodeId] = {}
    taken: set[NodeId] = set()
    steps = [0]

    def search(k: int) -> bool:
        if k == len(todo):
            return True
        steps[0] += 1
        if steps[0] > _SEARCH_LIMIT:
            return False
        i = todo[k]
        for node in nodes:
            if node not in taken and bundles[i].fits_in(free[node]):
                taken.add(node)
                plan[i] = node
                if search(k + 1):
                    return True
                taken.discard(node)
                del plan[i]
        return False

    return plan if search(0) else None


# ---- actions the shell carries out -------------------------------------------------
@dataclass(frozen=True)
class Prepare:
    """Ask ``node`` to lock ``resources`` for bundle ``index``; answer with ``prepared``."""

    pg_id: bytes
    index: int
    node: NodeId
    resources: ResourceSet


@dataclass(frozen=True)
class Commit:
    """Turn the locked resources into the bundle's own; answer with ``committed``."""

    pg_id: bytes
    index: int
    node: NodeId


@dataclass(frozen=True)
class Return:
    """Give bundle ``index``'s resources on ``node`` back (prepared or committed),
    ending whatever runs in it. Fire and forget: a dead node has nothing to return."""

    pg_id: bytes
    index: int
    node: NodeId


@dataclass(frozen=True)
class Persist:
    """Write the group's row (state and placement) to gcsd; ``forget``: it was removed."""

    group: Group
    forget: bool = False


Action: TypeAlias = Prepare | Commit | Return | Persist


# ---- state --------------------------------------------------------------------------
@dataclass(eq=False)
class Group:
    """One placement group as its coordinator knows it."""

    pg_id: bytes
    bundles: list[ResourceSet]
    strategy: str
    name: str = ""
    namespace: str = ""
    detached: bool = False
    owner: int = 0          # the creator's connection (the shell's id)
    job: int = 0
    state: str = PENDING
    nodes: list[NodeId | None] = field(default_factory=list)  # committed placement
    retry_at: float = 0.0
    backoff: float = 0.0
    tried_epoch: int = -1   # view epoch of the last plan that found no room
    attempts: int = 0

    def row(self, coordinator: NodeId) -> dict:
        """The gcsd row (msgpack-able)."""
        return {"pg_id": self.pg_id, "name": self.name, "namespace": self.namespace,
                "strategy": self.strategy, "state": self.state, "detached": self.detached,
                "job": self.job, "coordinator": coordinator,
                "bundles": [b.to_dict() for b in self.bundles],
                "nodes": [n or b"" for n in self.nodes], "attempts": self.attempts}


@dataclass(eq=False)
class _Attempt:
    group: Group
    plan: dict[int, NodeId]
    waiting: set[int]                       # replies still due in this phase
    prepared: set[int] = field(default_factory=set)
    committed: set[int] = field(default_factory=set)
    phase: str = "prepare"
    failed: bool = False


class PlacementCoordinator:
    """Placement groups created on this node: plans, two-phase reservations, removal."""

    def __init__(self, node_id: NodeId) -> None:
        self.node_id = node_id
        self.groups: dict[bytes, Group] = {}
        self._queue: list[bytes] = []       # pending groups, first tried first
        self._attempt: _Attempt | None = None
        self._zombies: list[_Attempt] = []  # attempts of removed groups still awaiting replies

    # ---- inputs -------------------------------------------------------------------
    def create(self, group: Group) -> list[Action]:
        """Take a new group (PENDING). Raises ValueError for a bad one."""
        if group.pg_id in self.groups:
            raise ValueError(f"placement group {group.pg_id.hex()} exists")
        if group.strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {group.strategy!r}")
        if not group.bundles:
            raise ValueError("a placement group needs at least one bundle")
        for b in group.bundles:
            if not isinstance(b, ResourceSet) or not b.to_dict():
                raise ValueError("every bundle must ask for some resource")
        group.state = PENDING
        group.nodes = [None] * len(group.bundles)
        self.groups[group.pg_id] = group
        self._queue.append(group.pg_id)
        return [Persist(group)]

    def step(self, available: Mapping[NodeId, ResourceSet], now: float,
             epoch: int) -> list[Action]:
        """Start an attempt for the first pending group that fits now, if none is in flight.

        Args:
            available: free resources of each live node.
            now: monotonic seconds.
            epoch: changes whenever the view does; a group that found no
                room is not planned again at the same epoch.
        """
        if self._attempt is not None:
            return []
        for pg_id in list(self._queue):
            g = self.groups[pg_id]
            if g.retry_at > now or g.tried_epoch == epoch:
                continue
            placed = {i: n for i, n in enumerate(g.nodes) if n is not None}
            plan = plan_bundles(g.bundles, g.strategy, available, placed=placed,
                                prefer=self.node_id)
            if plan is None:
                g.tried_epoch = epoch
                continue
            g.attempts += 1
            self._queue.remove(pg_id)
            self._attempt = _Attempt(g, plan, set(plan))
            return [Prepare(pg_id, i, n, g.bundles[i]) for i, n in sorted(plan.items())]
        return []

    def prepared(self, pg_id: bytes, index: int, node: NodeId, ok: bool,
                 now: float) -> list[Action]:
        """A node's answer to a prepare (``ok``: it locked the resources)."""
        return self._reply("prepare", pg_id, index, node, ok, now)

    def committed(self, pg_id: bytes, index: int, node: NodeId, ok: bool,
                  now: float) -> list[Action]:
        """A node's answer to a commit."""
        return self._reply("commit", pg_id, index, node, ok, now)

    def _reply(self, phase: str, pg_id: bytes, index: int, node: NodeId, ok: bool,
               now: float) -> list[Action]:
        for a in self._zombies:  # the group was removed meanwhile: undo what still lands
            if a.group.pg_id == pg_id and a.phase == phase and index in a.waiting \
                    and a.plan.get(index) == node:
                a.waiting.discard(index)
                if not a.waiting:
                    self._zombies.remove(a)
                return [Return(pg_id, index, node)] if ok else []
        a = self._attempt
        if (a is None or a.group.pg_id != pg_id or a.phase != phase or index not in a.waiting
                or a.plan.get(index) != node):
            return []  # late, duplicate or unknown: nothing to do
        a.waiting.discard(index)
        done = a.prepared if phase == "prepare" else a.committed
        out: list[Action] = []
        if ok:
            done.add(index)
            if a.failed:
                out.append(Return(pg_id, index, node))
        elif not a.failed:
            # Roll back: everything this attempt may hold. Returns are
            # idempotent, so the refusing node (maybe a lost reply) gets one too.
            a.failed = True
            held = done | {index} if phase == "prepare" else set(a.plan)
            out += [Return(pg_id, i, a.plan[i]) for i in sorted(held)]
        if a.waiting:
            return out
        return out + self._phase_done(a, now)

    def remove(self, pg_id: bytes) -> list[Action]:
        """Remove a group: return its bundles, mark it REMOVED. Unknown ids: nothing."""
        g = self.groups.pop(pg_id, None)
        if g is None:
            return []
        if pg_id in self._queue:
            self._queue.remove(pg_id)
        out: list[Action] = [Return(pg_id, i, n) for i, n in enumerate(g.nodes) if n is not None]
        a = self._attempt
        if a is not None and a.group is g:
            # Bundles already prepared or committed are returned now; those
            # still answering are returned when their yes arrives.
            out += [Return(pg_id, i, a.plan[i]) for i in sorted(a.prepared | a.committed)
                    if g.nodes[i] is None]
            a.prepared.clear()
            a.committed.clear()
            self._attempt = None
            if a.waiting:
                self._zombies.append(a)
        g.state = REMOVED
        g.nodes = [None] * len(g.bundles)
        out.append(Persist(g, forget=True))
        return out

    def node_dead(self, node: NodeId, now: float) -> list[Action]:
        """A node died: its bundles are lost; reschedule them first (Ray's rule)."""
        out: list[Action] = []
        a = self._attempt
        if a is not None and node in a.plan.values():
            waiting = [i for i in sorted(a.waiting) if a.plan[i] == node]
            for i in waiting:  # as if that node had said no
                out += self._reply(a.phase, a.group.pg_id, i, node, False, now)
            if not waiting and not a.failed:  # it said yes and then died: this attempt cannot stand
                a.failed = True
                out += [Return(a.group.pg_id, i, n) for i, n in sorted(a.plan.items())]
        for g in list(self.groups.values()):
            lost = [i for i, n in enumerate(g.nodes) if n == node]
            if not lost:
                continue
            for i in lost:
                g.nodes[i] = None
            if g.state == CREATED:
                g.state = RESCHEDULING
                if g.pg_id not in self._queue:
                    self._queue.insert(0, g.pg_id)
                g.retry_at = now
                g.tried_epoch = -1
                out.append(Persist(g))
        return out

    def owner_gone(self, owner: int) -> list[Action]:
        """The creator's connection closed: its non-detached groups go (their job ended)."""
        out: list[Action] = []
        for g in list(self.groups.values()):
            if g.owner == owner and not g.detached:
                out += self.remove(g.pg_id)
        return out

    # ---- state ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """An attempt is in flight."""
        return self._attempt is not None

    def pending(self) -> list[Group]:
        return [self.groups[p] for p in self._queue]

    # ---- internals ----------------------------------------------------------------
    def _phase_done(self, a: _Attempt, now: float) -> list[Action]:
        g = a.group
        if a.failed:
            self._attempt = None
            g.backoff = _BACKOFF_FIRST_S if not g.backoff else \
                min(_BACKOFF_MAX_S, g.backoff * _BACKOFF_FACTOR)
            g.retry_at = now + g.backoff
            g.tried_epoch = -1
            self._queue.insert(0, g.pg_id)  # first in line once its backoff ends
            return []
        if a.phase == "prepare":
            a.phase = "commit"
            a.waiting = set(a.plan)
            return [Commit(g.pg_id, i, a.plan[i]) for i in sorted(a.plan)]
        self._attempt = None
        for i, n in a.plan.items():
            g.nodes[i] = n
        g.state = CREATED
        g.backoff = 0.0
        return [Persist(g)]
