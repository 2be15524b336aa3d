"""Owned objects and their reference counts: what to keep, promote or free.

Theory of operation
-------------------
*Ownership.* The process that creates an ObjectRef (by ``put`` or by
submitting a task) owns it. Each owned object has an :class:`Entry` here:
PENDING until its task replies, then READY with the value inline (``wire``,
small values) or as a hold on it in the node's shared-memory
store (``buf``).

*Escape.* An ObjectRef that leaves the process inside another value (a
container argument, a put value, a return value) "escapes": other processes
may now ask stored for it, so the owner must copy the value there
(promotion), at once if it is ready or when it becomes ready.

*Counting.* ObjectRef handles are counted per process. Creation counts at
once (``incref``); ``ObjectRef.__del__`` may run anywhere, so it only queues
the id and the core worker applies the decrements at safe points
(:meth:`ReferenceTable.release`). An entry whose count reaches zero is
forgotten, unless it is still pending and something outside (an escaped
copy, a task waiting for it) will need its value. A stored copy that never
left the process is freed at once; an escaped one may have borrowers and
stays cached in stored until evicted.

*Dependencies.* A task whose owned arguments are pending waits on their
entries (``waiters``); completing an entry hands those tasks back. A ready
argument travels in the task message by value if it is small and inline
here, otherwise by id with the address of the store that holds it.

*Elsewhere.* A big return made by a task on another node stays in that
node's store (``loc``) until someone here gets it; the owner then pulls it.

*Borrowers (Ray 2's protocol, simplified).* A process that holds a ref it
does not own is a *borrower*; it counts its handles in ``borrowed``. A task
(or actor call) that ends while its process still holds refs it got during
the task lists them in its reply (:meth:`take_borrow_report`), with the
borrower's key ``(store address, pid)``; a reply's list also carries the
borrows its own sub-tasks reported, so nested borrowers reach the owner in
order with the reply that would otherwise let the object go. The owner
counts each borrower (:meth:`add_borrower`) and keeps the object while any
is left; a borrower tells the owner when its last handle goes
(:meth:`take_removals`, sent through the owner's raylet). A worker that
returns refs it owns registers its caller as their borrower at once, and the
reply names them, so the caller reports their removal too. Refs nested in a
value the owner stored (a ``put``, a return) are held by that value's entry
(``contained``) while it lives. When nothing holds an object any more, every
copy is freed, escaped or not.

Pure: this module decides, the core worker does the I/O its answers call for
(writing to stored, freeing), always under the core worker's one lock.
"""

from __future__ import annotations

import collections
from collections.abc import Container
from typing import Any

from libclient import serialization
from libclient.object_ref import ObjectRef

PENDING = 0
READY = 1
RELEASED = 2  # value freed; the entry stays because lineage names it

# resolve_args' answer when an argument went back to pending (it is being
# rebuilt): the caller makes the task wait for it again.
NOT_READY: list = ["not ready"]


class Entry:
    """An owned object: pending until its task replies, then inline or stored."""

    __slots__ = ("state", "wire", "buf", "escaped", "waiters", "count", "loc", "loc_size",
                 "borrowers", "contained", "copies", "lineage")

    def __init__(self) -> None:
        self.state = PENDING
        self.wire: list[Any] | None = None  # [kind, meta, [bufs]] when inline
        self.buf: Any = None  # StoredObject (our hold in stored) when in stored
        self.loc = ""  # another node's store that holds it (a remote task's big return)
        self.loc_size = 0  # its size there, for lease locality
        self.escaped = False
        self.waiters: list[Any] | None = None  # tasks waiting for this value
        self.count = 0
        # borrower key (store address, pid) -> registrations not yet removed
        self.borrowers: dict[tuple[str, int], int] | None = None
        self.contained: list[ObjectRef] | None = None  # refs nested in the value
        self.copies: set[str] | None = None  # other nodes' stores our tasks pulled it to
        self.lineage = 0  # kept task specs that name it as an argument


class Borrowed:
    """A ref this process holds but does not own."""

    __slots__ = ("count", "owner_pid", "owner_addr", "registered")

    def __init__(self, owner_pid: int, owner_addr: str) -> None:
        self.count = 0
        self.owner_pid = owner_pid
        self.owner_addr = owner_addr
        self.registered = 0  # times the owner was told we borrow it, since last removal


