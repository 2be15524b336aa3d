"""Pulls of objects from other nodes' stores: what to ask whom, and when. Pure, no I/O.

Theory of operation
-------------------
A client asks its own stored to ``pull`` an object that other stores hold
(``sources``, their transfer addresses, in order of preference). This module
decides everything about that pull; the shell (``peers.py``) owns the
sockets and the arena and feeds back what happened. The manager never reads
a clock: every input that depends on time carries ``now``.

Assumptions: objects are immutable, so any source that has an object has the
same bytes; a source that reports another size is broken. The local store
can reserve an object's range before its bytes exist (``create``), and keeps
it invisible until ``seal``.

One pull per object, shared by every request for it (Ray's PullManager does
the same): a second request joins the first as another *waiter*, adding any
sources the pull did not know. A pull goes through these states::

    LOCATING --stat ok--> WAITING --admit--> CREATING --created--> RECEIVING --last chunk--> sealed
       ^  |                                     |                      |
       |  +--no source left--> lost              +--no room--> WAITING   |
       +---------------- next source (failover) <-----------------------+
    LOCAL: another local client is writing the object; wait for its seal.

1. LOCATING: ask the current source for the object's size (``SendStat``).
   A source that answers "not found", fails, or makes no progress for
   ``stall_timeout`` seconds is dropped and the next one is asked.
2. WAITING: admission control. A pull starts only when the store has room
   for it, counting bytes that LRU eviction could free (``admit(room)``).
   Waiting pulls start in arrival order; a pull that does not fit holds back
   the ones behind it, so a big object is not starved by a stream of small
   ones. An object bigger than the whole store fails at once with ``full``.
3. CREATING: the shell reserves the range (``CreateLocal``) and reports back
   in the same turn. If the arena is too fragmented after all, the pull goes
   back to the head of the queue until the room changes.
4. RECEIVING: ``WINDOW`` chunk reads are kept in flight. When the source
   fails mid-object, the chunks that landed stay (the reserved range is
   reused), the others are asked again from the next source after it
   confirms the size. The object is sealed only when every chunk landed,
   so nobody ever sees it half written.
5. Success seals the object and answers every waiter ``{ok, size}``; the
   shell then drops the pull's pin, so the copy is an ordinary cached object
   that LRU may evict. Every source failed: the partial object is aborted
   and every waiter gets ``lost``. A waiter whose deadline passes gets
   ``timeout``; a pull nobody waits for any more is cancelled and aborted.

Each attempt (one pull at one source) has a *tag*; replies carry it back and
replies of an abandoned attempt are ignored, so a late chunk from a dropped
source can never complete a pull. ``CancelAttempt`` tells the shell to drop
that attempt's outstanding requests, and comes before ``AbortLocal`` frees
the range, so no byte is ever received into freed memory.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from daemons.stored.allocator import align_up
from daemons.stored.store import Reply
from daemons.stored.transfer import CHUNK, WINDOW

LOCATING = "LOCATING"
WAITING = "WAITING"
CREATING = "CREATING"
RECEIVING = "RECEIVING"
LOCAL = "LOCAL"
_ACTIVE = (LOCATING, RECEIVING)  # states with requests outstanding at a source


# ---------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class SendStat:
    """Ask ``source`` whether it holds ``oid`` sealed, and its size."""

    oid: bytes
    source: str
    tag: int


@dataclass(frozen=True, slots=True)
class SendRead:
    """Ask ``source`` for ``[off, off+length)`` of ``oid``, into the same range locally."""

    oid: bytes
    source: str
    tag: int
    off: int
    length: int


@dataclass(frozen=True, slots=True)
class CreateLocal:
    """Reserve ``size`` bytes for ``oid`` in the local store; report with ``created``."""

    oid: bytes
    size: int


@dataclass(frozen=True, slots=True)
class SealLocal:
    """Every byte landed: seal ``oid`` locally, then drop the pull's pin."""

    oid: bytes


@dataclass(frozen=True, slots=True)
class AbortLocal:
    """Free the partial local object ``oid`` (after its attempt was cancelled)."""

    oid: bytes


@dataclass(frozen=True, slots=True)
class CancelAttempt:
    """Forget ``tag``'s outstanding requests; payload still due goes nowhere.

    ``close``: the source stopped answering, so its connection is dropped too.
    """

    oid: bytes
    source: str
    tag: int
    close: bool


@dataclass(frozen=True, slots=True)
class WatchLocal:
    """Tell the manager when the local object ``oid`` is sealed or freed."""

    oid: bytes


