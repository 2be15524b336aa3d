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
)

UNSEALED = "UNSEALED"
SEALED = "SEALED"


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
    alloc: Allocation
    creator: int
    state: str = UNSEALED
    pins: dict[int, int] = field(default_factory=dict)  # client -> pin count
    pin_total: int = 0


@dataclass(slots=True)
class _Client:
    cid: int
    pid: int = 0
    name: str = ""
    pins: dict[bytes, int] = field(default_factory=dict)  # oid -> pin count
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
    """

    def __init__(self, capacity: int, arena_size: int | None = None) -> None:
        self.allocator = Allocator(capacity)
        self.capacity = self.allocator.limit
        self.arena_size = arena_size if arena_size is not None else self.capacity
        self.policy = LruPolicy()
        self.num_evictions = 0
        self.pinned_bytes = 0
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
                present = [self._sealed(oid) is not None for oid in req.oids]
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
        """Answer every pending get whose deadline is at or before ``now``."""
        out: list[Reply] = []
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, gid = heapq.heappop(heap)
            if gid in self._gets:
                out.append(self._finish_get(gid))
        return out

    def next_deadline(self) -> float | None:
        """Earliest deadline of a pending get, so the shell knows how long to sleep."""
        heap = self._deadlines
        while heap and heap[0][1] not in self._gets:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "used": self.allocator.allocated,
                "pinned_bytes": self.pinned_bytes, "num_objects": len(self._objects),
                "num_evictions": self.num_evictions}

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
        """``(state, size)`` of an object, or None: lets a pull see what is here already."""
        obj = self._objects.get(oid)
        return None if obj is None else (obj.state, obj.size)

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

    # ------------------------------------------------------------ handlers
    def _step_create(self, client: int, req: Create) -> list[Reply]:
        if req.oid in self._objects:
            return _error(client, req.r, "exists", f"object {req.oid.hex()} already exists")
        alloc = self.allocator.allocate(req.size)
        if alloc is None:
            alloc = self._make_room(req.size)
        if alloc is None:
            a = self.allocator
            msg = (f"object {req.oid.hex()} needs {req.size} bytes, capacity {self.capacity}, "
                   f"in use {a.allocated} ({self.pinned_bytes} pinned, "
                   f"{self.policy.evictable_bytes} evictable), largest free range "
                   f"{a.largest_hole()}")
            self._events.append(("store_full", {"oid": req.oid.hex(), "size": req.size,
                                                "used": a.allocated,
                                                "pinned_bytes": self.pinned_bytes}))
            return _error(client, req.r, "full", msg)
        obj = _Object(req.oid, req.size, alloc, client)
        self._objects[req.oid] = obj
        self._clients[client].created.add(req.oid)
        self._pin(obj, client)
        return [Reply(client, {"r": req.r, "ok": True, "offset": alloc.offset})]

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
        if obj.pin_total == 0:
            self.policy.add(obj.oid, obj.alloc.size)
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
        pending = _PendingGet(gid, client, req.r, req.oids, deadline, missing)
        self._gets[gid] = pending
        if not missing or req.timeout_ms == 0:
            return [self._finish_get(gid)]
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

    def _pin(self, obj: _Object, client: int) -> None:
        if obj.pin_total == 0:
            self.pinned_bytes += obj.alloc.size
            self.policy.remove(obj.oid)
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
                self.policy.add(obj.oid, obj.alloc.size)

    def _free(self, obj: _Object) -> None:
        """Remove an object and return its range; drops any pins it still has."""
        del self._objects[obj.oid]
        self.policy.remove(obj.oid)
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
        self.allocator.free(obj.alloc)
