"""The chain master: who is in each shard's chain, as a pure state machine.

Theory of operation
-------------------
The master is the configuration service of chain replication (§2 of van
Renesse & Schneider). It owns, for every shard, a chain of member ids and
an epoch. Members send it a :class:`Heartbeat` every few ticks; it answers
every heartbeat with all configs (the shell does that), so a member that
missed a change learns it on its next beat.

Placement: shard ``s`` starts on ``members[s % M:] + members[:s % M]``,
cut to the chain length R. With three members and R = 3 every chain runs
through all three, and the heads are spread over them.

Changes, one per shard per epoch, each raising that shard's epoch by one:

1. A member silent for ``dead_ticks`` is removed from every chain it is in
   (head, middle or tail alike; the replicas themselves take it from there).
   A member another member reports having lost its connection to
   (:meth:`ChainMaster.suspect`: a killed process's sockets close at once)
   is removed sooner, if no heartbeat of its arrives within
   ``suspect_ticks`` of the report; one that does clears the suspicion.
2. A member that comes back as a new *incarnation* (it restarted, losing
   its in-memory Sent lists) is removed the same way at once.
3. A member outside a chain that reports it caught up with the tail in the
   current epoch is appended as the new tail, if the chain is short.
4. A newly appended tail is *provisional* until it reports that it holds
   everything its predecessor had committed when it joined. Only one join
   per shard is in progress at a time, and a head whose successor is
   provisional is never removed: it alone holds the recently committed
   entries. (A chain ``[T, X]`` whose head T dies before X has caught up
   waits for T to come back, as the paper's state transfer would.)
5. The last replica of a shard is never removed: its disk holds the data.
   A replica kept for either reason that restarts gets a new epoch anyway,
   to fence its old incarnation.
6. Rebalancing (when ``rebalance_ticks`` is set): failures move heads to
   successors, and a replaced member comes back as a tail, so after a few
   faults one member can head most shards and do most of the work. Once
   every chain is full and nothing has changed for ``rebalance_ticks``, a
   member heading at least two more shards than a live successor of one of
   them is removed from that shard's chain; the successor becomes head,
   and the removed member rejoins as the tail like any joiner. One shard
   per quiet period, so redundancy drops by one replica for one shard at a
   time, for as long as a catch-up takes.

Durability: :meth:`ChainMaster.ready` returns the state to persist; the
shell writes it (atomically, fsync) *before* answering anyone, so an epoch
is never handed out twice. After a restart, the master reloads it and gives
every member a fresh ``dead_ticks`` of grace.

Split brain: a shard's head only changes when the master says so, in a new
epoch; replicas refuse chain messages from other epochs, so a deposed head
(removed, but not dead) can no longer get a write through its successor,
and so can no longer acknowledge one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemons.gcsd.chain import Notice


@dataclass(frozen=True, slots=True)
class ShardReport:
    """A member's view of one shard, carried by its heartbeat."""

    epoch: int
    applied: int
    ready_epoch: int  # epoch in which it caught up with the tail (0: not joining)
    healthy: bool = True
    caught_up: bool = True  # holds everything its predecessor had committed


@dataclass(frozen=True, slots=True)
class Heartbeat:
    member: int
    incarnation: int
    shards: dict[int, ShardReport]


@dataclass(frozen=True, slots=True)
class MasterReady:
    """Ordering contract: persist ``state`` (if not None) before replying to anyone."""

    state: dict[str, Any] | None
    notices: tuple[Notice, ...]


def placement(members: int, shards: int, chain_length: int) -> list[list[int]]:
    """Initial chains: rotate the member list by the shard number, cut to R."""
    r = max(1, min(chain_length, members))
    return [[(s + i) % members for i in range(r)] for s in range(shards)]


@dataclass
class _State:
    epochs: list[int]
    chains: list[list[int]]
    incarnations: dict[int, int] = field(default_factory=dict)
    provisional: dict[int, int] = field(default_factory=dict)  # shard -> joining tail


