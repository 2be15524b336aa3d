"""Lease scheduling policy: grant a lease here, spill it to another node, or keep it queued.

Theory of operation
  The raylet shell owns sockets, clocks and workers; this module only
  decides. The shell feeds it lease requests (``submit``), cancellations,
  local resource changes (``acquire``/``release``) and other nodes'
  snapshots (through the shared :class:`ClusterView`), then calls
  ``decide(now)`` and carries out the returned decisions: pair a
  :class:`Grant` with a worker, answer a :class:`Spill` with "retry at that
  node", fail an :class:`Unschedulable`, bounce a :class:`Rejected`, log an
  :class:`InfeasibleQueued`. Everything not returned stays queued.

  A node alone (a view holding only the local node, e.g. ``LeaseScheduler(total)``)
  behaves exactly as the single-node policy did: grant in arrival order while
  resources last, let smaller requests pass a big one, and (by default)
  reject at ``submit`` a demand the node can never fit.

The algorithm and its tie-break rules are in :class:`LeaseScheduler`'s docstring.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_left, bisect_right, insort
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from daemons.raylet.cluster_view import ClusterView, NodeId
from daemons.raylet.resources import ResourceSet

DEFAULT = "DEFAULT"
SPREAD = "SPREAD"
_RETIRED_MAX = 100_000  # removed resource names remembered (a late release adds nothing)


@dataclass(frozen=True)
class NodeAffinity:
    """Run on ``node_id``. ``soft``: fall back to DEFAULT if that node is dead or
    cannot fit the demand; otherwise the request is Unschedulable."""

    node_id: NodeId
    soft: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, bytes) or not self.node_id:
            raise TypeError(f"NodeAffinity node id {self.node_id!r} must be non-empty bytes")
        if not isinstance(self.soft, bool):
            raise TypeError("NodeAffinity.soft must be a bool")


Strategy: TypeAlias = str | NodeAffinity


@dataclass(frozen=True)
class LeaseRequest:
    """One lease request from a client connection.

    Args:
        request_id, client_id: the shell's names for it (replies, cancel).
        demand: resources the lease holds.
        strategy: ``DEFAULT`` (hybrid), ``SPREAD`` or a :class:`NodeAffinity`.
        grant_or_reject: the request was already spilled here by another
            raylet: grant or queue it here, never spill it again, so
            spillback is at most one hop (Ray PR #20050).
        locality: bytes of the task's arguments already held by each node,
            as the owner knows them. Used by DEFAULT only.
    """

    request_id: int
    client_id: int
    demand: ResourceSet
    strategy: Strategy = DEFAULT
    grant_or_reject: bool = False
    locality: Mapping[NodeId, int] = field(default_factory=dict, hash=False)


# ---- results of submit (unchanged from the single-node policy) -------------
@dataclass(frozen=True)
class Queued:
    """Accepted; a later ``decide`` says what happens to it."""

    request: LeaseRequest


@dataclass(frozen=True)
class Infeasible:
    """Refused at submit: no live node can ever fit the demand. Only returned
    when the scheduler was built with ``queue_infeasible=False`` (the default)."""

    request: LeaseRequest
    reason: str


# ---- results of decide ------------------------------------------------------
@dataclass(frozen=True)
class Grant:
    """Grant the lease on this node; its demand is already taken from ``available``."""

    request: LeaseRequest


@dataclass(frozen=True)
class Spill:
    """Tell the client to ask ``node_id``'s raylet, with ``grant_or_reject=True``.
    The demand was subtracted from that node in the view (optimistically)."""

    request: LeaseRequest
    node_id: NodeId


@dataclass(frozen=True)
class Unschedulable:
    """Fail the request for good: hard NodeAffinity to a dead, unknown or too small node."""

    request: LeaseRequest
    reason: str


@dataclass(frozen=True)
class Rejected:
    """A ``grant_or_reject`` request this node cannot take (it can never fit
    here, or it is pinned to another node): the client should go back to its
    own raylet, without ``grant_or_reject``."""

    request: LeaseRequest
    reason: str


@dataclass(frozen=True)
class InfeasibleQueued:
    """Notice, once per request: it stays queued, but no live node's total can
    fit it. It is granted or spilled when a node that fits joins the view."""

    request: LeaseRequest
    reason: str


Decision: TypeAlias = Grant | Spill | Unschedulable | Rejected | InfeasibleQueued

# Internal outcomes of deciding one request (never returned).
_STAY = object()        # stays queued; later requests of its class would too
_STAY_PASS = object()   # stays queued; later requests of its class may still move
_NO_NODE = object()     # no live node can fit it

_Key: TypeAlias = tuple[int, int, float, NodeId]


class _Entry:
    __slots__ = ("seq", "request", "cls")

    def __init__(self, seq: int, request: LeaseRequest, cls: _Class) -> None:
        self.seq = seq
        self.request = request
        self.cls = cls


class _Class:
    """Queued requests that would all get the same decision: same demand,
    strategy, grant_or_reject and locality (Ray's scheduling class, widened)."""

    __slots__ = ("key", "dkey", "seqs", "head", "live", "infeasible", "warned_upto")

    def __init__(self, key: tuple, dkey: tuple) -> None:
        self.key = key
        self.dkey = dkey
        self.seqs: list[int] = []   # arrival order; removed seqs linger until compaction
        self.head = 0
        self.live = 0
        self.infeasible = False
        self.warned_upto = -1


class _Ranking:
    """Feasible live nodes for one demand, sorted by ranking key, kept current
    from the view's change log."""

    __slots__ = ("demand", "needs_gpu", "keys", "key_of", "cursor")

    def __init__(self, demand: ResourceSet) -> None:
        self.demand = demand
        self.needs_gpu = demand.get("GPU") > 0
        self.keys: list[_Key] = []
        self.key_of: dict[NodeId, _Key] = {}
        self.cursor = 0


class LeaseScheduler:
    """Decide, for each queued lease request, grant here / spill / keep queued.

    Assumptions
      * A lease is a worker plus the resources of one scheduling class; the
        client pushes many tasks through it, so decisions are per lease.
      * The view may be stale: other nodes' entries are their last snapshot
        minus our own optimistic spills. A spilled request can therefore meet
        a busy node; ``grant_or_reject`` makes it wait there rather than hop
        again, so stale views cost waiting, never ping-pong.
      * The local node's entry is written only by this scheduler (its version
        goes up on every local change), so gcsd echoing our own snapshot back
        is ignored as not newer.
      * No I/O, no clock (time is the ``now`` argument), randomness only from
        the ``rng`` passed in. Not thread-safe.

    Algorithm (``decide``)
      1. Revert expired optimistic guesses in the view (``expire_optimism``).
      2. Walk queued requests in arrival order across classes (a class is all
         requests with the same demand, strategy, grant_or_reject and
         locality). Once a request stays queued for lack of room, the rest of
         its class is skipped for this pass, since they would get the same
         answer; SPREAD is the exception, its next request may go elsewhere.
      3. ``grant_or_reject`` requests: grant if the demand fits here now;
         queue here if it fits the local total; otherwise (or if hard-pinned to
         another node) Rejected. Never Spill.
      4. NodeAffinity: if the target is alive and its total fits the demand,
         it goes there: Grant/queue if local, Spill if remote, even when the
         target is busy. Otherwise soft → DEFAULT (without locality), hard →
         Unschedulable.
      5. SPREAD: round-robin over live node ids in sorted order, starting
         after the last node SPREAD picked: the first node with the demand
         free now, else the first whose total fits. Local → Grant (or queue
         if busy), remote → Spill.
      6. DEFAULT (hybrid). Rank every live node whose total fits by
         (a) demand free now before not, (b) for a demand without GPU,
         nodes without GPU before GPU nodes, (c) critical utilisation, the
         highest used/total over ``score_resources`` (GPU is not counted),
         read as 0 when ≤ ``spread_threshold``. Then:
         a. No node has room now: keep it queued here if the local total
            fits, and spill it when a view update shows room somewhere. (Ray
            would spill it to the best busy node; with grant_or_reject it
            would then wait there even if another node frees first.) If the
            local total cannot fit it, go on below and spill to a busy node.
         b. The preferred node wins if its (a, b, c) is no worse than the
            best node's. The preferred node is the feasible node holding the
            most argument bytes if ``locality`` is given, else this node. So
            this node keeps work until it is busy, and a node holding the
            arguments gets the task while it is not busy even if others are
            idler (locality outranks utilisation, as when Ray's owner sends
            the lease to that node and its raylet prefers itself).
         c. Otherwise pick uniformly among the first k of the best (a, b)
            tier, k = max(1, ``top_k_fraction`` × live nodes): the random
            draw keeps raylets with the same stale view from all choosing
            the same node (Ray PR #31868).
         No feasible node at all → the request stays queued as infeasible
         (reported once as InfeasibleQueued).
      7. A Grant takes the demand from local ``available``; a Spill subtracts it
         from the target in the view, so the next request sees it.

    Tie-breaks
      * Equal ranking keys: lower node id first (the order the top-k draw uses).
      * Locality: most bytes; then the local node; then the lower node id.
        Nodes holding 0 bytes, dead or too small are ignored.
      * Across classes: arrival order (a request's sequence number).
      * SPREAD: one round-robin position shared by all SPREAD requests.

    Worked example (the first cluster case in the unit tests): this node has
    4 CPUs, node n1 4 idle CPUs, four 1-CPU requests arrive. This node's
    utilisation before each of the first three is 0, .25 and .5: not above
    0.5, so they are granted here. Before the fourth it is .75 against n1's 0:
    Spill to n1, which then shows 3 free CPUs in the view until its next
    snapshot replaces the guess.
    """

    def __init__(self, total: ResourceSet, *, node_id: NodeId = b"local",
                 view: ClusterView | None = None, rng: random.Random | None = None,
                 queue_infeasible: bool = False, spread_threshold: float = 0.5,
                 top_k_fraction: float = 0.2,
                 score_resources: tuple[str, ...] = ("CPU", "memory", "object_store_memory"),
                 labels: Mapping[str, str] | None = None) -> None:
        """Args:
            total: this node's resources.
            node_id: this node's id in ``view``.
            view: the cluster view the shell keeps current; a fresh view holding
                only this node if None (the single-node mode).
            rng: source of the top-k draw; ``random.Random(0)`` if None.
            queue_infeasible: keep demands no live node fits queued (Ray 2) instead
                of refusing them at submit (the single-node behaviour).
            spread_threshold, top_k_fraction, score_resources: hybrid policy knobs.
            labels: this node's labels, recorded in the view.
        Raises:
            ValueError: the view already holds this node as dead, or bad knobs.
        """
        if not isinstance(total, ResourceSet):
            raise TypeError("total must be a ResourceSet")
        if not 0 <= spread_threshold <= 1 or not 0 < top_k_fraction <= 1:
            raise ValueError("spread_threshold must be in [0, 1], top_k_fraction in (0, 1]")
        self.view = view if view is not None else ClusterView()
        if node_id in self.view and not self.view.is_alive(node_id):
            raise ValueError(f"local node {node_id.hex()} is dead in the view")
        self.node_id = node_id
        self.rng = rng if rng is not None else random.Random(0)
        self.queue_infeasible = queue_infeasible
        self.spread_threshold = spread_threshold
        self.top_k_fraction = top_k_fraction
        self.score_resources = score_resources
        self._total = total
        self._available = total
        self._version = self.view.node(node_id).version if node_id in self.view else 0
        self._publish(labels)
        self._seq = 0
        self._entries: dict[int, _Entry] = {}
        self._classes: dict[tuple, _Class] = {}
        self._by_client: dict[int, dict[int, None]] = {}
        self._rankings: dict[tuple, _Ranking] = {}
        self._spread_last: NodeId | None = None
        self._retired: dict[str, None] = {}  # names of resources that left this node

    # ---- inputs -----------------------------------------------------------
    def submit(self, request: LeaseRequest) -> Queued | Infeasible:
        """Queue a request; ``decide`` places it.

        Returns:
            Queued, or Infeasible if no live node can ever fit the demand and
            ``queue_infeasible`` is False.
        Raises:
            TypeError, ValueError: a malformed request (nothing is changed).
        """
        dkey = _check_request(request)
        if not self.queue_infeasible and not self._ranking(dkey, request.demand).keys:
            return Infeasible(request, self._infeasible_reason(request.demand))
        strategy = request.strategy
        loc = tuple(sorted((n, b) for n, b in request.locality.items() if b > 0))
        ckey = (dkey, strategy, request.grant_or_reject, loc)
        cls = self._classes.get(ckey)
        if cls is None:
            cls = self._classes[ckey] = _Class(ckey, dkey)
        seq = self._seq
        self._seq += 1
        self._entries[seq] = _Entry(seq, request, cls)
        cls.seqs.append(seq)
        cls.live += 1
        self._by_client.setdefault(request.client_id, {})[seq] = None
        return Queued(request)

    def cancel(self, client_id: int, request_id: int | None = None) -> list[LeaseRequest]:
        """Drop queued requests of a client (all of them if request_id is None).

        Returns:
            The dropped requests, in arrival order.
        """
        seqs = self._by_client.get(client_id)
        if not seqs:
            return []
        gone = [self._entries[s] for s in seqs
                if request_id is None or self._entries[s].request.request_id == request_id]
        for entry in gone:
            self._remove(entry)
        return [e.request for e in gone]

    def acquire(self, demand: ResourceSet) -> None:
        """Take resources back for a worker that stopped blocking (may overcommit)."""
        self._set_available(self._available - demand)

    def release(self, demand: ResourceSet) -> None:
        """Return resources of a lease that ended or a worker that blocked."""
        if self._retired:
            retired = self._retired
            if any(k in retired for k in demand.names()):
                demand = demand.without(retired)
        self._set_available(self._available + demand)

    def add_resources(self, extra: ResourceSet) -> None:
        """New resources on this node, free at once (a committed placement-group bundle)."""
        for name in extra.names():
            self._retired.pop(name, None)
        self._total = self._total + extra
        self._set_available(self._available + extra)

    def remove_resources(self, gone: ResourceSet) -> None:
        """Resources that leave this node (a returned placement-group bundle's).
        A name whose total drops to nothing is forgotten, and a lease that
        still held some and ends later gives it back to nothing."""
        self._total = self._total - gone
        self._available = self._available - gone
        empty = [k for k in gone.names() if self._total.get(k) <= 0]
        if empty:
            self._total = self._total.without(empty)
            self._available = self._available.without(empty)
            for name in empty:
                self._retired[name] = None
            while len(self._retired) > _RETIRED_MAX:
                del self._retired[next(iter(self._retired))]
        self._publish(None)

    # ---- decisions ----------------------------------------------------------
    def decide(self, now: float) -> list[Decision]:
        """Run one scheduling pass over the queue.

        Args:
            now: the shell's monotonic time, in the unit of the view's
                ``optimism_timeout`` (seconds by default); never decreasing.
        Returns:
            Grant / Spill / Unschedulable / Rejected for requests that leave the
            queue, and InfeasibleQueued notices for requests that stay, in the
            order decided. Requests not mentioned stay queued.
        """
        self.view.expire_optimism(now)
        out: list[Decision] = []
        heap = []
        for cls in self._classes.values():
            i = self._next_live(cls, cls.head)
            if i is not None:
                heap.append((cls.seqs[i], i, cls.key))
        heapq.heapify(heap)
        while heap:
            seq, i, ckey = heapq.heappop(heap)
            cls = self._classes[ckey]
            entry = self._entries[seq]
            d = self._decide_one(entry.request, cls.dkey, now)
            if d is _NO_NODE:
                cls.infeasible = True
                self._warn_infeasible(cls, out)
                continue
            cls.infeasible = False
            if d is _STAY:
                continue
            if d is not _STAY_PASS:
                self._remove(entry)
                out.append(d)  # type: ignore[arg-type]
            j = self._next_live(cls, i + 1)
            if j is not None:
                heapq.heappush(heap, (cls.seqs[j], j, ckey))
        self._compact()
        return out

    def schedule(self) -> list[LeaseRequest]:
        """Single-node compatibility: grant every queued request that fits, in arrival order.

        Equals the Grants of ``decide(0.0)``. Raises RuntimeError (changing
        nothing) if the view holds another live node: use ``decide`` there.
        """
        if self.view.alive_count > 1:
            raise RuntimeError("the view holds other nodes: use decide(now)")
        return [d.request for d in self.decide(0.0) if isinstance(d, Grant)]

    # ---- state --------------------------------------------------------------
    @property
    def available(self) -> ResourceSet:
        """This node's free resources (negative while overcommitted)."""
        return self._available

    @property
    def total(self) -> ResourceSet:
        return self._total

    @property
    def version(self) -> int:
        """Version of this node's entry in the view; publish the snapshot when it changes."""
        return self._version

    @property
    def queued(self) -> int:
        return len(self._entries)

    @property
    def infeasible(self) -> list[LeaseRequest]:
        """Queued requests that no live node could fit at the last ``decide``."""
        return [self._entries[s].request for c in self._classes.values() if c.infeasible
                for s in c.seqs[c.head:] if s in self._entries]

    # ---- one request --------------------------------------------------------
    def _decide_one(self, r: LeaseRequest, dkey: tuple, now: float) -> object:
        view = self.view
        strategy = r.strategy
        if r.grant_or_reject:
            if (isinstance(strategy, NodeAffinity) and not strategy.soft
                    and strategy.node_id != self.node_id):
                return Rejected(r, f"pinned to node {strategy.node_id.hex()}, not this one")
            if not r.demand.fits_in(self._total):
                return Rejected(r, f"demand {r.demand.to_dict()} exceeds this node's total "
                                   f"{self._total.to_dict()}")
            return self._place(r, self.node_id, now, _STAY)
        use_locality = True
        if isinstance(strategy, NodeAffinity):
            target = strategy.node_id
            if view.is_feasible(target, r.demand):
                return self._place(r, target, now, _STAY)
            if not strategy.soft:
                return Unschedulable(r, self._affinity_reason(target, r.demand))
            use_locality = False
        elif strategy == SPREAD:
            return self._spread(r, now)
        return self._hybrid(r, dkey, use_locality, now)

    def _place(self, r: LeaseRequest, node_id: NodeId, now: float, busy: object) -> object:
        if node_id != self.node_id:
            self.view.subtract(node_id, r.demand, now)
            return Spill(r, node_id)
        if r.demand.fits_in(self._available):
            self._set_available(self._available - r.demand)
            return Grant(r)
        return busy

    def _spread(self, r: LeaseRequest, now: float) -> object:
        view = self.view
        ids = view.alive_nodes()
        start = 0 if self._spread_last is None else bisect_right(ids, self._spread_last)
        order = ids[start:] + ids[:start]
        pick = next((n for n in order if view.is_available(n, r.demand)), None)
        if pick is None:
            pick = next((n for n in order if view.is_feasible(n, r.demand)), None)
        if pick is None:
            return _NO_NODE
        self._spread_last = pick
        return self._place(r, pick, now, _STAY_PASS)

    def _hybrid(self, r: LeaseRequest, dkey: tuple, use_locality: bool, now: float) -> object:
        rank = self._ranking(dkey, r.demand)
        keys = rank.keys
        if not keys:
            return _NO_NODE
        best = keys[0]
        if best[0] == 1 and self.node_id in rank.key_of:
            return _STAY
        preferred = self.node_id
        if use_locality and r.locality:
            preferred = self._locality_node(r, rank) or preferred
        pk = rank.key_of.get(preferred)
        if pk is not None and pk[:3] <= best[:3]:
            return self._place(r, preferred, now, _STAY)
        tier_end = bisect_left(keys, (best[0], best[1] + 1))
        k = max(1, int(self.view.alive_count * self.top_k_fraction))
        choice = keys[self.rng.randrange(min(k, tier_end))][3]
        return self._place(r, choice, now, _STAY)

    def _locality_node(self, r: LeaseRequest, rank: _Ranking) -> NodeId | None:
        best: tuple[int, bool, bytes] | None = None
        for node_id, nbytes in r.locality.items():
            if nbytes <= 0 or node_id not in rank.key_of:
                continue
            # max bytes, then the local node, then the lower id (negated by sort below)
            cand = (nbytes, node_id == self.node_id, node_id)
            if (best is None or cand[:2] > best[:2]
                    or (cand[:2] == best[:2] and cand[2] < best[2])):
                best = cand
        return None if best is None else best[2]

    # ---- rankings -----------------------------------------------------------
    def _ranking(self, dkey: tuple, demand: ResourceSet) -> _Ranking:
        view = self.view
        rank = self._rankings.get(dkey)
        if rank is not None:
            changed = view.changed_since(rank.cursor)
            if changed is None or len(changed) > len(view) // 2 + 16:
                rank = None
            else:
                for node_id in dict.fromkeys(changed):
                    self._rescore(rank, node_id)
        if rank is None:
            rank = self._rankings[dkey] = _Ranking(demand)
            for node_id in view.alive_nodes():
                key = self._key(rank, node_id)
                if key is not None:
                    rank.key_of[node_id] = key
            rank.keys = sorted(rank.key_of.values())
        rank.cursor = view.cursor
        return rank

    def _rescore(self, rank: _Ranking, node_id: NodeId) -> None:
        old = rank.key_of.pop(node_id, None)
        if old is not None:
            del rank.keys[bisect_left(rank.keys, old)]
        key = self._key(rank, node_id)
        if key is not None:
            insort(rank.keys, key)
            rank.key_of[node_id] = key

    def _key(self, rank: _Ranking, node_id: NodeId) -> _Key | None:
        info = self.view.node(node_id)
        demand = rank.demand
        if not info.alive or not demand.fits_in(info.total):
            return None
        total, avail = info.total, info.available
        util = 0.0
        for name in self.score_resources:
            t = total.get(name)
            if t > 0:
                util = max(util, (t - avail.get(name)) / t)
        return (0 if demand.fits_in(avail) else 1,
                1 if not rank.needs_gpu and total.get("GPU") > 0 else 0,
                util if util > self.spread_threshold else 0.0,
                node_id)

    # ---- bookkeeping --------------------------------------------------------
    def _set_available(self, available: ResourceSet) -> None:
        self._available = available
        self._publish(None)

    def _publish(self, labels: Mapping[str, str] | None) -> None:
        self._version += 1
        self.view.update(self.node_id, self._total, self._available, self._version,
                         labels=labels)

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry.seq]
        entry.cls.live -= 1
        client = self._by_client[entry.request.client_id]
        del client[entry.seq]
        if not client:
            del self._by_client[entry.request.client_id]

    def _next_live(self, cls: _Class, i: int) -> int | None:
        seqs, entries = cls.seqs, self._entries
        while i < len(seqs):
            if seqs[i] in entries:
                return i
            i += 1
        return None

    def _compact(self) -> None:
        """Drop empty classes and unused rankings; trim removed seqs from class queues."""
        entries = self._entries
        for ckey in [k for k, c in self._classes.items() if c.live == 0]:
            del self._classes[ckey]
        for cls in self._classes.values():
            seqs = cls.seqs
            h = cls.head
            while h < len(seqs) and seqs[h] not in entries:
                h += 1
            cls.head = h
            if len(seqs) - h > 2 * cls.live + 32:
                cls.seqs = [s for s in seqs[h:] if s in entries]
                cls.head = 0
            elif h > 32 and h > len(seqs) // 2:
                del seqs[:h]
                cls.head = 0
        used = {c.dkey for c in self._classes.values()}
        for dkey in [d for d in self._rankings if d not in used]:
            del self._rankings[dkey]

    def _warn_infeasible(self, cls: _Class, out: list[Decision]) -> None:
        new = []
        for s in reversed(cls.seqs):
            if s <= cls.warned_upto:
                break
            entry = self._entries.get(s)
            if entry is not None:
                new.append(entry.request)
        if new:
            reason = self._infeasible_reason(new[0].demand)
            out.extend(InfeasibleQueued(r, reason) for r in reversed(new))
        cls.warned_upto = cls.seqs[-1]

    def _infeasible_reason(self, demand: ResourceSet) -> str:
        if self.view.alive_count <= 1:
            return (f"demand {demand.to_dict()} exceeds node total "
                    f"{self._total.to_dict()}")
        return (f"demand {demand.to_dict()} fits no live node "
                f"({self.view.alive_count} live; this node has {self._total.to_dict()})")

    def _affinity_reason(self, target: NodeId, demand: ResourceSet) -> str:
        if target not in self.view:
            return f"node {target.hex()} is unknown"
        info = self.view.node(target)
        if not info.alive:
            return f"node {target.hex()} is dead"
        return (f"node {target.hex()} cannot fit demand {demand.to_dict()} "
                f"(total {info.total.to_dict()})")


def _check_request(r: object) -> tuple:
    """Validate a request; returns its demand key. Raises TypeError/ValueError."""
    if not isinstance(r, LeaseRequest):
        raise TypeError(f"expected a LeaseRequest, got {type(r).__name__}")
    for name in ("request_id", "client_id"):
        v = getattr(r, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} {v!r} must be an int")
    if not isinstance(r.demand, ResourceSet):
        raise TypeError("demand must be a ResourceSet")
    amounts = r.demand.to_dict()
    if any(v < 0 for v in amounts.values()):
        raise ValueError(f"demand {amounts} has a negative amount")
    if not (r.strategy in (DEFAULT, SPREAD) or isinstance(r.strategy, NodeAffinity)):
        raise ValueError(f"unknown strategy {r.strategy!r}")
    if not isinstance(r.grant_or_reject, bool):
        raise TypeError("grant_or_reject must be a bool")
    if not isinstance(r.locality, Mapping):
        raise TypeError("locality must map node id to bytes")
    for node_id, nbytes in r.locality.items():
        if not isinstance(node_id, bytes) or isinstance(nbytes, bool) \
                or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"locality entry {node_id!r}: {nbytes!r} must be bytes: int >= 0")
    return tuple(sorted(amounts.items()))
