"""The object store core: object table, pins, pending gets. Pure, no I/O.

Theory of operation
-------------------
stored keeps every object in one shared-memory arena; this module decides
what lives where and who may see it, and the shell (``server.py``) moves the
bytes on the wire. The core never reads a clock or touches a socket: the
shell calls :meth:`ObjectTable.step` with a parsed request and the current
``time.monotonic()``, and gets back the :class:`Reply` values to send. Time
only enters as numbers, so tests drive deadlines by passing ``now``.

Object life cycle (Plasma's)::

    create ──> UNSEALED ──seal──> SEALED ──(no pins)──> cached, evictable
                  │                  │
                abort          delete / evict
                  └───> freed <──────┘

* ``create`` reserves ``(offset, size)`` in the arena (``Allocator``) and pins
  the object for its creator, who writes the bytes through its own mapping.
  If the arena has no hole big enough, sealed objects nobody pins are evicted
  in LRU order (``LruPolicy``) until one is; if pinned and unsealed objects
  alone leave too little room, the answer is ``full`` and nothing is evicted.
* ``seal`` makes the object immutable and visible, and completes every
  pending ``get`` that was waiting only for it.
* ``get`` answers at once when every object is sealed (or ``timeout_ms`` is
  0); otherwise it waits in ``_gets`` until the last one is sealed or its
  deadline passes (:meth:`tick`). Each object returned gets one pin for the
  asking client, so it cannot be evicted or deleted while the client reads.
* ``free`` (one-way) deletes objects nobody pins: an owner sends it when its
  last reference goes, so the space (already faulted in) is reused at once.
* ``release`` drops one pin; an object whose pins reach zero stays cached
  and becomes the most recently used eviction candidate.
* ``disconnect`` drops everything a client held: its pins, its unsealed
  objects and its pending gets, so a crashed process leaks nothing.

Pins are counted per client and per object, so one client's releases never
drop another client's pins. A pending get does not pin the objects that are
already sealed; if one is evicted while the get waits for the others, the
reply carries None for it, as for any object missing at the deadline.

Spilling (with a :class:`~daemons.stored.spill.SpillPolicy`)
--------------------------------------------------------------
Besides pins, a client may *hold* an object (``seal``/``get`` with
``hold``; ``unhold`` drops it). A pin says "mapped, being read": never move
it. A hold says "keep it, I own it": it may move to disk. A worker seals its
task's big return with a *handoff* hold, which goes when another client (the
owner) holds the object, so the return is never unheld in between. So a sealed
object is, by what it has::

    pins          -> pinned: stays in memory
    holds only    -> spill candidate (SPILLED once written to disk)
    neither       -> cache: LRU-evicted (from memory, and from disk if there)

When a create does not fit even after evicting the cache, the policy picks
spill candidates (LRU) and the table emits :class:`SpillOut` actions; the
create's reply waits (``_room_waiters``) until the writes are done
(:meth:`ObjectTable.spill_done`), which frees the objects' memory. A get
of a SPILLED object reserves memory (evicting or spilling others if it must),
emits a :class:`SpillRead` and answers once :meth:`ObjectTable.restore_done`
reports the bytes back: it waits for restores even with ``timeout_ms`` 0,
since the object is here, only not in memory. The disk copy stays after a
restore (objects are immutable), so spilling the object again costs no
write; it goes when the object is freed, and its file when the file's last
object goes (``SpillDelete``). Objects being written or restored are
*busy*: never evicted, and a free of one is done when its I/O ends. Without a
policy (spilling off) a create that does not fit answers ``full`` at once.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from daemons.stored.allocator import Allocation, Allocator, align_up
from daemons.stored.eviction import LruPolicy
from daemons.stored.messages import (
    Abort,
    Contains,
    Create,
    Delete,
    Free,
    Get,
    Hello,
    Release,
    Request,
    Seal,
    Stats,
    Unhold,
)
from daemons.stored.spill import SpillPolicy, SpillWrite

UNSEALED = "UNSEALED"
SEALED = "SEALED"  # sealed and in memory
SPILLED = "SPILLED"  # sealed, on disk only
RESTORING = "RESTORING"  # sealed, being read back from disk into its new range


@dataclass(frozen=True, slots=True)
class SpillRead:
    """Read ``size`` bytes at ``file_off`` of spill file ``file_id`` into the arena at ``offset``."""

    oid: bytes
    file_id: int
    file_off: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SpillOut:
    """Write spill file ``file_id``: these arena ranges ``(offset, size)``, back to back."""

    file_id: int
    ranges: tuple[tuple[int, int], ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class SpillDelete:
    """Spill file ``file_id`` has no live object left: delete it."""

    file_id: int


SpillIo = SpillOut | SpillRead | SpillDelete


@dataclass(frozen=True, slots=True)
class Reply:
    """A message for the shell to send to ``client``.

    ``arena_fd`` asks the shell to attach the arena's file descriptor
    (SCM_RIGHTS) to this message; only the hello reply sets it.
    """

    client: int
    msg: dict[str, Any]
    arena_fd: bool = False


@dataclass(slots=True)
class _Object:
    oid: bytes
    size: int
    alloc: Allocation | None  # None while SPILLED
    creator: int
    state: str = UNSEALED
    pins: dict[int, int] = field(default_factory=dict)  # client -> pin count
    pin_total: int = 0
    holds: dict[int, int] | None = None  # client -> hold count
    hold_total: int = 0
    on_disk: bool = False  # a readable copy is in a spill file
    busy: bool = False  # a spill write or restore of it is in flight
    doomed: bool = False  # freed while busy: free it when the I/O ends
    handoff: int | None = None  # client whose hold goes when another client holds it


@dataclass(slots=True)
class _Client:
    cid: int
    pid: int = 0
    name: str = ""
    pins: dict[bytes, int] = field(default_factory=dict)  # oid -> pin count
    holds: dict[bytes, int] = field(default_factory=dict)  # oid -> hold count
    created: set[bytes] = field(default_factory=set)  # its objects still UNSEALED
    gets: set[int] = field(default_factory=set)  # its pending get ids


@dataclass(slots=True)
class _PendingGet:
    gid: int
    client: int
    r: int
    oids: tuple[bytes, ...]
    deadline: float | None
    missing: set[bytes]
    hold: bool = False
    restoring: set[bytes] = field(default_factory=set)  # missing ones coming back from disk
    expired: bool = False  # deadline passed while restores were in flight


@dataclass(slots=True)
class _RoomWaiter:
    """A create or restore waiting for spill writes to make room."""

    client: int
    r: int
    oid: bytes
    size: int
    restore: bool


@dataclass(frozen=True, slots=True)
class Dropped:
    """What a disconnect cleaned up (for the shell's log line)."""

    pins: int
    aborted: int
    gets: int


def _error(client: int, r: int, code: str, msg: str) -> list[Reply]:
    return [Reply(client, {"r": r, "ok": False, "error": code, "msg": msg})]


class ObjectTable:
    """Objects, pins and pending gets of one stored. Not thread-safe.

    Args:
        capacity: bytes of the arena objects may use (rounded down to 64).
        arena_size: size of the mapping clients receive (>= capacity).
        spill: the spill policy; None turns spilling off.
    """

    def __init__(self, capacity: int, arena_size: int | None = None,
                 spill: SpillPolicy | None = None) -> None:
        self.allocator = Allocator(capacity)
        self.capacity = self.allocator.limit
        self.arena_size = arena_size if arena_size is not None else self.capacity
        self.policy = LruPolicy()  # the cache: sealed, no pins, no holds
        self.spillable = LruPolicy()  # sealed, in memory, held, no pins, not busy
        self.spill = spill
        self.num_evictions = 0
        self.pinned_bytes = 0
        self.counters = {"spilled_objects": 0, "spilled_bytes": 0, "restored_objects": 0,
                         "restored_bytes": 0, "spill_failures": 0}
        self._spilling_bytes = 0  # memory that writes in flight will free
        self._writes: dict[int, SpillWrite] = {}
        self._io: list[SpillIo] = []
        self._room_waiters: list[_RoomWaiter] = []
        self._room_changed = False
        self._objects: dict[bytes, _Object] = {}
        self._clients: dict[int, _Client] = {}
        self._gets: dict[int, _PendingGet] = {}
        self._waiters: dict[bytes, set[int]] = {}  # oid -> pending get ids
        self._deadlines: list[tuple[float, int]] = []  # heap; stale entries skipped
        self._next_gid = 0
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._watched: set[bytes] = set()
        self._notices: list[tuple[str, bytes, int]] = []

    # ------------------------------------------------------------ clients
    def connect(self, client: int) -> None:
        """Register a new connection before its first request."""
        self._clients[client] = _Client(client)

    def disconnect(self, client: int) -> Dropped:
        """Forget a client: drop its pins, abort its unsealed objects, cancel its gets."""
        c = self._clients.pop(client, None)
        if c is None:
            return Dropped(0, 0, 0)
        ngets = len(c.gets)
        for gid in list(c.gets):
            self._cancel_get(gid)
        if self._room_waiters:
            self._room_waiters = [w for w in self._room_waiters
                                  if w.restore or w.client != client]
        for oid, n in list(c.holds.items()):
            obj = self._objects.get(oid)
            if obj is not None:
                self._unhold(obj, client, n)
        npins = 0
        for oid, n in c.pins.items():
            obj = self._objects.get(oid)
            if obj is not None:
                npins += n
                self._unpin(obj, client, n)
        aborted = 0
        for oid in list(c.created):
            obj = self._objects.get(oid)
            if obj is not None and obj.state == UNSEALED:
                self._free(obj)
                aborted += 1
        return Dropped(npins, aborted, ngets)

    # ------------------------------------------------------------ requests
    def step(self, client: int, req: Request, now: float) -> list[Reply]:
        """Apply one request from ``client``; return the messages to send.

        Args:
            client: id of a connected client (see :meth:`connect`).
            req: a request from :func:`daemons.stored.messages.parse`.
            now: the shell's monotonic clock, for get deadlines.

        Returns:
            Replies, possibly to other clients (a seal completes their gets).
        """
        if client not in self._clients:
            raise KeyError(f"client {client} is not connected")
        match req:
            case Get():
                return self._step_get(client, req, now)
            case Release():
                self._step_release(client, req)
                return []
            case Unhold():
                self._step_unhold(client, req)
                return []
            case Create():
                return self._step_create(client, req)
            case Seal():
                return self._step_seal(client, req)
            case Abort():
                return self._step_abort(client, req)
            case Delete():
                return self._step_delete(client, req)
            case Free():
                self._step_delete(client, Delete(0, req.oids))
                return []
            case Contains():
                objects = self._objects
                present = [oid in objects and objects[oid].state != UNSEALED
                           for oid in req.oids]
                return [Reply(client, {"r": req.r, "ok": True, "present": present})]
            case Stats():
                return [Reply(client, {"r": req.r, "ok": True, **self.stats()})]
            case Hello():
                c = self._clients[client]
                c.pid, c.name = req.pid, req.name
                return [Reply(client, {"r": req.r, "ok": True, "capacity": self.capacity,
                                       "arena_size": self.arena_size}, arena_fd=True)]
        raise TypeError(f"not a request: {req!r}")

    def tick(self, now: float) -> list[Reply]:
        """Answer every pending get whose deadline is at or before ``now``; retry
        creates and restores that wait for room if room may have appeared."""
        out: list[Reply] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, gid = heapq.heappop(heap)
            pending = self._gets.get(gid)
            if pending is not None:
                if pending.restoring:
                    pending.expired = True  # answer when the restores are done
                else:
                    out.append(self._finish_get(gid))
        if self._room_waiters and self._room_changed:
            out += self._serve_room_waiters()
        return out

    def next_deadline(self) -> float | None:
        """Earliest deadline of a pending get, so the shell knows how long to sleep."""
        heap = self._deadlines
        while heap and heap[0][1] not in self._gets:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def stats(self) -> dict[str, int]:
        out = {"capacity": self.capacity, "used": self.allocator.allocated,
               "pinned_bytes": self.pinned_bytes, "num_objects": len(self._objects),
               "num_evictions": self.num_evictions}
        if self.spill is not None:
            out.update(self.counters, spill_files=self.spill.num_files,
                       spill_disk_bytes=self.spill.disk_bytes,
                       spillable_bytes=self.spillable.evictable_bytes)
        return out

    def take_events(self) -> list[tuple[str, dict[str, Any]]]:
        """Notable events since the last call (evictions, full), for the shell to log."""
        events, self._events = self._events, []
        return events

    @property
    def pending_gets(self) -> int:
        return len(self._gets)

    # ------------------------------------------------------------ transfers
    @property
    def room(self) -> int:
        """Bytes a create could get now: free plus what LRU eviction could free."""
        return self.allocator.free_bytes + self.policy.evictable_bytes

    def lookup(self, oid: bytes) -> tuple[str, int] | None:
        """``(state, size)`` of an object, or None: lets a pull see what is here already.

        A spilled or restoring object is reported SEALED: it is here, readable.
        """
        obj = self._objects.get(oid)
        if obj is None:
            return None
        return (UNSEALED if obj.state == UNSEALED else SEALED), obj.size

    def spill_location(self, oid: bytes) -> tuple[int, int, int] | None:
        """``(file_id, offset, size)`` of a SPILLED (or RESTORING) object's disk copy.

        The transfer shell streams such an object from its file instead of
        restoring it into memory.
        """
        obj = self._objects.get(oid)
        if obj is None or obj.state not in (SPILLED, RESTORING) or self.spill is None:
            return None
        return self.spill.location(oid)

    def pin_sealed(self, client: int, oid: bytes) -> tuple[int, int] | None:
        """Pin a sealed object for ``client`` and return its ``(offset, size)``.

        The transfer shell pins an object this way while it sends its bytes
        to another node, and drops the pin with a ``Release`` afterwards.
        Returns None if the object is not here or not sealed yet.
        """
        obj = self._sealed(oid)
        if obj is None:
            return None
        self._pin(obj, client)
        return obj.alloc.offset, obj.size

    def watch(self, oid: bytes) -> None:
        """Report the next seal or free of ``oid`` through :meth:`take_notices` (once)."""
        self._watched.add(oid)

    def take_notices(self) -> list[tuple[str, bytes, int]]:
        """Watched objects sealed (``("sealed", oid, size)``) or freed (``("freed", oid, 0)``)."""
        notices, self._notices = self._notices, []
        return notices

    # ------------------------------------------------------------ spilling
    def take_io(self) -> list[SpillIo]:
        """Spill writes, restore reads and file deletions for the shell to do."""
        io, self._io = self._io, []
        return io

    def spill_done(self, file_id: int, ok: bool) -> list[Reply]:
        """The shell finished (or failed) writing spill file ``file_id``."""
        write = self._writes.pop(file_id)
        assert self.spill is not None
        if ok:
            self.spill.written(write)
        else:
            self.spill.failed(write)
            self.counters["spill_failures"] += 1
            self._events.append(("spill_failed", {"file_id": file_id, "bytes": write.nbytes}))
        for oid, _, size in write.objects:
            self._spilling_bytes -= size
            obj = self._objects[oid]
            obj.busy = False
            obj.on_disk = ok
            if obj.doomed:
                self._free(obj)
            elif ok and obj.pin_total == 0 and obj.hold_total > 0:
                self._drop_memory(obj)
            else:
                self._place(obj)  # pinned meanwhile (stays in memory) or released
        self._room_changed = True
        # After a failed write, do not plan the same writes again at once:
        # what still does not fit gets its answer (full) now.
        return self._serve_room_waiters(may_spill=ok)

    def restore_done(self, oid: bytes, ok: bool) -> list[Reply]:
        """The shell finished (or failed) reading ``oid`` back into its range."""
        obj = self._objects[oid]
        obj.busy = False
        if ok:
            obj.state = SEALED
            self.counters["restored_objects"] += 1
            self.counters["restored_bytes"] += obj.size
        else:
            self._events.append(("restore_failed", {"oid": oid.hex()}))
            self.allocator.free(obj.alloc)
            obj.alloc = None
            obj.state = SPILLED
        out: list[Reply] = []
        if obj.doomed:
            self._free(obj)
        else:
            self._place(obj)
        out += self._wake_restored(oid)
        self._room_changed = True
        return out + self._serve_room_waiters()

    # ------------------------------------------------------------ handlers
    def _step_create(self, client: int, req: Create) -> list[Reply]:
        if req.oid in self._objects:
            return _error(client, req.r, "exists", f"object {req.oid.hex()} already exists")
        alloc = self.allocator.allocate(req.size)
        if alloc is None:
            alloc = self._make_room(req.size)
        if alloc is None and req.wait and self.spill is not None:
            if any(w.oid == req.oid for w in self._room_waiters):
                return _error(client, req.r, "exists", f"object {req.oid.hex()} already exists")
            if self._room_waiters or self._spill_for(req.size):
                self._room_waiters.append(_RoomWaiter(client, req.r, req.oid, req.size, False))
                return []
        if alloc is None:
            return self._full(client, req)
        return self._created(client, req.r, req.oid, req.size, alloc)

    def _full(self, client: int, req: Create) -> list[Reply]:
        a = self.allocator
        held = self.spillable.evictable_bytes
        why = "spilling is off" if self.spill is None else \
            f"{held} held in memory that no longer fits on disk"
        msg = (f"object {req.oid.hex()} needs {req.size} bytes, capacity {self.capacity}, "
               f"in use {a.allocated} ({self.pinned_bytes} pinned, "
               f"{self.policy.evictable_bytes} evictable, {why}), largest free range "
               f"{a.largest_hole()}")
        self._events.append(("store_full", {"oid": req.oid.hex(), "size": req.size,
                                            "used": a.allocated,
                                            "pinned_bytes": self.pinned_bytes}))
        return _error(client, req.r, "full", msg)

    def _created(self, client: int, r: int, oid: bytes, size: int,
                 alloc: Allocation) -> list[Reply]:
        obj = _Object(oid, size, alloc, client)
        self._objects[oid] = obj
        self._clients[client].created.add(oid)
        self._pin(obj, client)
        return [Reply(client, {"r": r, "ok": True, "offset": alloc.offset})]

    def spill_for(self, size: int) -> None:
        """Start spilling so ``size`` bytes can fit (for a pull waiting for room).

        Writes already in flight count: calling this every loop turn while
        the pull waits starts no more than needed.
        """
        if self.spill is not None and self.spillable.evictable_bytes:
            self._spill_for(size)

    def _spill_for(self, size: int) -> bool:
        """Start spilling so ``size`` bytes can fit; True if writes are (now) in flight.

        Aims at the bytes missing beyond free, evictable and already
        spilling memory; when those add up but no hole is big enough
        (fragmentation), spills ``size`` more, oldest first.
        """
        spill = self.spill
        if spill is None:
            return False
        need = align_up(size)
        short = need - self.allocator.free_bytes - self.policy.evictable_bytes \
            - self._spilling_bytes
        if short <= 0:
            if self._spilling_bytes:
                return True
            short = need
        objects = self._objects
        candidates = ((oid, nbytes, objects[oid].on_disk) for oid, nbytes in
                      list(self.spillable.items()))
        plan = spill.plan(candidates, short)
        for oid in plan.drop:
            self._drop_memory(objects[oid])
        if plan.drop:
            self._room_changed = True
        for write in plan.writes:
            self._writes[write.file_id] = write
            ranges = []
            for oid, _, nbytes in write.objects:
                obj = objects[oid]
                obj.busy = True
                self.spillable.remove(oid)
                self._spilling_bytes += nbytes
                ranges.append((obj.alloc.offset, nbytes))
            self._io.append(SpillOut(write.file_id, tuple(ranges), write.nbytes))
        if plan.writes:
            self._events.append(("spill_started", {
                "files": len(plan.writes), "objects": sum(len(w.objects) for w in plan.writes),
                "bytes": sum(w.nbytes for w in plan.writes), "for_size": size}))
        return self._spilling_bytes > 0 or bool(plan.drop)

    def _drop_memory(self, obj: _Object) -> None:
        """A held object with a disk copy leaves memory: it is SPILLED now."""
        self.spillable.remove(obj.oid)
        self.policy.remove(obj.oid)
        self.allocator.free(obj.alloc)
        obj.alloc = None
        obj.state = SPILLED
        self.counters["spilled_objects"] += 1
        self.counters["spilled_bytes"] += obj.size
        self._room_changed = True

    def _serve_room_waiters(self, may_spill: bool = True) -> list[Reply]:
        """Give room to waiting creates and restores, oldest first; start more
        spilling for the first that still does not fit, or fail it if nothing can."""
        self._room_changed = False
        out: list[Reply] = []
        waiters = self._room_waiters
        while waiters:
            w = waiters[0]
            if w.restore:
                obj = self._objects.get(w.oid)
                if obj is None or obj.state != SPILLED:
                    waiters.pop(0)  # freed meanwhile, or restored by another path
                    continue
            elif w.client not in self._clients:
                waiters.pop(0)
                continue
            alloc = self.allocator.allocate(w.size)
            if alloc is None:
                alloc = self._make_room(w.size)
            if alloc is None:
                if self._spilling_bytes or (may_spill and self._spill_for(w.size)):
                    if alloc is None and self._spilling_bytes:
                        break  # wait for the writes in flight
                    continue  # memory was dropped at once: try again
                waiters.pop(0)
                if w.restore:
                    out += self._restore_failed(w.oid)
                else:
                    out += self._full(w.client, Create(w.r, w.oid, w.size))
                continue
            waiters.pop(0)
            if w.restore:
                self._start_restore(self._objects[w.oid], alloc)
            else:
                out += self._created(w.client, w.r, w.oid, w.size, alloc)
        return out

    def _restore(self, obj: _Object) -> None:
        """Bring a SPILLED object back (now, or once spilling made room)."""
        if any(w.restore and w.oid == obj.oid for w in self._room_waiters):
            return
        alloc = self.allocator.allocate(obj.size)
        if alloc is None:
            alloc = self._make_room(obj.size)
        if alloc is not None:
            self._start_restore(obj, alloc)
            return
        self._room_waiters.append(_RoomWaiter(0, 0, obj.oid, obj.size, True))
        self._room_changed = True  # tick() serves it: spills, or fails it

    def _start_restore(self, obj: _Object, alloc: Allocation) -> None:
        assert self.spill is not None
        where = self.spill.location(obj.oid)
        assert where is not None, "a SPILLED object has a written disk copy"
        obj.alloc = alloc
        obj.state = RESTORING
        obj.busy = True
        self._io.append(SpillRead(obj.oid, where[0], where[1], alloc.offset, obj.size))

    def _restore_failed(self, oid: bytes) -> list[Reply]:
        self._events.append(("restore_no_room", {"oid": oid.hex()}))
        return self._wake_restored(oid)

    def _wake_restored(self, oid: bytes) -> list[Reply]:
        """A restore ended (either way): gets waiting for it may answer now."""
        out: list[Reply] = []
        for gid in self._waiters.pop(oid, ()):
            pending = self._gets[gid]
            pending.missing.discard(oid)
            pending.restoring.discard(oid)
            if not pending.missing or (pending.expired and not pending.restoring):
                out.append(self._finish_get(gid))
        return out

    def _make_room(self, size: int) -> Allocation | None:
        """Evict LRU candidates until ``size`` fits; evict nothing if it never can."""
        need = align_up(size)
        if need > self.allocator.free_bytes + self.policy.evictable_bytes:
            return None
        if not self._fits_after_evicting_all(need):
            return None  # pinned objects split the arena: evicting would only lose cache
        while True:
            # Free bytes may be enough but scattered: then evict at least one
            # more object per round, oldest first, until a hole is big enough.
            choice = self.policy.choose(max(need - self.allocator.free_bytes, 1))
            if not choice.oids:
                return None
            freed = 0
            for oid in choice.oids:
                obj = self._objects[oid]
                freed += obj.alloc.size
                self._free(obj)
            self.num_evictions += len(choice.oids)
            self._events.append(("evicted", {"count": len(choice.oids), "bytes": freed,
                                             "for_size": size}))
            alloc = self.allocator.allocate(size)
            if alloc is not None:
                return alloc

    def _fits_after_evicting_all(self, need: int) -> bool:
        """Would a hole of ``need`` bytes exist if every candidate were evicted?

        Slow path only (an allocation already failed): merges the current holes
        with the candidates' ranges and looks for a long enough run.
        """
        ranges = self.allocator.holes
        ranges += [(o.alloc.offset, o.alloc.size) for o in map(self._objects.get, self.policy)
                   if o is not None]
        ranges.sort()
        run_start, run_end = -1, -1
        for off, size in ranges:
            if off != run_end:
                run_start = off
            run_end = off + size
            if run_end - run_start >= need:
                return True
        return False

    def _step_seal(self, client: int, req: Seal) -> list[Reply]:
        obj = self._objects.get(req.oid)
        if obj is None:
            return _error(client, req.r, "not_found", f"object {req.oid.hex()} does not exist")
        if obj.state == SEALED:
            return _error(client, req.r, "sealed", f"object {req.oid.hex()} is already sealed")
        if obj.creator != client:
            return _error(client, req.r, "not_creator",
                          f"object {req.oid.hex()} was created by another client")
        obj.state = SEALED
        self._clients[client].created.discard(req.oid)
        if self._watched and req.oid in self._watched:
            self._watched.discard(req.oid)
            self._notices.append(("sealed", req.oid, obj.size))
        if req.hold:
            self._hold(obj, client)
            if req.handoff:
                obj.handoff = client
        if obj.pin_total == 0:
            self._place(obj)
        out = [Reply(client, {"r": req.r, "ok": True})]
        for gid in self._waiters.pop(req.oid, ()):
            pending = self._gets[gid]
            pending.missing.discard(req.oid)
            if not pending.missing:
                out.append(self._finish_get(gid))
        return out

    def _step_abort(self, client: int, req: Abort) -> list[Reply]:
        obj = self._objects.get(req.oid)
        if obj is None:
            return _error(client, req.r, "not_found", f"object {req.oid.hex()} does not exist")
        if obj.state == SEALED:
            return _error(client, req.r, "sealed", f"object {req.oid.hex()} is already sealed")
        if obj.creator != client:
            return _error(client, req.r, "not_creator",
                          f"object {req.oid.hex()} was created by another client")
        self._free(obj)
        return [Reply(client, {"r": req.r, "ok": True})]

    def _step_get(self, client: int, req: Get, now: float) -> list[Reply]:
        self._next_gid += 1
        gid = self._next_gid
        missing = {oid for oid in req.oids if self._sealed(oid) is None}
        deadline = None if req.timeout_ms < 0 else now + req.timeout_ms / 1000.0
        pending = _PendingGet(gid, client, req.r, req.oids, deadline, missing, req.hold)
        self._gets[gid] = pending
        if missing and self.spill is not None:
            for oid in missing:
                obj = self._objects.get(oid)
                if obj is not None and obj.state in (SPILLED, RESTORING):
                    pending.restoring.add(oid)
                    if obj.state == SPILLED:
                        self._restore(obj)
        if not missing or (req.timeout_ms == 0 and not pending.restoring):
            return [self._finish_get(gid)]
        if req.timeout_ms == 0:
            pending.expired = True
            deadline = None
        self._clients[client].gets.add(gid)
        for oid in missing:
            self._waiters.setdefault(oid, set()).add(gid)
        if deadline is not None:
            heapq.heappush(self._deadlines, (deadline, gid))
        return []

    def _step_release(self, client: int, req: Release) -> None:
        c = self._clients[client]
        for oid in req.oids:
            if c.pins.get(oid, 0) > 0:
                self._unpin(self._objects[oid], client, 1)
            else:
                self._events.append(("bad_release", {"oid": oid.hex(), "client": client}))

    def _step_unhold(self, client: int, req: Unhold) -> None:
        c = self._clients[client]
        for oid in req.oids:
            if c.holds.get(oid, 0) > 0:
                self._unhold(self._objects[oid], client, 1)
            else:
                self._events.append(("bad_unhold", {"oid": oid.hex(), "client": client}))

    def _step_delete(self, client: int, req: Delete) -> list[Reply]:
        deleted = 0
        for oid in req.oids:
            obj = self._objects.get(oid)
            if obj is not None and obj.pin_total == 0:
                self._free(obj)
                deleted += 1
        return [Reply(client, {"r": req.r, "ok": True, "deleted": deleted})]

    # ------------------------------------------------------------ helpers
    def _sealed(self, oid: bytes) -> _Object | None:
        obj = self._objects.get(oid)
        return obj if obj is not None and obj.state == SEALED else None

    def _finish_get(self, gid: int) -> Reply:
        """Answer a get with what is sealed now, pinning each object returned."""
        pending = self._gets.pop(gid)
        self._forget_get(pending)
        objs: list[list[int] | None] = []
        for oid in pending.oids:
            obj = self._sealed(oid)
            if obj is None:
                objs.append(None)
            else:
                self._pin(obj, pending.client)
                if pending.hold:
                    self._hold(obj, pending.client)
                    if obj.handoff is not None and obj.handoff != pending.client:
                        # The owner holds its task's return now: the worker's goes.
                        if self._clients.get(obj.handoff) is not None and \
                                self._clients[obj.handoff].holds.get(oid, 0) > 0:
                            self._unhold(obj, obj.handoff, 1)
                        obj.handoff = None
                objs.append([obj.alloc.offset, obj.size])
        return Reply(pending.client, {"r": pending.r, "ok": True, "objs": objs})

    def _cancel_get(self, gid: int) -> None:
        pending = self._gets.pop(gid, None)
        if pending is not None:
            self._forget_get(pending)

    def _forget_get(self, pending: _PendingGet) -> None:
        c = self._clients.get(pending.client)
        if c is not None:
            c.gets.discard(pending.gid)
        for oid in pending.missing:
            waiters = self._waiters.get(oid)
            if waiters is not None:
                waiters.discard(pending.gid)
                if not waiters:
                    del self._waiters[oid]

    def _place(self, obj: _Object) -> None:
        """Put an unpinned object on the list its holds call for (cache or spillable)."""
        oid = obj.oid
        if obj.state != SEALED or obj.pin_total or obj.busy:
            self.policy.remove(oid)
            self.spillable.remove(oid)
        elif obj.hold_total:
            # Held: spillable, or (spilling off) kept in memory like a pin.
            self.policy.remove(oid)
            if self.spill is not None:
                self.spillable.add(oid, obj.alloc.size)
        else:
            self.spillable.remove(oid)
            self.policy.add(oid, obj.alloc.size)

    def _hold(self, obj: _Object, client: int) -> None:
        if obj.holds is None:
            obj.holds = {}
        obj.holds[client] = obj.holds.get(client, 0) + 1
        obj.hold_total += 1
        c = self._clients[client]
        c.holds[obj.oid] = c.holds.get(obj.oid, 0) + 1
        if obj.hold_total == 1 and obj.pin_total == 0:
            self._place(obj)

    def _unhold(self, obj: _Object, client: int, n: int) -> None:
        holds = obj.holds
        assert holds is not None
        left = holds[client] - n
        if left:
            holds[client] = left
        else:
            del holds[client]
        c = self._clients.get(client)
        if c is not None:
            cleft = c.holds.get(obj.oid, 0) - n
            if cleft > 0:
                c.holds[obj.oid] = cleft
            else:
                c.holds.pop(obj.oid, None)
        obj.hold_total -= n
        if obj.hold_total == 0:
            if obj.state == SPILLED:
                # Nobody keeps it: a disk-only cache entry would never be
                # evicted, so it goes now (an in-memory one would go by LRU).
                self.num_evictions += 1
                self._free(obj)
            elif obj.pin_total == 0:
                self._place(obj)
                self._room_changed = True

    def _pin(self, obj: _Object, client: int) -> None:
        if obj.pin_total == 0:
            self.pinned_bytes += obj.alloc.size
            self.policy.remove(obj.oid)
            if obj.hold_total:
                self.spillable.remove(obj.oid)
        obj.pin_total += 1
        obj.pins[client] = obj.pins.get(client, 0) + 1
        c = self._clients[client]
        c.pins[obj.oid] = c.pins.get(obj.oid, 0) + 1

    def _unpin(self, obj: _Object, client: int, n: int) -> None:
        left = obj.pins[client] - n
        if left:
            obj.pins[client] = left
        else:
            del obj.pins[client]
        c = self._clients.get(client)
        if c is not None:
            cleft = c.pins.get(obj.oid, 0) - n
            if cleft > 0:
                c.pins[obj.oid] = cleft
            else:
                c.pins.pop(obj.oid, None)
        obj.pin_total -= n
        if obj.pin_total == 0:
            self.pinned_bytes -= obj.alloc.size
            if obj.state == SEALED:
                self._place(obj)
                self._room_changed = True

    def _free(self, obj: _Object) -> None:
        """Remove an object and return its range; drops any pins and holds it still has.

        A busy object (its spill write or restore in flight) is only marked:
        the I/O's completion frees it.
        """
        if obj.busy:
            obj.doomed = True
            return
        del self._objects[obj.oid]
        self.policy.remove(obj.oid)
        self.spillable.remove(obj.oid)
        self._room_changed = True
        if obj.holds:
            for client in obj.holds:
                c = self._clients.get(client)
                if c is not None:
                    c.holds.pop(obj.oid, None)
        if obj.on_disk and self.spill is not None:
            fid = self.spill.forget(obj.oid)
            if fid is not None:
                self._io.append(SpillDelete(fid))
        if self._watched and obj.oid in self._watched:
            self._watched.discard(obj.oid)
            self._notices.append(("freed", obj.oid, 0))
        if obj.pin_total:
            self.pinned_bytes -= obj.alloc.size
            for client in obj.pins:
                c = self._clients.get(client)
                if c is not None:
                    c.pins.pop(obj.oid, None)
        creator = self._clients.get(obj.creator)
        if creator is not None:
            creator.created.discard(obj.oid)
        if obj.alloc is not None:
            self.allocator.free(obj.alloc)