class ChainMaster:
    """Configuration of every shard's chain. Pure and not thread-safe.

    Args:
        members: number of gcsd members (ids 0..members-1).
        shards: number of shards N.
        chain_length: target R.
        dead_ticks: silence after which a member is removed from its chains.
        state: what :meth:`ready` last returned to persist, if any.
        rebalance_ticks: quiet ticks before moving one head (rule 6); 0: never.
        suspect_ticks: after a report of a lost connection, how long a member
            has to prove itself alive with a heartbeat (rule 1); 0: reports
            are ignored.
        bootstrap_ticks: on a first start (no ``state``), how long a member
            never heard from keeps its place in the initial chains. Hosts
            boot at different speeds; removing a slow starter at once would
            make it rejoin every chain as the tail and leave every head on
            the fastest host. Defaults to ``dead_ticks``.
    """

    def __init__(self, members: int, shards: int, chain_length: int, dead_ticks: int,
                 state: dict[str, Any] | None = None,
                 bootstrap_ticks: int | None = None, rebalance_ticks: int = 0,
                 suspect_ticks: int = 0) -> None:
        self.members = members
        self.shards = shards
        self.chain_length = max(1, min(chain_length, members))
        self.dead_ticks = dead_ticks
        self._ticks = 0
        self._last: dict[int, int] = {m: 0 for m in range(members)}  # grace after (re)start
        self._heard: set[int] = set()
        self._bootstrap_ticks = dead_ticks
        if state is None and bootstrap_ticks is not None:
            self._bootstrap_ticks = max(dead_ticks, bootstrap_ticks)
        self._dead: set[int] = set()
        self.rebalance_ticks = rebalance_ticks
        self.suspect_ticks = suspect_ticks
        self._suspected: dict[int, int] = {}  # member -> tick of the first report
        self._changed_at = 0  # tick of the last config change
        self._dirty = False
        self._notices: list[Notice] = []
        if state is None:
            self._s = _State([1] * shards, placement(members, shards, chain_length))
            self._dirty = True
        else:
            self._s = _load(state, members, shards)

    # ------------------------------------------------------------ queries
    def configs(self) -> list[list[Any]]:
        """Every shard's ``[shard, epoch, chain]``, as sent to members and clients."""
        return [[s, self._s.epochs[s], list(self._s.chains[s])] for s in range(self.shards)]

    def chain(self, shard: int) -> tuple[int, tuple[int, ...]]:
        return self._s.epochs[shard], tuple(self._s.chains[shard])

    # ------------------------------------------------------------ inputs
    def step(self, hb: Heartbeat) -> None:
        """Take a member's heartbeat."""
        m = hb.member
        if not 0 <= m < self.members:
            self._notice("warning", "master_unknown_member", member=m)
            return
        self._last[m] = self._ticks
        self._heard.add(m)
        self._suspected.pop(m, None)  # alive after all
        if m in self._dead:
            self._dead.discard(m)
            self._notice("info", "master_member_back", member=m)
        known = self._s.incarnations.get(m)
        if known != hb.incarnation:
            self._s.incarnations[m] = hb.incarnation
            self._dirty = True
            if known is not None:
                # A restart lost the member's in-memory state: take it out
                # of its chains; it rejoins each as a tail once caught up.
                self._remove(m, "restarted")
        for s, rep in hb.shards.items():
            if not 0 <= s < self.shards:
                continue
            chain = self._s.chains[s]
            if m in chain:
                if (self._s.provisional.get(s) == m and rep.caught_up
                        and rep.epoch == self._s.epochs[s]):
                    del self._s.provisional[s]
                    self._dirty = True
                    self._notice("info", "master_join_complete", shard=s, member=m)
                if not rep.healthy:
                    self._remove_from(s, m, "replica_failed")
                continue
            if (rep.healthy and rep.ready_epoch == self._s.epochs[s]
                    and len(chain) < self.chain_length and s not in self._s.provisional):
                self._change(s, [*chain, m], "joined_as_tail", m)
                self._s.provisional[s] = m

    def suspect(self, member: int, by: int) -> None:
        """``by`` lost its connection to ``member``: give ``member`` suspect_ticks to beat."""
        if (not self.suspect_ticks or not 0 <= member < self.members or member == by
                or member in self._dead or by in self._dead or member in self._suspected):
            return
        self._suspected[member] = self._ticks
        self._notice("info", "master_member_suspected", member=member, by=by)

    def tick(self) -> None:
        """Advance time: remove members silent for longer than ``dead_ticks``."""
        self._ticks += 1
        for m in range(self.members):
            limit = self.dead_ticks if m in self._heard else self._bootstrap_ticks
            since = self._suspected.get(m)
            lost = since is not None and self._ticks - since >= self.suspect_ticks
            if m in self._dead or (self._ticks - self._last[m] <= limit and not lost):
                continue
            self._suspected.pop(m, None)
            self._dead.add(m)
            self._notice("warning", "master_member_dead", member=m)
            self._remove(m, "connection_lost" if lost else "heartbeat_timeout")
        if (self.rebalance_ticks and not self._s.provisional
                and self._ticks - self._changed_at >= self.rebalance_ticks):
            self._rebalance()

    def _rebalance(self) -> None:
        """Rule 6: move one head off the member that heads the most shards."""
        chains = self._s.chains
        if self.chain_length < 2 or any(len(c) < self.chain_length or self._dead & set(c)
                                        for c in chains):
            return  # still healing: rebalancing now would only add churn
        heads = {m: 0 for m in range(self.members) if m not in self._dead}
        for c in chains:
            heads[c[0]] += 1
        for s, c in sorted(enumerate(chains), key=lambda sc: -heads[sc[1][0]]):
            if heads[c[0]] - heads[c[1]] >= 2:
                self._remove_from(s, c[0], "rebalance_heads")
                return

    def ready(self) -> MasterReady:
        state = None
        if self._dirty:
            state = {"epochs": list(self._s.epochs), "chains": [list(c) for c in self._s.chains],
                     "incarnations": {str(k): v for k, v in self._s.incarnations.items()},
                     "provisional": {str(k): v for k, v in self._s.provisional.items()}}
        return MasterReady(state, tuple(self._notices))

    def advance(self, ready: MasterReady) -> None:
        self._dirty = False
        self._notices = []

    # ------------------------------------------------------------ changes
    def _remove(self, m: int, why: str) -> None:
        for s in range(self.shards):
            if m in self._s.chains[s]:
                self._remove_from(s, m, why)

    def _remove_from(self, s: int, m: int, why: str) -> None:
        chain = self._s.chains[s]
        keep = len(chain) == 1 or (chain[0] == m and self._s.provisional.get(s) == chain[1])
        if not keep:
            if self._s.provisional.get(s) == m:
                del self._s.provisional[s]
            self._change(s, [x for x in chain if x != m], why, m)
        elif why == "restarted":
            self._change(s, chain, "kept_replica_restarted", m)
        else:
            self._notice("warning", "master_cannot_remove", shard=s, member=m, reason=why,
                         chain=list(chain))

    def _change(self, s: int, chain: list[int], why: str, member: int) -> None:
        self._s.chains[s] = list(chain)
        self._s.epochs[s] += 1
        self._changed_at = self._ticks
        self._dirty = True
        self._notice("info", "master_reconfigured", shard=s, epoch=self._s.epochs[s],
                     chain=list(chain), reason=why, member=member)

    def _notice(self, level: str, event: str, **fields: Any) -> None:
        self._notices.append(Notice(level, event, fields))


def _load(state: dict[str, Any], members: int, shards: int) -> _State:
    """Check persisted state against the flags; a mismatch is an operator error."""
    epochs, chains = state.get("epochs"), state.get("chains")
    if (not isinstance(epochs, list) or not isinstance(chains, list)
            or len(epochs) != shards or len(chains) != shards):
        raise ValueError(f"master state does not match {shards} shards")
    for chain in chains:
        if not chain or any(not isinstance(m, int) or not 0 <= m < members for m in chain):
            raise ValueError(f"master state names members outside 0..{members - 1}")
    inc = {int(k): int(v) for k, v in dict(state.get("incarnations", {})).items()}
    prov = {int(k): int(v) for k, v in dict(state.get("provisional", {})).items()}
    return _State([int(e) for e in epochs], [list(c) for c in chains], inc, prov)
