"""Chain replication of one shard, as a pure state machine (van Renesse & Schneider, OSDI'04).

Theory of operation
-------------------
A shard's replicas form a chain ``head -> ... -> tail`` chosen by the chain
master (:mod:`daemons.gcsd.master`) and published as a :class:`Config` with
an *epoch* that only ever grows. One :class:`ChainReplica` is one member's
copy of one shard. Like raft's ``RawNode`` it does no I/O: the shell feeds
it :meth:`~ChainReplica.propose` (a client write, head only),
:meth:`~ChainReplica.step` (a message from a neighbour or the master) and
:meth:`~ChainReplica.tick` (time), then takes a :class:`Ready` batch from
:meth:`~ChainReplica.ready`, carries it out, and calls
:meth:`~ChainReplica.advance`.

Updates. The head gives each write the next sequence number of the shard
and tags it with the current epoch (an :class:`Entry`). Every replica
*applies* an entry when it receives it (the paper's ``Hist``); entries move
down the chain in sequence order (the FIFO links of §2). An entry is
*committed* once the tail has applied it: the tail publishes it and sends
an :class:`Ack` upstream; each replica drops acknowledged entries from its
Sent list (§3, "Sent_i") and passes the Ack on. The client is answered by
the tail when the head tagged the entry with ``reply_to`` (the paper's way,
two hops shorter), otherwise by the head once the Ack reaches it.

Acks only trim Sent lists and feed the resend timer unless someone waits
for them at the head, so they are *lazy*: at most one every ``ack_ticks``,
carrying the newest position. An entry without ``reply_to`` but with a request id
makes the Ack that commits it urgent (sent in the same Ready).

Update propagation invariant (§3): a replica's history is always a prefix
-extension of its successor's. Everything below relies on it:

* head dies: its successor becomes head. Entries the old head applied but
  never forwarded are lost, but none of them was acknowledged; the client
  retries with the same request id and the new head applies it once
  (:meth:`ChainReplica.duplicate`).
* tail dies: its predecessor becomes tail; its whole Sent list is now
  committed, so it publishes and acknowledges it.
* middle dies: on the new config the successor reports how far it got
  (an Ack carrying ``applied``); the predecessor resends the rest
  (a :class:`Resend` the shell fills from the persisted log).
* a new or restarted replica first catches up from the tail while outside
  the chain (:class:`SyncRequest` / :class:`CatchUp`, or a snapshot when
  its log does not match the tail's), tells the master it is close, and is
  appended as the new tail by the next config (§3, "extending a chain").

Epochs fence everything: a chain message is accepted only if its epoch is
the receiver's and it comes from the right neighbour, so a replica the
master has removed can no longer get anything committed.

Log matching: an entry is identified by ``(seq, epoch)``. Only the head of
an epoch creates entries tagged with it, and it creates each seq once, so
two replicas holding the same ``(seq, epoch)`` hold the same history up to
it (raft's Log Matching property). A joiner whose last entry is not in the
tail's log at the same ``(seq, epoch)`` may hold a suffix nobody else has
(an old head's unforwarded writes) and is sent a full snapshot instead.

Ordering contract on :class:`Ready` (the shell must keep it):
persist ``Ready.persist`` durably, *then* send ``Ready.messages``; publish
``Ready.publish`` and answer clients for ``Ready.committed`` only after the
persist. The tail therefore never acknowledges what is not on its disk.

Time is counted in ticks; the machine never reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from daemons.gcsd.tables import META, Op, op_count

# Roles, as UPPERCASE sentinels. SOLE is a chain of one (head and tail).
HEAD = "HEAD"
MIDDLE = "MIDDLE"
TAIL = "TAIL"
SOLE = "SOLE"
IDLE = "IDLE"  # not in the chain: before the first config, removed, or joining

# Legal role changes on a new config. Any role may also become IDLE (removed)
# or keep its role. Replicas only ever move *up* the chain, because newcomers
# are appended at the tail (§3): HEAD -> MIDDLE, say, would mean something
# was inserted ahead of the head. IDLE may go anywhere: at bootstrap every
# chain is made of fresh replicas; later the master only appends caught-up
# joiners as tails.
_LEGAL: dict[str, frozenset[str]] = {
    IDLE: frozenset({HEAD, MIDDLE, TAIL, SOLE}),
    HEAD: frozenset({SOLE}),
    MIDDLE: frozenset({HEAD, TAIL, SOLE}),
    TAIL: frozenset({MIDDLE, HEAD, SOLE}),
    SOLE: frozenset({HEAD}),
}

# How many (client, request) ids each replica remembers for dedup: retries
# come within seconds, and a chain sees at most tens of thousands of
# entries per second, so this covers several seconds at full load.
DEDUP_KEEP = 100_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One update of a shard: ops applied atomically, and what the client is told.

    ``marks`` holds, per op, its number in its table's publication stream
    on this shard (0 for internal tables), so a subscriber can see gaps.
    ``reply_to`` names the client the *tail* answers once it has applied
    the entry (§2 of the paper: the tail replies); empty means the head
    answers, after the commit has travelled back up the chain.
    """

    seq: int
    epoch: int
    ops: tuple[Op, ...]
    cid: bytes = b""
    rid: int = 0
    result: Any = None
    marks: tuple[int, ...] = ()
    reply_to: bytes = b""
    # The entry's encoded form, filled in by the shell's wire layer the first
    # time it is needed (see daemons.gcsd.wire.entry_blob). Not part of its identity.
    wire: bytes = field(default=b"", compare=False, repr=False)


