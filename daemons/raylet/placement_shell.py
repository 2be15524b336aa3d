"""The raylet's I/O for placement groups: messages, gcsd rows, links to other raylets.

Decisions live in ``placement_groups`` (the coordinator: where bundles go,
two-phase reservation, removal, dead nodes) and ``placement_bundles`` (this
node's reservations). This module carries them out:

  pg_create  {r, pg_id, bundles, strategy, name, namespace, detached, job}
             from a local client -> {ok} once the PENDING row is in gcsd
  pg_remove  {r, pg_id}    -> {ok}; forwarded to the group's coordinator if
             that is another raylet (or done from the row if it is dead)
  pg_prepare {r, pg_id, index, res, coordinator} -> {ok}  (coordinator -> node)
  pg_commit  {r, pg_id, index}                   -> {ok}
  pg_return  {r, pg_id, index}                   -> {ok}

Messages to other raylets go out on :class:`PeerLinks`: one thread per peer
with a blocking TLS/TCP connection, so a slow peer never stalls the raylet's
loop; replies come back through a queue and a wake pipe. Bundles on this
node are prepared and committed in-process, with no message at all.
"""

from __future__ import annotations

import collections
import os
import queue
import selectors
import socket
import threading
import time
from typing import Any

import msgpack

from daemons.raylet.placement_bundles import BundleHost, Change
from daemons.raylet.placement_groups import (
    Commit,
    Group,
    Persist,
    PlacementCoordinator,
    Prepare,
    Return,
)
from daemons.raylet.resources import ResourceSet
from libclient import security
from libclient.protocol import FrameDecoder, ProtocolError, pack
from libclient.protocol import field as mfield
from libclient.util.placement_group import NAMES_NS, ROWS_NS, group_of_resource

_PEER_TIMEOUT_S = 5.0
_REMOVED_CAUSE = "its placement group was removed"


class PeerLinks:
    """Request/reply to other raylets, off the loop: one thread and connection per peer."""

    def __init__(self, wake_fd: int, hello: dict[str, Any]) -> None:
        self._wake_fd = wake_fd
        self._hello = hello
        self._queues: dict[str, queue.SimpleQueue] = {}
        self.replies: collections.deque = collections.deque()
        self._stopped = False

    def send(self, address: str, msg: dict[str, Any], token: Any) -> None:
        """Send ``msg`` to the raylet at ``address``; ``(token, reply)`` lands in
        ``replies`` (a failure is ``{ok: False, error}``)."""
        q = self._queues.get(address)
        if q is None:
            q = self._queues[address] = queue.SimpleQueue()
            threading.Thread(target=self._run, args=(address, q), daemon=True,
                             name=f"pg-peer-{address}").start()
        q.put((msg, token))

    def stop(self) -> None:
        self._stopped = True
        for q in self._queues.values():
            q.put(None)

    def _run(self, address: str, q: queue.SimpleQueue) -> None:
        sock: socket.socket | None = None
        decoder = FrameDecoder()
        rid = 0
        while True:
            item = q.get()
            if item is None or self._stopped:
                break
            msg, token = item
            try:
                if sock is None:
                    host, _, port = address.rpartition(":")
                    sock = security.connect((host, int(port)), timeout=_PEER_TIMEOUT_S)
                    sock.settimeout(_PEER_TIMEOUT_S)
                    decoder = FrameDecoder()
                    rid += 1
                    _exchange(sock, decoder, {**self._hello, "r": rid})
                rid += 1
                reply = _exchange(sock, decoder, {**msg, "r": rid})
            except (OSError, ValueError, ProtocolError) as exc:
                reply = {"ok": False, "error": f"raylet {address} unreachable: {exc}"}
                if sock is not None:
                    sock.close()
                    sock = None
            self.replies.append((token, reply))
            try:
                os.write(self._wake_fd, b"p")
            except OSError:
                pass
        if sock is not None:
            sock.close()


def _exchange(sock: socket.socket, decoder: FrameDecoder, msg: dict[str, Any]) -> dict:
    sock.sendall(pack(msg))
    while True:
        reply = decoder.next()
        while reply is None:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            decoder.feed(data)
            reply = decoder.next()
        if reply.get("r") == msg["r"]:
            return reply


