"""This process's side of the node's shared-memory object store (stored).

Theory of operation
-------------------
Large values do not stay in the owner's memory: a large ``put`` and a
worker's large return are written to stored (``create``, a copy into this
process's own mapping of the arena, ``seal``) and the owner keeps a *hold*
on them (``Entry.buf`` is a :class:`~libclient.store_client.StoredObject`),
not a pin: stored may spill a held object to disk while nothing maps it,
and reading it again (:meth:`StoreProvider.read`) restores it. Values
returned by ``get`` map the arena and pin the object while they live. An
owned inline value whose ref escapes is copied there too (promotion), so any
process on the node can read it. The owner holds a large task return as
soon as the reply says it is there, before eviction can take it. Each
write is recorded as a location row for gcsd's ``objects`` table (via the
reference table, batched with the task rows).

A borrower reads stored. If the object is not sealed yet it waits on a
second store connection, so a long wait never holds the connection that
puts, gets and releases use, and gives up with OwnerDiedError if the
owner's process dies before the object appears.

Objects on another node's store (a task argument passed by id, a remote
task's big return) are pulled into ours first, on that second connection
too: stored copies them over TCP from the store address given. A borrowed
ref carries its owner's store address; a borrower on another node pulls
from there, retrying until the owner has stored it, and gives up with
OwnerDiedError when gcsd says that node died. An escaping owned value that
lives on a remote node is pulled to the owner's node first (synchronously).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from libclient import serialization
from libclient.core.references import Entry, ReferenceTable
from libclient.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    ObjectStoreFullError,
    OwnerDiedError,
)
from libclient.object_ref import ObjectRef
from libclient.protocol import ProtocolError

if TYPE_CHECKING:
    from libclient.store_client import StoreClient, StoredObject


class StoreProvider:
    """Writes, pins and reads objects in stored for the core worker."""

    def __init__(self, socket_path: str, name: str, *, pid: int, lock: threading.RLock,
                 refs: ReferenceTable, gcs: Any, address: str,
                 blocked: Callable[[bool], None]) -> None:
        # Imported here, not at module level: store_client brings in pyarrow,
        # which would double the time ``import libclient`` takes (a worker
        # then registers with its raylet before paying for it, as before).
        from libclient.store_client import StoreClient

        self.socket_path = socket_path
        self.address = address  # our stored, as other nodes reach it (for pulls)
        self.client = StoreClient(socket_path, name=name)
        self._pid = pid
        self._lock = lock
        self._refs = refs
        self._gcs = gcs
        # blocked(True/False) brackets a long wait, so a worker lends its CPU out
        self._blocked = blocked
        self._wait_client: StoreClient | None = None  # second connection for long waits
        self._freer: Any = None  # RemoteFreer, made on first use
        self._prefetcher: Any = None  # Prefetcher, made on first use
        # (store address, pid) -> is that process alive? Set by the core worker.
        self.owner_alive: Callable[[str, int], bool] | None = None

    def write(self, oid: bytes, ser: serialization.Serialized,
              handoff: bool = False) -> StoredObject:
        """Copy a serialized value into stored; return the hold on it.

        ``handoff``: a task's return, written by the worker for its owner;
        the worker's hold passes to the owner when the owner holds it.
        """
        size = ser.store_size()
        obj = self.client.write(oid, size, ser.write_into, handoff)
        with self._lock:
            self._refs.stored(oid, size)
        return obj

    @staticmethod
    def read(obj: StoredObject) -> tuple[int, Any]:
        """Deserialize a held object (zero-copy; restored first if it was spilled)."""
        return serialization.deserialize_buffer(obj.view())

    def promote(self, oid: bytes, entry: Entry) -> None:
        """Make an owned object readable by other processes (it escaped): copy
        an inline value to stored, or pull a remote one to this node."""
        if entry.buf is None and entry.loc:
            # Borrowers look for it on the owner's node: bring it here first.
            # (Blocks this thread for the transfer; a later issue makes it async.)
            entry.buf = self.pull_and_pin(oid, entry.loc, None)
            return
        if entry.buf is not None or entry.wire is None:
            return
        kind, meta, bufs = entry.wire
        ser = serialization.Serialized(kind, meta, bufs, [])
        try:
            entry.buf = self.write(oid, ser)
        except ObjectStoreFullError:
            raise
        except Exception as exc:
            if "exists" not in str(exc):
                raise

    def pin(self, oid: bytes) -> StoredObject | None:
        """Hold a task return the worker wrote; None if it is gone."""
        try:
            return self.client.hold(oid)
        except (ConnectionError, OSError, ProtocolError):
            return None  # stored is gone: the value is lost

    def read_borrowed(self, ref: ObjectRef, deadline: float | None) -> tuple[int, Any]:
        """Read an object someone else owns, waiting for it to appear."""
        (buf,) = self.client.get([ref._id], timeout=0)
        if buf is None and ref.owner_addr and ref.owner_addr != self.address:
            self._pull_from_owner(ref, deadline)
            (buf,) = self.client.get([ref._id], timeout=0)
        if buf is None:
            buf = self._wait(ref, deadline)
        return serialization.deserialize_buffer(buf)

    def _pull_from_owner(self, ref: ObjectRef, deadline: float | None) -> None:
        """Pull a borrowed object from its owner's node, waiting until the owner
        has stored it; give up when gcsd says that node died."""
        next_check = time.monotonic() + 2.0
        while True:
            try:
                step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if step <= 0:
                    raise GetTimeoutError(f"get of {ref.hex()} timed out")
                self.fetch_to_node(ref._id, ref.owner_addr, time.monotonic() + step)
                return
            except (ObjectLostError, GetTimeoutError):
                if deadline is not None and time.monotonic() >= deadline:
                    raise GetTimeoutError(f"get of {ref.hex()} timed out") from None
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 2.0
                if not self._store_address_alive(ref.owner_addr):
                    raise OwnerDiedError(f"object {ref.hex()} was lost: its owner's node "
                                         f"({ref.owner_addr}) died")
                if ref.owner_pid and self.owner_alive is not None \
                        and not self.owner_alive(ref.owner_addr, ref.owner_pid):
                    raise OwnerDiedError(f"object {ref.hex()} was lost: its owner (pid "
                                         f"{ref.owner_pid} on {ref.owner_addr}) exited")
            time.sleep(0.05)

    def _store_address_alive(self, address: str) -> bool:
        try:
            nodes = self._gcs.get_nodes()
        except Exception:
            return True  # cannot tell: keep waiting
        return any(n.get("store_address") == address and n.get("state") == "ALIVE"
                   for n in nodes)

    def _waiter(self) -> StoreClient:
        # Waits and pulls block; keep them off the connection that gets,
        # puts and releases use.
        if self._wait_client is None:
            from libclient.store_client import StoreClient

            self._wait_client = StoreClient(self.socket_path, name=f"wait-{self._pid}")
        return self._wait_client

    def _wait(self, ref: ObjectRef, deadline: float | None) -> Any:
        waiter = self._waiter()
        blocked = self._blocked
        blocked(True)
        try:
            while True:
                step = 0.2
                if deadline is not None:
                    step = min(step, deadline - time.monotonic())
                    if step <= 0:
                        raise GetTimeoutError(f"get of {ref.hex()} timed out")
                (buf,) = waiter.get([ref._id], timeout=step)
                if buf is not None:
                    return buf
                local_owner = not ref.owner_addr or ref.owner_addr == self.address
                if ref.owner_pid and local_owner and not _pid_alive(ref.owner_pid):
                    (buf,) = waiter.get([ref._id], timeout=0)
                    if buf is not None:
                        return buf
                    raise OwnerDiedError(
                        f"object {ref.hex()} was lost: its owner (pid {ref.owner_pid}) exited "
                        "before the object was stored")
        finally:
            blocked(False)

    def fetch_to_node(self, oid: bytes, source: str, deadline: float | None) -> None:
        """Bring an object held by another node's store (``source``) into ours."""
        if not source or source == self.address:
            return
        if self.client.contains([oid])[0]:
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        self._blocked(True)
        try:
            self._waiter().pull(oid, [source], timeout)
        finally:
            self._blocked(False)

    def pull_and_pin(self, oid: bytes, source: str, deadline: float | None) -> StoredObject:
        """Pull a remote copy here and hold it; the owner reads it like a local one."""
        self.fetch_to_node(oid, source, deadline)
        obj = self.client.hold(oid)
        if obj is None:
            raise ObjectLostError(f"object {oid.hex()} was evicted right after it was pulled")
        return obj

    def contains(self, oids: list[bytes]) -> list[bool]:
        return self.client.contains(oids)

    def free(self, oids: list[bytes]) -> None:
        self.client.free(oids)

    def prefetch(self, wanted: list[tuple[bytes, str]]) -> None:
        """Start pulling these (object id, source store) here in the background."""
        if self._prefetcher is None:
            from libclient.core.prefetch import Prefetcher

            self._prefetcher = Prefetcher(self.socket_path, self._pid)
        for oid, source in wanted:
            if source and source != self.address:
                self._prefetcher.prefetch(oid, source)

    def free_remote(self, by_store: dict[str, list[bytes]]) -> None:
        """Free our objects' copies on other nodes' stores (in the background)."""
        if self._freer is None:
            from libclient.core.remote_free import RemoteFreer

            self._freer = RemoteFreer()
        self._freer.free(by_store)

    def flush_releases(self) -> None:
        self.client.flush_releases()

    def close(self) -> None:
        if self._freer is not None:
            self._freer.close()
        if self._prefetcher is not None:
            self._prefetcher.close()
        self.client.close()
        if self._wait_client is not None:
            self._wait_client.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