# ---------------------------------------------------------------- messages in
@dataclass(frozen=True, slots=True)
class Config:
    """The master's word on a shard: the chain, head first, for an epoch."""

    shard: int
    epoch: int
    chain: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Forward:
    """Entries in sequence order, sent down the chain, with the sender's commit point.

    ``committed`` lets a newly appended tail know how far it must get
    before its reads are as fresh as the old tail's were.
    """

    shard: int
    epoch: int
    src: int
    entries: tuple[Entry, ...]
    committed: int = 0


@dataclass(frozen=True, slots=True)
class Ack:
    """Sent up the chain: how far the sender has applied, and what is committed."""

    shard: int
    epoch: int
    src: int
    applied: int
    committed: int
    # A newly appended tail that has not yet heard its predecessor's commit
    # point (so it may not serve reads) asks for it on every Ack until it
    # does: the one Forward that carries it may be lost.
    need_floor: bool = False


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """A replica outside the chain asks the tail for what follows its last entry."""

    shard: int
    epoch: int
    src: int
    applied: int
    last_epoch: int


@dataclass(frozen=True, slots=True)
class CatchUp:
    """The tail's answer to a SyncRequest: the next entries, and how far it is."""

    shard: int
    epoch: int
    src: int
    entries: tuple[Entry, ...]
    tail_applied: int


ChainMessage = Config | Forward | Ack | SyncRequest | CatchUp


# ---------------------------------------------------------------- effects out
@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to member ``dest``."""

    dest: int
    msg: Forward | Ack | SyncRequest | CatchUp


@dataclass(frozen=True, slots=True)
class Resend:
    """Read entries ``first..last`` from the local log and Forward them to ``dest``."""

    dest: int
    epoch: int
    first: int
    last: int
    committed: int


@dataclass(frozen=True, slots=True)
class ServeSync:
    """Answer ``dest``'s SyncRequest from the local log, or with a snapshot (see plan_catchup)."""

    dest: int
    epoch: int
    applied: int
    last_epoch: int


Effect = Send | Resend | ServeSync


@dataclass(frozen=True, slots=True)
class Notice:
    """A log line for the shell: ``log.<level>(event, **fields)``."""

    level: str
    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ready:
    """One batch of work for the shell.

    Ordering contract: write every entry of ``persist`` durably (in order,
    one atomic batch each) before sending ``messages``; only then publish
    ``publish`` and answer the clients of ``committed``.
    """

    persist: tuple[Entry, ...] = ()
    messages: tuple[Effect, ...] = ()
    committed: tuple[Entry, ...] = ()
    publish: tuple[Entry, ...] = ()
    role: tuple[str, str] | None = None
    notices: tuple[Notice, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.persist or self.messages or self.committed or self.publish
                    or self.role or self.notices)


# ---------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class Proposed:
    """``propose`` accepted the write as ``seq``; it commits later (or at once on SOLE)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """``propose`` refused: this replica is not the head. Expected, not an error."""

    reason: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The request id was already applied as ``seq``; ``result`` is what it returned."""

    seq: int
    committed: bool
    result: Any


NOT_HEAD = Dropped("not the head of this shard")
READ_ONLY = Dropped("replica has failed and is read-only")


@dataclass
class _Out:
    persist: list[Entry] = field(default_factory=list)
    messages: list[Effect] = field(default_factory=list)
    committed: list[Entry] = field(default_factory=list)
    publish: list[Entry] = field(default_factory=list)
    role: tuple[str, str] | None = None
    notices: list[Notice] = field(default_factory=list)