class PlacementService:
    """Placement groups on one raylet: coordinator of its own groups, host of bundles."""

    def __init__(self, raylet: Any) -> None:
        self.r = raylet
        self.coord = PlacementCoordinator(raylet.node_id)
        self.host = BundleHost()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        raylet.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.links = PeerLinks(self._wake_w, {"t": "hello", "kind": "remote"})
        self._coordinators: dict[bytes, bytes] = {}  # group -> its coordinator, for bundles here
        self._sent_total: dict[str, float] | None = None

    def close(self) -> None:
        self.links.stop()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- messages ---------------------------------------------------------------
    def on_message(self, conn: Any, msg: dict[str, Any]) -> None:
        t = msg["t"]
        rid = mfield(msg, "r", int)
        if t == "pg_create":
            self._on_create(conn, rid, msg)
        elif t == "pg_remove":
            self._on_remove(conn, rid, mfield(msg, "pg_id", bytes))
        elif t == "pg_prepare":
            pg_id, index = mfield(msg, "pg_id", bytes), mfield(msg, "index", int)
            try:
                res = ResourceSet.of(mfield(msg, "res", dict))
                change = self.host.prepare(pg_id, index, res, self.r.scheduler.available)
            except (TypeError, ValueError) as exc:
                raise ProtocolError(str(exc)) from None
            if change is not None:
                self._coordinators[pg_id] = mfield(msg, "coordinator", bytes, b"")
                self._apply(change)
            self.r._send(conn, {"r": rid, "ok": change is not None})
        elif t == "pg_commit":
            try:
                change = self.host.commit(mfield(msg, "pg_id", bytes), mfield(msg, "index", int))
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            if change is not None:
                self._apply(change)
                self.r._schedule()
            self.r._send(conn, {"r": rid, "ok": change is not None})
        elif t == "pg_return":
            try:
                self._give_back(mfield(msg, "pg_id", bytes), mfield(msg, "index", int))
            except ValueError as exc:
                raise ProtocolError(str(exc)) from None
            self.r._schedule()
            self.r._send(conn, {"r": rid, "ok": True})
        else:
            raise ProtocolError(f"unknown message type {t!r}")

    def _on_create(self, conn: Any, rid: int, msg: dict[str, Any]) -> None:
        try:
            bundles = [ResourceSet.of(b) for b in mfield(msg, "bundles", list)]
            group = Group(mfield(msg, "pg_id", bytes), bundles, mfield(msg, "strategy", str),
                          name=mfield(msg, "name", str, ""),
                          namespace=mfield(msg, "namespace", str, ""),
                          detached=bool(msg.get("detached", False)), owner=conn.cid,
                          job=mfield(msg, "job", int, 0))
            actions = self.coord.create(group)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(str(exc)) from None
        # Plan at once: a group placed on this node alone is CREATED before the
        # reply, in one gcsd write (rows are written once per batch of actions).
        if not self.coord.busy:
            actions += self._plan()
        self._run(actions)
        self.r._send(conn, {"r": rid, "ok": True})
        self.step()

    def _on_remove(self, conn: Any, rid: int, pg_id: bytes) -> None:
        if pg_id in self.coord.groups:
            self._run(self.coord.remove(pg_id))
        else:
            self._remove_elsewhere(pg_id)
        self.r._schedule()
        self.r._send(conn, {"r": rid, "ok": True})

    def _remove_elsewhere(self, pg_id: bytes) -> None:
        """A group coordinated by another raylet: ask it, or, if it is dead, return
        the bundles named in the row and mark it REMOVED ourselves."""
        row = self._read_row(pg_id)
        if row is None or row.get("state") == "REMOVED":
            return
        coordinator = row.get("coordinator") or b""
        node_row = self.r.cluster_nodes.get(coordinator) or {}
        if node_row.get("state") == "ALIVE" and node_row.get("raylet_address"):
            self.links.send(node_row["raylet_address"], {"t": "pg_remove", "pg_id": pg_id},
                            None)
            return
        for index, node in enumerate(row.get("nodes") or []):
            if node:
                self._return(Return(pg_id, index, node))
        row.update(state="REMOVED", nodes=[b""] * len(row.get("nodes") or []))
        self._write_row(pg_id, row)
        self._release_name(row)

    # ---- events from the raylet ------------------------------------------------------------
    def tick(self) -> None:
        """Replies from peers, then a new attempt if one can start (every loop turn)."""
        replies = self.links.replies
        if replies:
            now = time.monotonic()
            actions = []
            while replies:
                token, reply = replies.popleft()
                if token is None:
                    continue
                kind, pg_id, index, node = token
                ok = bool(reply.get("ok"))
                if kind == "prepare":
                    actions += self.coord.prepared(pg_id, index, node, ok, now)
                elif kind == "commit":
                    actions += self.coord.committed(pg_id, index, node, ok, now)
            self._run(actions)
        self.step()

    def step(self) -> None:
        if self.coord.busy or not self.coord.pending():
            return
        self._run(self._plan())

    def _plan(self) -> list:
        view = self.r.view
        available = {n: view.node(n).available for n in view.alive_nodes()}
        available[self.r.node_id] = self.r.scheduler.available
        return self.coord.step(available, time.monotonic(), view.cursor)

    def owner_gone(self, cid: int) -> None:
        """A connection closed: the groups it created (not detached) end with it."""
        if any(g.owner == cid for g in self.coord.groups.values()):
            self._run(self.coord.owner_gone(cid))

    def node_dead(self, node: bytes) -> None:
        """Reschedule our groups' bundles that were there; drop bundles here whose
        coordinator died with its (non-detached) groups' owners."""
        self._run(self.coord.node_dead(node, time.monotonic()))
        orphans = [g for g, c in self._coordinators.items() if c == node]
        for pg_id in orphans:
            row = self._read_row(pg_id)
            if row is not None and row.get("detached"):
                continue  # a detached group keeps its bundles (no one reschedules it)
            for index in self.host.indices(pg_id):
                self._give_back(pg_id, index)
            self._coordinators.pop(pg_id, None)
        self.step()

    def total_if_changed(self) -> dict[str, float] | None:
        """This node's total for gcsd's row, when it changed since the last report."""
        total = self.r.scheduler.total.to_dict()
        if self._sent_total is None:
            self._sent_total = self.r.total.to_dict()
        if total == self._sent_total:
            return None
        self._sent_total = total
        return total

    # ---- carrying out actions -----------------------------------------------------------
    def _run(self, actions: list) -> None:
        todo = collections.deque(actions)
        changed = False
        rows: dict[bytes, Persist] = {}  # the last state of each group, written once
        while todo:
            a = todo.popleft()
            now = time.monotonic()
            if isinstance(a, Prepare):
                if a.node == self.r.node_id:
                    change = self.host.prepare(a.pg_id, a.index, a.resources,
                                               self.r.scheduler.available)
                    if change is not None:
                        self._coordinators[a.pg_id] = self.r.node_id
                        self._apply(change)
                    todo.extend(self.coord.prepared(a.pg_id, a.index, a.node,
                                                    change is not None, now))
                elif not self._to_peer(a.node, {"t": "pg_prepare", "pg_id": a.pg_id,
                                                "index": a.index, "res": a.resources.to_dict(),
                                                "coordinator": self.r.node_id},
                                       ("prepare", a.pg_id, a.index, a.node)):
                    todo.extend(self.coord.prepared(a.pg_id, a.index, a.node, False, now))
                # No optimistic subtraction from the view here: a bundle returned
                # within one report period is never reported, so a guess would
                # outlive the reservation. A stale view costs a refused prepare
                # and a retry, never a wrong placement.
            elif isinstance(a, Commit):
                if a.node == self.r.node_id:
                    change = self.host.commit(a.pg_id, a.index)
                    if change is not None:
                        self._apply(change)
                        changed = True
                    todo.extend(self.coord.committed(a.pg_id, a.index, a.node,
                                                     change is not None, now))
                elif not self._to_peer(a.node, {"t": "pg_commit", "pg_id": a.pg_id,
                                                "index": a.index},
                                       ("commit", a.pg_id, a.index, a.node)):
                    todo.extend(self.coord.committed(a.pg_id, a.index, a.node, False, now))
            elif isinstance(a, Return):
                self._return(a)
                changed = True
            elif isinstance(a, Persist):
                forget = a.forget or (a.group.pg_id in rows and rows[a.group.pg_id].forget)
                rows[a.group.pg_id] = Persist(a.group, forget)
        for p in rows.values():  # before scheduling: a ready() task then finds its row
            self._persist(p)
        if changed:
            self.r._schedule()

    def _to_peer(self, node: bytes, msg: dict[str, Any], token: Any) -> bool:
        row = self.r.cluster_nodes.get(node) or {}
        address = row.get("raylet_address")
        if row.get("state") != "ALIVE" or not address:
            return False
        self.links.send(address, msg, token)
        return True

    def _return(self, a: Return) -> None:
        if a.node == self.r.node_id:
            self._give_back(a.pg_id, a.index)
        else:
            self._to_peer(a.node, {"t": "pg_return", "pg_id": a.pg_id, "index": a.index}, None)

    def _apply(self, change: Change) -> None:
        sched = self.r.scheduler
        if (change.add.names() or change.remove.names()) and self.r.view.alive_count > 1:
            # A bundle committed or returned: other raylets must see it (to send
            # its tasks here, to plan the next group), so report on the next
            # turn, not within 0.1 s. At most two reports per bundle.
            self.r._last_report = 0.0
        if change.acquire.names():
            sched.acquire(change.acquire)
        if change.add.names():
            sched.add_resources(change.add)
        if change.remove.names():
            sched.remove_resources(change.remove)
        if change.release.names():
            sched.release(change.release)

    def _give_back(self, pg_id: bytes, index: int) -> None:
        """Return a bundle here: first end what runs on it (as Ray does), then its resources."""
        if (pg_id, index) not in self.host.bundles:
            return
        self._end_work_in(pg_id.hex())
        self._apply(self.host.give_back(pg_id, index))
        if not self.host.indices(pg_id):
            self._coordinators.pop(pg_id, None)

    def _end_work_in(self, pg_hex: str) -> None:
        r = self.r

        def in_group(demand: ResourceSet) -> bool:
            return any(group_of_resource(k) == pg_hex for k in demand.names())

        for item in [a for a in r.awaiting if in_group(a[0].demand)]:
            r.awaiting.remove(item)
            r._unreserve(item)
            req, conn, _ = item
            if conn is not None:
                r._send(conn, {"r": req.request_id, "ok": False, "error": "unschedulable",
                               "msg": _REMOVED_CAUSE})
            else:
                actor_id = r._actor_reqs.get(req.request_id)
                record = r.actors.kill(actor_id, True, _REMOVED_CAUSE) if actor_id else None
                if record is not None:
                    r._kill_actor(record)
        for lease in [x for x in r.leases.values() if in_group(x.demand)]:
            actor_id = lease.worker.actor_id
            if actor_id is not None:
                r.actors.kill(actor_id, True, _REMOVED_CAUSE)
            r.log.info("placement_group_work_killed", lease_id=lease.lease_id,
                       worker_pid=lease.worker.pid,
                       actor_id=actor_id.hex() if actor_id else None)
            r._end_lease(lease.lease_id, kill=True)

    # ---- gcsd rows ----------------------------------------------------------------------
    def _persist(self, p: Persist) -> None:
        g = p.group
        self._write_row(g.pg_id, g.row(self.r.node_id))
        if p.forget:
            self._release_name({"name": g.name, "namespace": g.namespace, "pg_id": g.pg_id})
        self.r.log.info("placement_group_state", pg_id=g.pg_id.hex(), state=g.state,
                        nodes=[n.hex() if n else "" for n in g.nodes])

    def _write_row(self, pg_id: bytes, row: dict[str, Any]) -> None:
        if self.r.gcs is None:
            return
        try:
            self.r.gcs.kv_put(ROWS_NS, pg_id, msgpack.packb(row, use_bin_type=True))
        except Exception as exc:
            self.r.log.warning("placement_group_persist_failed", pg_id=pg_id.hex(),
                               error=str(exc))

    def _read_row(self, pg_id: bytes) -> dict[str, Any] | None:
        if self.r.gcs is None:
            return None
        try:
            raw = self.r.gcs.kv_get(ROWS_NS, pg_id)
            return msgpack.unpackb(raw, raw=False) if raw else None
        except Exception as exc:
            self.r.log.warning("placement_group_read_failed", pg_id=pg_id.hex(), error=str(exc))
            return None

    def _release_name(self, row: dict[str, Any]) -> None:
        name = row.get("name")
        if not name or self.r.gcs is None:
            return
        ns = NAMES_NS + (row.get("namespace") or "")
        try:
            if self.r.gcs.kv_get(ns, name.encode()) == row.get("pg_id"):
                self.r.gcs.kv_del(ns, name.encode())
        except Exception as exc:
            self.r.log.warning("placement_group_name_release_failed", error=str(exc))
