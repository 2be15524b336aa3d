"""Owned objects and their reference counts: what to keep, promote or free.

Theory of operation
-------------------
*Ownership.* The process that creates an ObjectRef (by ``put`` or by
submitting a task) owns it. Each owned object has an :class:`Entry` here:
PENDING until its task replies, then READY with the value inline (``wire``,
small values) or as a pinned, zero-copy view of the node's shared-memory
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


class Entry:
    """An owned object: pending until its task replies, then inline or stored."""

    __slots__ = ("state", "wire", "buf", "escaped", "waiters", "count", "loc", "loc_size")

    def __init__(self) -> None:
        self.state = PENDING
        self.wire: list[Any] | None = None  # [kind, meta, [bufs]] when inline
        self.buf: Any = None  # pinned pyarrow Buffer when in stored
        self.loc = ""  # another node's store that holds it (a remote task's big return)
        self.loc_size = 0  # its size there, for lease locality
        self.escaped = False
        self.waiters: list[Any] | None = None  # tasks waiting for this value
        self.count = 0


class ReferenceTable:
    """This process's owned objects, and the location records gcsd is owed."""

    def __init__(self, node_id: bytes, pid: int, store_address: str = "") -> None:
        self.node_id = node_id
        self.pid = pid
        self.store_address = store_address  # our stored, as other nodes reach it
        self.owned: dict[bytes, Entry] = {}
        # object id -> latest location row, sent to gcsd's objects table in batches
        self.object_events: dict[bytes, dict] = {}

    # ---------------------------------------------------------------- counts
    def add(self, oid: bytes) -> Entry:
        """A new owned object (its first ObjectRef counts itself on creation)."""
        entry = self.owned[oid] = Entry()
        return entry

    def incref(self, oid: bytes) -> None:
        """Count a new ObjectRef handle (set as ``object_ref._incref``)."""
        entry = self.owned.get(oid)
        if entry is not None:
            entry.count += 1

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
                continue
            entry.count -= 1
            if entry.count <= 0 and not (entry.state == PENDING and (entry.escaped or entry.waiters)):
                if (entry.state == READY or oid[:16] not in pending_tasks) and self.drop(oid, entry):
                    to_free.append(oid)
        return to_free

    def drop(self, oid: bytes, entry: Entry) -> bool:
        """Forget an owned object nobody here references any more.

        True if its stored copy should be freed now: one that never left this
        process is freed at once, so its (already faulted-in) memory is
        reused by the next large put; an escaped one may have borrowers.
        """
        del self.owned[oid]
        if entry.buf is None:
            return False
        entry.buf = None
        if entry.escaped:
            return False
        self.object_events[oid] = {"node_id": self.node_id, "state": "FREED"}
        return True

    def unreferenced(self, oid: bytes, entry: Entry) -> bool:
        """After completion: nothing here holds it and nobody outside can ask."""
        return entry.count <= 0 and not entry.escaped and oid in self.owned

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
        fails with it)."""
        if not task.deps:
            return None
        resolved = []
        owned = self.owned
        for slot, ref in task.deps:
            entry = owned.get(ref._id)
            if entry is None or entry.buf is not None or entry.loc:
                loc = entry.loc if entry is not None and entry.loc else self.store_address
                resolved.append([slot, "s", ref._id, ref.owner_pid, loc])
                continue
            if entry.wire[0] == serialization.KIND_ERROR:
                return entry.wire
            resolved.append([slot, "v", entry.wire])
        task.msg["deps"] = resolved
        return None