class ReferenceTable:
    """This process's owned objects, and the location records gcsd is owed."""

    def __init__(self, node_id: bytes, pid: int, store_address: str = "") -> None:
        self.node_id = node_id
        self.pid = pid
        self.store_address = store_address  # our stored, as other nodes reach it
        self.owned: dict[bytes, Entry] = {}
        self.borrowed: dict[bytes, Borrowed] = {}
        self.new_borrows: list[bytes] = []  # borrowed since the last report
        # (owner store address, owner pid) -> [[oid, registrations], ...] to tell it
        self.removals: dict[tuple[str, int], list[list]] = {}
        # borrows reported by our sub-tasks for objects we do not own, to pass up
        self.relayed: list[list] = []
        # another node's store -> ids of our objects to free there
        self.remote_frees: dict[str, list[bytes]] = {}
        self.dropped: list[bytes] = []  # forgotten since the caller last looked (lineage)
        # object id -> latest location row, sent to gcsd's objects table in batches
        self.object_events: dict[bytes, dict] = {}

    # ---------------------------------------------------------------- counts
    def add(self, oid: bytes) -> Entry:
        """A new owned object (its first ObjectRef counts itself on creation)."""
        entry = self.owned[oid] = Entry()
        return entry

    def incref(self, oid: bytes, owner_pid: int = 0, owner_addr: str = "") -> None:
        """Count a new ObjectRef handle (set as ``object_ref._incref``)."""
        entry = self.owned.get(oid)
        if entry is not None:
            entry.count += 1
            return
        if not owner_pid or (owner_pid == self.pid and owner_addr == self.store_address):
            return  # ours but already forgotten, or an anonymous ref: nothing to count
        b = self.borrowed.get(oid)
        if b is None:
            b = self.borrowed[oid] = Borrowed(owner_pid, owner_addr)
            self.new_borrows.append(oid)
        b.count += 1

    def release(self, released: collections.deque[bytes],
                pending_tasks: Container[bytes]) -> list[bytes]:
        """Apply queued ``ObjectRef.__del__`` decrements.

        Returns the ids whose stored copy the caller must free. A pending
        entry whose task is still running stays (its reply would find no
        entry otherwise); it goes when the reply completes it.
        """
        to_free: list[bytes] = []
        owned = self.owned
        while released:
            try:
                oid = released.popleft()
            except IndexError:  # another thread drained it meanwhile
                break
            entry = owned.get(oid)
            if entry is None:
                b = self.borrowed.get(oid)
                if b is not None:
                    b.count -= 1
                    if b.count <= 0:
                        self._unborrow(oid, b)
                continue
            entry.count -= 1
            if entry.count <= 0 and not entry.borrowers and not (
                    entry.state == PENDING and (entry.escaped or entry.waiters)):
                if (entry.state == READY or oid[:16] not in pending_tasks) and self.drop(oid, entry):
                    to_free.append(oid)
        return to_free

    def _unborrow(self, oid: bytes, b: Borrowed) -> None:
        del self.borrowed[oid]
        if b.registered:
            self.removals.setdefault((b.owner_addr, b.owner_pid), []).append(
                [oid, b.registered])

    # ------------------------------------------------------------- borrowers
    def take_borrow_report(self, me: tuple[str, int]) -> list[list] | None:
        """At the end of a task: the refs this process got since the last report
        and still holds, plus the borrows our sub-tasks reported (relayed), as
        ``[oid, owner pid, owner store, borrower store, borrower pid]`` items.
        The caller's reply carries them to whoever passed us the refs."""
        out = self.relayed
        self.relayed = []
        if self.new_borrows:
            borrowed = self.borrowed
            for oid in self.new_borrows:
                b = borrowed.get(oid)
                if b is not None and b.count > 0:
                    b.registered += 1
                    out.append([oid, b.owner_pid, b.owner_addr, me[0], me[1]])
            self.new_borrows = []
        return out or None

    def add_borrower(self, item: list, relay: bool) -> bool:
        """A reply (or an owner-bound notice) says ``item``'s borrower holds it.

        Ours: count the borrower. Not ours: pass it on, in our own next
        report if ``relay`` (we run a task for someone), else the caller sends
        it to the owner. Returns True if the caller must send it itself.
        """
        oid, _opid, _oaddr, baddr, bpid = item
        entry = self.owned.get(oid)
        if entry is not None:
            if entry.borrowers is None:
                entry.borrowers = {}
            key = (baddr, bpid)
            entry.borrowers[key] = entry.borrowers.get(key, 0) + 1
            return False
        if relay:
            self.relayed.append(item)
            return False
        return True

    def remove_borrower(self, oid: bytes, key: tuple[str, int], n: int) -> bool:
        """A borrower let go of ``n`` registrations. True if the object can now
        be dropped (the caller then drops it, freeing every copy)."""
        entry = self.owned.get(oid)
        if entry is None or not entry.borrowers:
            return False
        left = entry.borrowers.get(key, 0) - n
        if left > 0:
            entry.borrowers[key] = left
            return False
        entry.borrowers.pop(key, None)
        return not entry.borrowers and entry.count <= 0 and entry.state == READY

    def drop_borrowers_where(self, dead: Any) -> list[bytes]:
        """Forget borrowers ``dead(key)`` says are gone; return the ids that can go."""
        out = []
        for oid, entry in list(self.owned.items()):
            if entry.borrowers:
                for key in [k for k in entry.borrowers if dead(k)]:
                    del entry.borrowers[key]
                if not entry.borrowers and entry.count <= 0 and entry.state == READY:
                    out.append(oid)
        return out

    def borrower_keys(self) -> set[tuple[str, int]]:
        return {k for e in self.owned.values() if e.borrowers for k in e.borrowers}

    def registered_by_caller(self, oid: bytes, owner_pid: int, owner_addr: str) -> None:
        """A reply says its worker registered us as the borrower of ``oid``
        (a ref it owns, nested in its return value)."""
        if oid in self.owned:
            return
        b = self.borrowed.get(oid)
        if b is None:
            b = self.borrowed[oid] = Borrowed(owner_pid, owner_addr)
        b.registered += 1

    def pulled(self, oids: list, at: str) -> None:
        """A task's reply says it pulled these (ours) to the store ``at``."""
        for oid in oids:
            entry = self.owned.get(oid) if isinstance(oid, bytes) else None
            if entry is not None and at != self.store_address:
                if entry.copies is None:
                    entry.copies = set()
                entry.copies.add(at)

    def take_removals(self) -> dict[tuple[str, int], list[list]]:
        out, self.removals = self.removals, {}
        return out

    def drop(self, oid: bytes, entry: Entry) -> bool:
        """Forget an owned object nobody here references any more.

        True if its stored copies should be freed now, so the (already
        faulted-in) memory is reused by the next large put. Borrowers were
        waited for before this is called.
        """
        if entry.lineage > 0:
            # A kept task spec names it: free the value, keep the entry (and
            # its own lineage) so the spec can still be run again.
            entry.state = RELEASED
        else:
            del self.owned[oid]
            self.dropped.append(oid)
        entry.contained = None  # refs nested in the value: released with it
        if entry.loc:  # the copy a task left on its node: freed there too
            self.remote_frees.setdefault(entry.loc, []).append(oid)
        for addr in entry.copies or ():  # and the copies our tasks pulled
            self.remote_frees.setdefault(addr, []).append(oid)
        entry.loc = ""
        entry.copies = None
        if entry.buf is None:
            return False
        entry.buf = None
        self.object_events[oid] = {"node_id": self.node_id, "state": "FREED"}
        return True

    def hold_for_lineage(self, oids: list[bytes]) -> None:
        for oid in oids:
            entry = self.owned.get(oid)
            if entry is not None:
                entry.lineage += 1

    def unhold_for_lineage(self, oids: list[bytes]) -> list[bytes]:
        """A kept spec went: drop the entries it alone kept; return those the
        caller must free in stored."""
        to_free = []
        for oid in oids:
            entry = self.owned.get(oid)
            if entry is None:
                continue
            entry.lineage -= 1
            if entry.lineage <= 0 and entry.count <= 0 and not entry.borrowers \
                    and entry.state != PENDING:
                if entry.state == RELEASED:
                    del self.owned[oid]
                    self.dropped.append(oid)
                elif self.drop(oid, entry):
                    to_free.append(oid)
        return to_free

    def lost(self, oid: bytes) -> Entry | None:
        """Every copy of owned ``oid`` is gone: make it pending again for a
        rebuild (the caller resubmits its task). None if it is not ours."""
        entry = self.owned.get(oid)
        if entry is None:
            return None
        entry.state = PENDING
        entry.buf = None
        entry.wire = None
        entry.loc = ""
        entry.copies = None
        return entry

    def unreferenced(self, oid: bytes, entry: Entry) -> bool:
        """After completion: nothing here holds it and nobody outside can ask."""
        return entry.count <= 0 and not entry.borrowers and oid in self.owned \
            and entry.state != RELEASED

    def stored(self, oid: bytes, size: int) -> None:
        """Record that ``oid`` is now in this node's stored (for gcsd)."""
        self.object_events[oid] = {"node_id": self.node_id, "size": size,
                                   "state": "IN_STORE", "owner_pid": self.pid}

    def take_object_events(self) -> dict[bytes, dict]:
        events, self.object_events = self.object_events, {}
        return events

    # ---------------------------------------------------------------- escape
    def escape(self, refs: list[ObjectRef]) -> list[tuple[bytes, Entry]]:
        """These refs leave the process inside a value: return the owned,
        ready ones the caller must promote now (inline ones are copied to
        stored, remote ones pulled here; pending ones are promoted when they
        complete). Borrowed refs are in a store already."""
        promote = []
        owned = self.owned
        for ref in refs:
            entry = owned.get(ref._id)
            if entry is None:
                continue
            entry.escaped = True
            if entry.state == READY and entry.buf is None and (entry.wire is not None
                                                                or entry.loc):
                promote.append((ref._id, entry))
        return promote

    # ---------------------------------------------------------- dependencies
    def wait_for_args(self, task: Any) -> int:
        """Make ``task`` wait on each of its owned arguments still pending;
        return how many it waits for (also added to ``task.unresolved``)."""
        n = 0
        owned = self.owned
        for _slot, ref in task.deps:
            entry = owned.get(ref._id)
            if entry is not None and entry.state != READY:
                if entry.waiters is None:
                    entry.waiters = []
                entry.waiters.append(task)
                n += 1
        task.unresolved += n
        return n

    def complete(self, entry: Entry) -> tuple[bool, list[Any] | None]:
        """A pending entry's value arrived (``wire`` or ``buf`` set by the caller).

        Returns (promote it first?, the tasks that waited for it). The caller
        promotes before it releases the waiters, so they see the stored copy.
        """
        entry.state = READY
        waiters = entry.waiters
        entry.waiters = None
        return entry.escaped, waiters

    def arg_bytes(self, task: Any) -> dict[str, int]:
        """Bytes of the task's by-id arguments per store address (ours or another
        node's), as far as this owner knows them: the locality of a lease."""
        out: dict[str, int] = {}
        for _slot, ref in task.deps:
            entry = self.owned.get(ref._id)
            if entry is None:
                continue
            if entry.buf is not None:
                out[self.store_address] = out.get(self.store_address, 0) + entry.buf.size
            elif entry.loc:
                out[entry.loc] = out.get(entry.loc, 0) + entry.loc_size
        return out

    def resolve_args(self, task: Any) -> list | None:
        """Put each argument into the task message: an owned inline value by
        value, a stored or borrowed one by id, with the address of the store
        that holds it (a worker on another node pulls it from there first).
        Returns the error wire of a failed argument instead (the task then
        fails with it), or NOT_READY if one is pending again (lost and being
        rebuilt since the task was queued)."""
        if not task.deps:
            return None
        resolved = []
        owned = self.owned
        for slot, ref in task.deps:
            entry = owned.get(ref._id)
            if entry is not None and entry.state != READY:
                return NOT_READY
            if entry is None or entry.buf is not None or entry.loc:
                loc = entry.loc if entry is not None and entry.loc else self.store_address
                resolved.append([slot, "s", ref._id, ref.owner_pid, loc])
                continue
            if entry.wire[0] == serialization.KIND_ERROR:
                return entry.wire
            resolved.append([slot, "v", entry.wire])
        task.msg["deps"] = resolved
        return None