class ChainReplica:
    """One member's replica of one shard. Pure and not thread-safe.

    Args:
        shard: shard number.
        me: this member's id.
        applied: seq of the last entry in the local store (0 if empty).
        last_epoch: epoch tag of that entry.
        dedup: ``(cid, rid, seq, result)`` of recent entries, oldest first,
            so a restarted replica still recognises retried writes.
        marks: last publication mark per table.
        resend_ticks: ticks without progress before resending to the successor.
        ack_ticks: how often a lazy Ack goes out (see the module docstring);
            well under ``resend_ticks``, or the predecessor resends needlessly.
        sync_ticks: ticks between SyncRequests while joining.
        join_lag: a joiner within this many entries of the tail is ready to join.
        chain_length: the target R; a replica outside a chain that is already
            this long does not pull from its tail (0: always pull).
    """

    def __init__(self, shard: int, me: int, *, applied: int = 0, last_epoch: int = 0,
                 dedup: Iterable[tuple[bytes, int, int, Any]] = (),
                 marks: dict[str, int] | None = None, resend_ticks: int = 20, ack_ticks: int = 5,
                 sync_ticks: int = 20, join_lag: int = 64, chain_length: int = 0) -> None:
        self.shard = shard
        self.me = me
        self.epoch = 0
        self.chain: tuple[int, ...] = ()
        self.role = IDLE
        self.applied = applied
        self.last_epoch = last_epoch
        # Highest seq known committed here. Joiners only hold committed entries.
        self.committed = applied
        self.marks: dict[str, int] = dict(marks or {})
        self._sent: OrderedDict[int, Entry] = OrderedDict()  # (committed, applied]
        self._dedup: OrderedDict[tuple[bytes, int], tuple[int, Any]] = OrderedDict()
        for cid, rid, seq, result in dedup:
            self._remember(cid, rid, seq, result)
        self.resend_ticks = resend_ticks
        self.ack_ticks = max(1, min(ack_ticks, resend_ticks // 2))
        self.sync_ticks = sync_ticks
        self.join_lag = join_lag
        self.chain_length = chain_length
        self.ready_epoch = 0  # epoch in which we caught up with the tail (joiners)
        # A tail serves reads only once it holds everything its predecessor
        # had committed: a freshly appended tail may still be catching up,
        # and reads must never go backwards.
        self.read_floor = 0
        self._floor_known = True
        self._ticks = 0
        self._succ_applied = -1  # unknown until the successor's first Ack
        self._succ_seen_tick = 0
        self._sync_sent_tick: int | None = None
        self._ack_due = False  # send an Ack in the next Ready
        self._ack_lazy = False  # send one at the next ack tick
        self._out = _Out()

    # ------------------------------------------------------------ queries
    @property
    def pred(self) -> int | None:
        i = self._index()
        return self.chain[i - 1] if i is not None and i > 0 else None

    @property
    def succ(self) -> int | None:
        i = self._index()
        return self.chain[i + 1] if i is not None and i + 1 < len(self.chain) else None

    @property
    def tail(self) -> int | None:
        return self.chain[-1] if self.chain else None

    @property
    def is_head(self) -> bool:
        return self.role in (HEAD, SOLE)

    @property
    def is_tail(self) -> bool:
        return self.role in (TAIL, SOLE)

    @property
    def caught_up(self) -> bool:
        """Whether we hold everything our predecessor had committed (see read_floor)."""
        return self._floor_known and self.applied >= self.read_floor

    @property
    def readable(self) -> bool:
        """Whether reads may be served here: the tail, caught up to its floor."""
        return self.is_tail and self._floor_known and self.applied >= self.read_floor

    def duplicate(self, cid: bytes, rid: int) -> Duplicate | None:
        """If ``(cid, rid)`` was already applied here, say where and with what result."""
        hit = self._dedup.get((cid, rid)) if cid else None
        if hit is None:
            return None
        seq, result = hit
        return Duplicate(seq, seq <= self.committed, result)

    def dedup_items(self, limit: int) -> list[tuple[bytes, int, int, Any]]:
        """The newest ``limit`` remembered request ids, oldest first (for snapshots)."""
        items = list(self._dedup.items())[-limit:]
        return [(cid, rid, seq, result) for (cid, rid), (seq, result) in items]

    def _index(self) -> int | None:
        try:
            return self.chain.index(self.me)
        except ValueError:
            return None

    # ------------------------------------------------------------ inputs
    def propose(self, ops: tuple[Op, ...] | list[Op], cid: bytes = b"", rid: int = 0,
                result: Any = None, reply_to: bytes = b"") -> Proposed | Dropped:
        """Start a write at the head.

        Args:
            ops: the changes, applied atomically.
            cid, rid: the client's id and request id, for dedup (b"" for none).
            result: what the client is told once the write commits.
            reply_to: the client the tail should answer (see Entry); ignored
                on a chain of one, where head and tail are the same.

        Returns:
            Proposed(seq), or Dropped if this replica is not the head.
        """
        if not self.is_head:
            return NOT_HEAD
        marks = []
        for op in ops:  # an op writing n keys takes marks m .. m+n-1, recorded as m
            if op.table == META:
                marks.append(0)
            else:
                first = self.marks.get(op.table, 0) + 1
                marks.append(first)
                self.marks[op.table] = first + op_count(op) - 1
        if self.succ is None:
            reply_to = b""
        entry = Entry(self.applied + 1, self.epoch, tuple(ops), cid, rid, result, tuple(marks),
                      reply_to)
        self._apply(entry)
        if self.succ is not None:
            self._out.messages.append(Send(self.succ, Forward(self.shard, self.epoch, self.me,
                                                              (entry,), self.committed)))
        else:  # SOLE: applied at the tail means committed
            self._commit_to(self.applied, publish=True)
        return Proposed(entry.seq)

    def step(self, msg: ChainMessage) -> None:
        """Take one message from the master or a neighbour. Stale ones are dropped."""
        if msg.shard != self.shard:
            self._notice("warning", "chain_wrong_shard", got=msg.shard)
            return
        if isinstance(msg, Config):
            self._step_config(msg)
            return
        if msg.epoch != self.epoch:
            # Older: a message from a superseded chain (§3 needs them ignored).
            # Newer: we have not heard the config yet; the sender resends.
            self._notice("info", "chain_stale_epoch", kind=type(msg).__name__,
                         got=msg.epoch, epoch=self.epoch, src=msg.src)
            return
        if isinstance(msg, Forward):
            self._step_forward(msg)
        elif isinstance(msg, Ack):
            self._step_ack(msg)
        elif isinstance(msg, SyncRequest):
            self._step_sync_request(msg)
        else:
            self._step_catch_up(msg)

    def tick(self) -> None:
        """Advance time one tick: resend to a stuck successor, keep joining."""
        self._ticks += 1
        succ = self.succ
        if succ is not None and self._succ_applied < self.applied:
            if self._ticks - self._succ_seen_tick >= self.resend_ticks:
                # No Ack for a while: the link dropped something, or the
                # successor is new and has not said where it is. Resend
                # from what it last reported (from our committed point if
                # it has said nothing: it holds at least that much).
                first = (self._succ_applied if self._succ_applied >= 0 else self.committed) + 1
                self._out.messages.append(Resend(succ, self.epoch, first, self.applied,
                                                 self.committed))
                self._succ_seen_tick = self._ticks
        if self.pred is not None and ((self._ack_lazy and self._ticks % self.ack_ticks == 0)
                                      or self._ticks % self.resend_ticks == 0):
            self._ack_due = True  # also periodic: it lets the predecessor notice losses
            self._ack_lazy = False
        if self.role == IDLE and self._wants_to_join():
            if (self._sync_sent_tick is None
                    or self._ticks - self._sync_sent_tick >= self.sync_ticks):
                self._request_sync()

    def restored(self, applied: int, last_epoch: int, dedup: Iterable[tuple[bytes, int, int, Any]],
                 marks: dict[str, int]) -> None:
        """The shell installed a snapshot from the tail: adopt its position. Joiners only."""
        if self.role != IDLE:
            self._notice("error", "chain_snapshot_ignored", role=self.role)
            return
        self.applied = self.committed = applied
        self.last_epoch = last_epoch
        self.marks = dict(marks)
        self._dedup.clear()
        for cid, rid, seq, result in dedup:
            self._remember(cid, rid, seq, result)
        self._request_sync()

    # ------------------------------------------------------------ output
    def ready(self) -> Ready:
        """Return what the shell must do now (see the ordering contract on Ready)."""
        if self._ack_due and self.pred is not None:
            self._out.messages.append(Send(self.pred, Ack(self.shard, self.epoch, self.me,
                                                          self.applied, self.committed,
                                                          not self._floor_known)))
        self._ack_due = False
        out = self._out
        return Ready(tuple(out.persist), tuple(out.messages), tuple(out.committed),
                     tuple(out.publish), out.role, tuple(out.notices))

    def advance(self, ready: Ready) -> None:
        """The shell has carried out ``ready``: forget it."""
        self._out = _Out()

    def has_ready(self) -> bool:
        out = self._out
        return bool(self._ack_due or out.persist or out.messages or out.committed
                    or out.role or out.notices)

    # ------------------------------------------------------------ handlers
    def _step_config(self, msg: Config) -> None:
        if msg.epoch <= self.epoch:
            return  # old news (configs are resent on every master heartbeat)
        old_role, old_succ = self.role, self.succ
        self.epoch, self.chain = msg.epoch, tuple(msg.chain)
        new_role = self._role_in(self.chain)
        if new_role != old_role and new_role != IDLE and new_role not in _LEGAL[old_role]:
            # Only a confused master asks this; stepping out is always safe,
            # because we will rejoin as a tail after catching up.
            self._notice("error", "chain_illegal_transition", old=old_role, new=new_role,
                         epoch=msg.epoch, chain=list(msg.chain))
            new_role = IDLE
            self.chain = tuple(m for m in self.chain if m != self.me)
        self._become(new_role, old_role)
        if old_role == IDLE and new_role == TAIL:
            self._floor_known = False  # until the predecessor tells us its commit point
        if self.succ != old_succ or new_role == IDLE:
            self._succ_applied = -1
            self._succ_seen_tick = self._ticks
        if self.pred is not None:
            self._ack_due = True  # "tell the predecessor where we are" (§3, middle failure)
        if self.is_tail:
            self._commit_to(self.applied, publish=True)
        if new_role == IDLE:
            self.ready_epoch = 0
            self._sync_sent_tick = None
            if self._wants_to_join():
                self._request_sync()

    def _become(self, new: str, old: str) -> None:
        self.role = new
        if new != old:
            self._out.role = (old, new)
            self._notice("info", "chain_role", old=old, new=new, epoch=self.epoch,
                         chain=list(self.chain))

    def _role_in(self, chain: tuple[int, ...]) -> str:
        if self.me not in chain:
            return IDLE
        if len(chain) == 1:
            return SOLE
        i = chain.index(self.me)
        return HEAD if i == 0 else TAIL if i == len(chain) - 1 else MIDDLE

    def _step_forward(self, msg: Forward) -> None:
        if self.role in (IDLE, HEAD, SOLE) or msg.src != self.pred:
            self._notice("warning", "chain_unexpected_forward", src=msg.src, role=self.role)
            return
        self.read_floor = max(self.read_floor, msg.committed)
        self._floor_known = True
        fresh: list[Entry] = []
        for entry in msg.entries:
            if entry.seq <= self.applied:
                continue  # a resend overlapping what we have: apply once
            if entry.seq != self.applied + 1:
                break  # a gap: something was lost or reordered; our Ack asks again
            self._apply(entry)
            fresh.append(entry)
        self._ack_lazy = True  # where we are, for the predecessor's resend timer
        if not fresh:
            return
        if self.succ is not None:
            self._out.messages.append(Send(self.succ, Forward(self.shard, self.epoch, self.me,
                                                              tuple(fresh), self.committed)))
        else:
            self._commit_to(self.applied, publish=True)

    def _step_ack(self, msg: Ack) -> None:
        if msg.src != self.succ:
            self._notice("warning", "chain_unexpected_ack", src=msg.src, role=self.role)
            return
        if msg.applied > self.applied or msg.committed > self.applied:
            # Our successor cannot hold more than we do (the propagation
            # invariant) unless it is from another history; ignore it.
            self._notice("error", "chain_ack_beyond_history", src=msg.src,
                         applied=msg.applied, ours=self.applied)
            return
        if msg.applied > self._succ_applied:
            self._succ_seen_tick = self._ticks
        if self._succ_applied < 0 or msg.applied < self._succ_applied or msg.need_floor:
            # A successor new to us (or one that lost state) says where it
            # is: resend the rest (§3: "the predecessor resends Sent").
            # Sent even when empty: it carries our commit point, which a
            # newly appended tail needs before it may serve reads.
            self._out.messages.append(Resend(msg.src, self.epoch, msg.applied + 1,
                                             self.applied, self.committed))
            self._succ_applied = msg.applied
            self._succ_seen_tick = self._ticks
        else:
            self._succ_applied = max(self._succ_applied, msg.applied)
        if msg.committed > self.committed:
            self._commit_to(msg.committed, publish=False)

    def _step_sync_request(self, msg: SyncRequest) -> None:
        if not self.is_tail:
            self._notice("info", "chain_sync_not_tail", src=msg.src, role=self.role)
            return
        self._out.messages.append(ServeSync(msg.src, self.epoch, msg.applied, msg.last_epoch))

    def _step_catch_up(self, msg: CatchUp) -> None:
        if self.role != IDLE or msg.src != self.tail:
            return  # late answer from before we joined, or from a stale tail
        for entry in msg.entries:
            if entry.seq <= self.applied:
                continue
            if entry.seq != self.applied + 1:
                break
            self._apply(entry)
        self.committed = self.applied
        if msg.tail_applied - self.applied <= self.join_lag:
            if self.ready_epoch != self.epoch:
                self._notice("info", "chain_caught_up", applied=self.applied,
                             tail_applied=msg.tail_applied, epoch=self.epoch)
            self.ready_epoch = self.epoch
        if msg.tail_applied > self.applied:
            self._request_sync()  # keep pulling without waiting for a tick
        else:
            self._sync_sent_tick = self._ticks

    # ------------------------------------------------------------ helpers
    def _wants_to_join(self) -> bool:
        if self.tail is None or self.tail == self.me:
            return False
        return not self.chain_length or len(self.chain) < self.chain_length

    def _request_sync(self) -> None:
        tail = self.tail
        if tail is None or tail == self.me:
            return
        self._sync_sent_tick = self._ticks
        self._out.messages.append(Send(tail, SyncRequest(self.shard, self.epoch, self.me,
                                                         self.applied, self.last_epoch)))

    def _apply(self, entry: Entry) -> None:
        self.applied = entry.seq
        self.last_epoch = entry.epoch
        self._out.persist.append(entry)
        for op, mark in zip(entry.ops, entry.marks, strict=False):
            if mark:
                last = mark + op_count(op) - 1
                self.marks[op.table] = max(self.marks.get(op.table, 0), last)
        if entry.cid:
            self._remember(entry.cid, entry.rid, entry.seq, entry.result)
        if self.role != IDLE:
            self._sent[entry.seq] = entry
        else:
            self.committed = self.applied

    def _remember(self, cid: bytes, rid: int, seq: int, result: Any) -> None:
        self._dedup[(cid, rid)] = (seq, result)
        if len(self._dedup) > DEDUP_KEEP:
            self._dedup.popitem(last=False)

    def _commit_to(self, seq: int, publish: bool) -> None:
        if seq <= self.committed and not self._sent:
            return
        moved = seq > self.committed
        self.committed = max(self.committed, seq)
        urgent = False
        while self._sent:
            first = next(iter(self._sent))
            if first > self.committed:
                break
            entry = self._sent.pop(first)
            self._out.committed.append(entry)
            if publish:
                self._out.publish.append(entry)
            urgent = urgent or (entry.rid != 0 and not entry.reply_to)
        if self.pred is not None and (moved or publish):
            if urgent:
                self._ack_due = True  # the head has a client waiting for this
            else:
                self._ack_lazy = True

    def _notice(self, level: str, event: str, **fields: Any) -> None:
        fields.setdefault("shard", self.shard)
        self._out.notices.append(Notice(level, event, fields))


# ---------------------------------------------------------------- catch-up planning
@dataclass(frozen=True, slots=True)
class Incremental:
    """Send log entries ``first..last``: the joiner's history is a prefix of ours."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Send everything: the joiner is too far behind or holds entries we do not."""


def plan_catchup(applied: int, last_epoch: int, *, tail_applied: int, log_first: int,
                 epoch_at: Callable[[int], int | None], max_entries: int = 512
                 ) -> Incremental | Snapshot:
    """Decide how the tail answers a joiner at ``(applied, last_epoch)``.

    Args:
        applied, last_epoch: the joiner's last entry.
        tail_applied: the tail's last seq.
        log_first: the oldest seq still in the tail's log.
        epoch_at: the epoch tag of the tail's entry at a seq, or None.
        max_entries: most entries per answer (the joiner asks again).
    """
    if applied > tail_applied:
        return Snapshot()  # it has entries we never saw: an old head's suffix
    if applied > 0 and (applied < log_first - 1 or epoch_at(applied) != last_epoch):
        return Snapshot()
    if applied == 0 and log_first > 1:
        return Snapshot()
    return Incremental(applied + 1, min(tail_applied, applied + max_entries))