Action = (SendStat | SendRead | CreateLocal | SealLocal | AbortLocal | CancelAttempt
          | WatchLocal | Reply)


@dataclass(slots=True)
class _Waiter:
    client: int
    r: int
    deadline: float | None


@dataclass(slots=True)
class _Pull:
    oid: bytes
    sources: list[str]
    waiters: list[_Waiter]
    state: str = LOCATING
    idx: int = 0  # current source
    tag: int = 0
    size: int = -1  # -1: not known yet
    created: bool = False
    progress_at: float = 0.0
    missing: collections.deque[int] = field(default_factory=collections.deque)  # chunk offsets
    inflight: dict[int, int] = field(default_factory=dict)  # offset -> length
    errors: list[str] = field(default_factory=list)


class PullManager:
    """Every pull of one stored. Not thread-safe.

    Args:
        capacity: the local store's capacity; bigger objects fail with ``full``.
        chunk: bytes per read request.
        window: reads in flight per pull.
        stall_timeout: seconds without progress after which a source is dropped.
    """

    def __init__(self, capacity: int, chunk: int = CHUNK, window: int = WINDOW,
                 stall_timeout: float = 10.0) -> None:
        if chunk <= 0 or window <= 0 or stall_timeout <= 0:
            raise ValueError("chunk, window and stall_timeout must be positive")
        self.capacity = capacity
        self.chunk = chunk
        self.window = window
        self.stall_timeout = stall_timeout
        self._pulls: dict[bytes, _Pull] = {}
        self._waiting: collections.deque[bytes] = collections.deque()
        self._stuck: tuple[bytes, int] | None = None  # (head oid, room it failed to fit in)
        self._admit_room = 0
        self._next_tag = 0
        self._actions: list[Action] = []
        self._events: list[tuple[str, dict[str, object]]] = []
        self.counters = {"started": 0, "joined": 0, "done": 0, "lost": 0, "full": 0,
                         "cancelled": 0, "failovers": 0, "bytes": 0}

    # ------------------------------------------------------------ queries
    def __contains__(self, oid: bytes) -> bool:
        return oid in self._pulls

    @property
    def waiting(self) -> bool:
        """Some pull waits for room (the shell should call :meth:`admit`)."""
        return bool(self._waiting)

    def first_waiting_size(self) -> int:
        """Bytes the first pull waiting for room needs (0 if none): what the
        store should make room for, spilling if it must."""
        if not self._waiting:
            return 0
        return align_up(self._pulls[self._waiting[0]].size)

    def state(self, oid: bytes) -> str | None:
        p = self._pulls.get(oid)
        return None if p is None else p.state

    def stats(self) -> dict[str, int]:
        active = sum(p.state in _ACTIVE for p in self._pulls.values())
        return {**self.counters, "active": active, "queued": len(self._waiting)}

    def take_events(self) -> list[tuple[str, dict[str, object]]]:
        """Notable moments since the last call (start, failover, end), for the shell to log."""
        events, self._events = self._events, []
        return events

    def take_actions(self) -> list[Action]:
        """What the shell must do, in order (a cancel always precedes its abort)."""
        actions, self._actions = self._actions, []
        return actions

    def next_deadline(self) -> float | None:
        """Earliest waiter deadline or stall check, so the shell knows how long to sleep."""
        best: float | None = None
        for p in self._pulls.values():
            if p.state in _ACTIVE:
                t = p.progress_at + self.stall_timeout
                best = t if best is None or t < best else best
            for w in p.waiters:
                if w.deadline is not None and (best is None or w.deadline < best):
                    best = w.deadline
        return best

    # ------------------------------------------------------------ requests
    def request(self, client: int, r: int, oid: bytes, sources: list[str] | tuple[str, ...],
                deadline: float | None, now: float, local_busy: bool = False) -> None:
        """A client wants ``oid`` here. Joins the object's pull, or starts one.

        Args:
            client, r: who to answer, and the request id to echo.
            sources: transfer addresses of stores that may hold it, best first.
            deadline: when to answer ``timeout`` (monotonic seconds), None for never.
            now: the shell's clock.
            local_busy: the object exists here, unsealed, written by another
                client: wait for that instead of pulling.
        """
        waiter = _Waiter(client, r, deadline)
        p = self._pulls.get(oid)
        if p is not None:
            p.waiters.append(waiter)
            p.sources.extend(s for s in dict.fromkeys(sources) if s not in p.sources)
            self.counters["joined"] += 1
            return
        p = _Pull(oid, list(dict.fromkeys(sources)), [waiter])
        self._pulls[oid] = p
        self.counters["started"] += 1
        self._events.append(("pull_started", {"object_id": oid.hex(), "sources": list(p.sources)}))
        if local_busy:
            self._become_local(p)
        else:
            self._start_attempt(p, now)

    def drop_client(self, client: int) -> None:
        """The client went away: forget its waits; cancel pulls nobody else waits for."""
        for p in list(self._pulls.values()):
            kept = [w for w in p.waiters if w.client != client]
            if len(kept) != len(p.waiters):
                p.waiters = kept
                if not kept:
                    self._cancel(p)

    # ------------------------------------------------------------ source replies
    def stat_done(self, oid: bytes, tag: int, size: int, now: float) -> None:
        """The source has ``oid`` sealed, ``size`` bytes."""
        p = self._attempt(oid, tag, LOCATING)
        if p is None:
            return
        p.progress_at = now
        if p.created:  # a failover: the range is reserved, only the rest is missing
            if size != p.size:
                self._failover(p, f"has {size} bytes, expected {p.size}", now)
                return
            p.state = RECEIVING
            self._fill_window(p)
            return
        if size < 0 or align_up(size) > self.capacity:
            self._give_up(p, "full", f"object {oid.hex()} has {size} bytes, more than this "
                                     f"store's capacity {self.capacity}")
            return
        p.size = size
        p.state = WAITING
        self._waiting.append(oid)

    def stat_missing(self, oid: bytes, tag: int, reason: str, now: float) -> None:
        """The source does not have ``oid`` (sealed): try the next one."""
        p = self._attempt(oid, tag, LOCATING)
        if p is not None:
            self._failover(p, reason, now)

    def read_done(self, oid: bytes, tag: int, off: int, now: float) -> None:
        """The chunk at ``off`` landed in the local range."""
        p = self._attempt(oid, tag, RECEIVING)
        if p is None or off not in p.inflight:
            return
        length = p.inflight.pop(off)
        self.counters["bytes"] += length
        p.progress_at = now
        self._fill_window(p)

    def source_failed(self, oid: bytes, tag: int, reason: str, now: float) -> None:
        """The attempt's connection failed, or the source refused a request."""
        p = self._pulls.get(oid)
        if p is not None and p.tag == tag and p.state in _ACTIVE:
            self._failover(p, reason, now)

    # ------------------------------------------------------------ local store
    def admit(self, room: int) -> None:
        """Start waiting pulls that fit in ``room`` bytes (free plus evictable), in order."""
        self._admit_room = room
        while self._waiting:
            oid = self._waiting[0]
            p = self._pulls[oid]
            need = align_up(p.size)
            if need > room:
                return
            if self._stuck is not None and self._stuck[0] == oid and room <= self._stuck[1]:
                return  # it did not fit in this much room a moment ago
            self._waiting.popleft()
            room -= need
            p.state = CREATING
            self._actions.append(CreateLocal(oid, p.size))

    def created(self, oid: bytes, ok: bool, now: float) -> None:
        """Result of ``CreateLocal``: reserved, or no hole big enough after all."""
        p = self._pulls.get(oid)
        if p is None or p.state != CREATING:
            return
        if not ok:
            p.state = WAITING
            self._waiting.appendleft(oid)
            self._stuck = (oid, self._admit_room)
            return
        if self._stuck is not None and self._stuck[0] == oid:
            self._stuck = None
        p.created = True
        p.state = RECEIVING
        p.progress_at = now
        p.missing.extend(range(0, p.size, self.chunk))
        self._fill_window(p)

    def local_busy(self, oid: bytes) -> None:
        """``CreateLocal`` found the object unsealed, written by another client."""
        p = self._pulls.get(oid)
        if p is not None and p.state == CREATING:
            self._become_local(p)

    def local_sealed(self, oid: bytes, size: int) -> None:
        """Another client sealed ``oid`` here: everyone waiting for it has it."""
        p = self._pulls.get(oid)
        if p is None or p.created:
            return  # our own reservation cannot be sealed by anyone else
        if p.state in _ACTIVE:
            self._actions.append(CancelAttempt(oid, p.sources[p.idx], p.tag, False))
        self._finish(p, size)

    def local_freed(self, oid: bytes, now: float) -> None:
        """The local writer we waited for aborted: pull from the sources after all."""
        p = self._pulls.get(oid)
        if p is not None and p.state == LOCAL:
            self._start_attempt(p, now)

    # ------------------------------------------------------------ time
    def tick(self, now: float) -> None:
        """Answer waiters whose deadline passed; drop sources that stopped making progress."""
        for p in list(self._pulls.values()):
            if any(w.deadline is not None and w.deadline <= now for w in p.waiters):
                kept = []
                for w in p.waiters:
                    if w.deadline is not None and w.deadline <= now:
                        self._actions.append(Reply(w.client, {
                            "r": w.r, "ok": False, "error": "timeout",
                            "msg": f"pull of object {p.oid.hex()} did not finish in time"}))
                    else:
                        kept.append(w)
                p.waiters = kept
                if not kept:
                    self._cancel(p)
                    continue
            if p.state in _ACTIVE and now - p.progress_at >= self.stall_timeout:
                self._failover(p, f"no progress for {self.stall_timeout:g} s", now, close=True)

    # ------------------------------------------------------------ internals
    def _attempt(self, oid: bytes, tag: int, state: str) -> _Pull | None:
        """The pull a reply is for, if the reply belongs to its current attempt."""
        p = self._pulls.get(oid)
        if p is None or p.tag != tag or p.state != state:
            return None
        return p

    def _become_local(self, p: _Pull) -> None:
        p.state = LOCAL
        self._actions.append(WatchLocal(p.oid))

    def _start_attempt(self, p: _Pull, now: float) -> None:
        if p.idx >= len(p.sources):
            why = "; ".join(p.errors) if p.errors else "no source to pull from"
            self._give_up(p, "lost", f"object {p.oid.hex()} could not be pulled: {why}")
            return
        self._next_tag += 1
        p.tag = self._next_tag
        p.state = LOCATING
        p.progress_at = now
        self._actions.append(SendStat(p.oid, p.sources[p.idx], p.tag))

    def _failover(self, p: _Pull, reason: str, now: float, close: bool = False) -> None:
        source = p.sources[p.idx]
        self._actions.append(CancelAttempt(p.oid, source, p.tag, close))
        p.errors.append(f"{source}: {reason}")
        self._events.append(("pull_source_dropped", {"object_id": p.oid.hex(), "peer": source,
                                                     "reason": reason}))
        if p.inflight:  # ask again for what was in flight; what landed stays
            p.missing.extendleft(sorted(p.inflight, reverse=True))
            p.inflight.clear()
        p.idx += 1
        if p.idx < len(p.sources):
            self.counters["failovers"] += 1
        self._start_attempt(p, now)

    def _fill_window(self, p: _Pull) -> None:
        source = p.sources[p.idx]
        while len(p.inflight) < self.window and p.missing:
            off = p.missing.popleft()
            length = min(self.chunk, p.size - off)
            p.inflight[off] = length
            self._actions.append(SendRead(p.oid, source, p.tag, off, length))
        if not p.inflight and not p.missing:
            self._actions.append(SealLocal(p.oid))
            self._finish(p, p.size)

    def _finish(self, p: _Pull, size: int) -> None:
        self._forget(p)
        self.counters["done"] += 1
        self._events.append(("pull_done", {"object_id": p.oid.hex(), "size": size,
                                           "waiters": len(p.waiters)}))
        for w in p.waiters:
            self._actions.append(Reply(w.client, {"r": w.r, "ok": True, "size": size}))

    def _give_up(self, p: _Pull, code: str, msg: str) -> None:
        """Fail every waiter; the caller already cancelled the attempt if one ran."""
        if p.created:
            self._actions.append(AbortLocal(p.oid))
        self._forget(p)
        self.counters[code] += 1
        self._events.append(("pull_failed", {"object_id": p.oid.hex(), "error": code,
                                             "msg": msg}))
        for w in p.waiters:
            self._actions.append(Reply(w.client, {"r": w.r, "ok": False, "error": code,
                                                  "msg": msg}))

    def _cancel(self, p: _Pull) -> None:
        """Nobody waits any more: stop asking, free the partial object."""
        if p.state in _ACTIVE:
            self._actions.append(CancelAttempt(p.oid, p.sources[p.idx], p.tag, False))
        if p.created:
            self._actions.append(AbortLocal(p.oid))
        self._forget(p)
        self.counters["cancelled"] += 1
        self._events.append(("pull_cancelled", {"object_id": p.oid.hex()}))

    def _forget(self, p: _Pull) -> None:
        del self._pulls[p.oid]
        if p.state == WAITING:
            self._waiting.remove(p.oid)
        if self._stuck is not None and self._stuck[0] == p.oid:
            self._stuck = None
