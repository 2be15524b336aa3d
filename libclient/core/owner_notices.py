"""Borrower-to-owner notices, carried by the owner's raylet.

Theory of operation
-------------------
Owners do not listen on a port of their own: a driver is a plain client.
Every process is connected to its node's raylet, though, and every raylet
accepts other nodes' connections over TCP. So a notice for an owner (a
borrower let go of a ref, or holds one a sub-task reported) goes to the
raylet of the owner's node wrapped in ``{t: to_pid, pid, msg}``; that raylet
hands ``msg`` to the process with that pid over its Unix connection, or
drops it if the process is gone. Notices from one process to one owner take
one path in order, so a borrow registered before a removal arrives first.

The owner also needs to learn of borrowers that die without a word. Every
``PROBE_S`` it sends ``{t: to_pid, pid, probe: true}`` for each borrower it
counts; the borrower's raylet answers ``pid_status`` (alive: false if no
such process is connected to it), and borrowers on nodes gcsd declared dead
are dropped. A borrower asks the same of an owner whose object it waits for
(:meth:`ask_alive`), so its ``get`` ends with OwnerDiedError, not a hang.

Notices are batched per owner per I/O turn (the core worker's tick).
"""

from __future__ import annotations

import time
from typing import Any

from libclient.core.io_loop import IoLoop
from libclient.protocol import pack

PROBE_S = 2.0
_ADDR_REFRESH_S = 1.0


class OwnerNotices:
    """Routes notices to processes on any node, by (store address, pid)."""

    def __init__(self, io: IoLoop, gcs: Any, store_address: str, pid: int) -> None:
        self._io = io
        self._gcs = gcs
        self.me = [store_address, pid]
        self._store_address = store_address
        self._raylets: dict[str, tuple[str, bytes]] = {}  # store address -> raylet, node
        self._dead_stores: set[str] = set()
        self._refreshed = 0.0
        self._next_probe = time.monotonic() + PROBE_S

    def send(self, owner: tuple[str, int], msg: dict) -> None:
        """Give ``msg`` to the process ``owner`` (I/O thread, lock held)."""
        addr, pid = owner
        wrapped = {"t": "to_pid", "pid": pid, "msg": msg}
        if not addr or addr == self._store_address:
            self._io.raylet_send(wrapped)
            return
        rr = self._raylet_for(addr)
        if rr is not None:
            self._io.write(rr, pack(wrapped))

    def removals(self, by_owner: dict[tuple[str, int], list[list]]) -> None:
        for owner, items in by_owner.items():
            self.send(owner, {"t": "ref_removed", "by": self.me, "items": items})

    def borrows(self, items: list[list]) -> None:
        """Borrows our sub-tasks reported for objects we neither own nor relay."""
        by_owner: dict[tuple[str, int], list[list]] = {}
        for item in items:
            by_owner.setdefault((item[2], item[1]), []).append(item)
        for owner, its in by_owner.items():
            self.send(owner, {"t": "add_borrower", "items": its})

    def probe_due(self, now: float) -> bool:
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_S
        return True

    def probe(self, keys: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """Ask each borrower's raylet whether it still lives; return the keys
        on nodes already known dead (the caller drops them now)."""
        self._refresh(force=True)
        dead = {k for k in keys if k[0] in self._dead_stores}
        for key in keys - dead:
            addr, pid = key
            wrapped = {"t": "to_pid", "pid": pid, "probe": True, "msg": {"t": "probe"}}
            if not addr or addr == self._store_address:
                self._io.raylet_send(wrapped)
            else:
                rr = self._raylet_for(addr)
                if rr is not None:
                    self._io.write(rr, pack(wrapped))
        return dead

    def ask_alive(self, key: tuple[str, int]) -> bool:
        """Send one probe for process ``key``; False if its node is known dead
        (the answer, ``pid_status``, arrives through the core worker)."""
        addr, pid = key
        wrapped = {"t": "to_pid", "pid": pid, "probe": True, "msg": {"t": "probe"}}
        if not addr or addr == self._store_address:
            self._io.raylet_send(wrapped)
            return True
        rr = self._raylet_for(addr)
        if rr is None:
            self._refresh(force=True)
            return addr not in self._dead_stores
        self._io.write(rr, pack(wrapped))
        return True

    def _raylet_for(self, store_address: str) -> Any:
        known = self._raylets.get(store_address)
        if known is None:
            self._refresh(force=False)
            known = self._raylets.get(store_address)
            if known is None:
                return None
        return self._io.remote_raylet(known[0], known[1])

    def _refresh(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed < _ADDR_REFRESH_S:
            return
        self._refreshed = now
        try:
            nodes = self._gcs.get_nodes()
        except Exception:
            return
        for n in nodes:
            store = n.get("store_address")
            if not isinstance(store, str) or not store:
                continue
            if n.get("state") == "ALIVE" and isinstance(n.get("raylet_address"), str):
                self._raylets[store] = (n["raylet_address"], n.get("node_id") or b"")
                self._dead_stores.discard(store)
            else:
                self._raylets.pop(store, None)
                self._dead_stores.add(store)

