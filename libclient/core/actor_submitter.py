"""Actor creation and actor calls: one ordered queue per actor, straight to its socket.

Theory of operation
-------------------
*Creation.* ``create_actor`` becomes a task keyed ``("create", actor_id)``.
Once its arguments are ready the submitter sends ``create_actor`` to the
raylet, which leases a worker, runs ``__init__`` there and answers with the
actor's pid and socket (or the error ``__init__`` raised).

*Calls.* A caller keeps one :class:`ActorConn` per actor: a queue of calls
in submission order and a connection to the actor's own socket. A call
leaves only after every earlier call from this caller has left and its own
arguments are ready, so one caller's calls run in order.

*Following the actor.* Callers that did not create the actor (or lost its
connection) learn its socket from gcsd's ``actors`` table: they subscribe
to the table's changes and also poll the row every 250 ms, since a PUB
socket may drop messages. A connection that closes fails or retries the
calls in flight (``max_task_retries``) and waits for a new incarnation
(the raylet restarts the actor up to ``max_restarts``); a row in state DEAD
fails every queued call with ActorDiedError.

*Other nodes.* The creator's raylet places the actor (resources, strategy)
or answers ``spill`` with another node's raylet, which the creator then asks
(``grant_or_reject``) and which manages the actor from then on: kills and
scoped ends go to it. Callers on other nodes reach the actor's worker over
TCP. If the actor's node dies, the surviving raylets restart it elsewhere
while it has restarts left (``daemons/raylet/actor_failover.py``): its row
goes RESTARTING, then ALIVE with a new node, pid and address, and callers
reconnect. A caller waiting on a row that stays on a dead node checks gcsd's
node table: no restarts left means dead at once; otherwise it waits at most
``ORPHAN_GRACE_S`` for a raylet to act, then fails the calls. The creator of
a non-detached actor that moved registers as its owner at the new raylet
(``own_actor``), so the actor still ends with its creator.

*Kill.* ``kill`` goes through the (managing) raylet, but calls go straight to the
actor, so the caller also marks the actor dead (or its incarnation lost, to
restart) at once: no call made after ``kill`` can overtake it. A creation
reply that arrives for an actor killed here meanwhile is ignored.

*Scope.* An actor created here, unnamed and not detached, whose handles
never left this process, ends when its last handle goes and its queued
calls are done (Ray's scoping rule, limited to handles never passed on).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from libclient import object_ref
from libclient.core import task_manager
from libclient.core.errors import actor_died_wire
from libclient.core.io_loop import Conn, IoLoop, RemoteRaylet, connect_worker
from libclient.core.references import NOT_READY, ReferenceTable
from libclient.core.task_manager import Task, TaskManager
from libclient.protocol import FrameDecoder, pack

POLL_S = 0.25
# How long a caller waits for a surviving raylet to take over a restartable
# actor whose node died before it gives up on it (never hang).
ORPHAN_GRACE_S = 10.0
_SPEC_KEYS = ("class_name", "name", "namespace", "detached", "max_restarts",
              "max_concurrency", "is_async", "meta", "renv", "pg")  # pg: placement group


class ActorConn(Conn):
    """A caller's view of one actor: its connection and the calls it owes."""

    __slots__ = ("actor_id", "key", "state", "queue", "pid", "socket_path", "lost_pid",
                 "dead_wire", "create_task", "next_poll", "handles", "scoped", "escaped",
                 "released", "node_id", "address", "raylet", "create_msg", "lost_node",
                 "orphan_since", "owned", "owner_at", "create_lost")

    def __init__(self, actor_id: bytes) -> None:
        super().__init__(None)
        self.actor_id = actor_id
        self.key = ("actor", actor_id)
        self.state = "UNKNOWN"
        self.queue: collections.deque[Task] = collections.deque()
        self.pid = 0
        self.socket_path = ""
        self.lost_pid = 0  # a connection to this incarnation broke: wait for a new one
        self.dead_wire: list | None = None
        self.create_task: Task | None = None
        self.next_poll = 0.0
        self.handles = 0  # live ActorHandle objects in this process
        self.scoped = False  # created here, unnamed, not detached: dies with its handles
        self.escaped = False  # a handle was pickled: others may call it
        self.released = False
        self.node_id = b""  # the node it runs on; callers elsewhere use TCP
        self.address = ""  # its worker's "host:port"
        self.raylet: RemoteRaylet | None = None  # the raylet managing it, if not ours
        self.create_msg: dict | None = None  # kept until placed (it may be spilled)
        self.lost_node = b""  # the node of the lost incarnation (with lost_pid)
        self.orphan_since = 0.0  # when we saw its row stuck on a dead node
        self.owned = False  # created here and not detached: it ends with us
        self.owner_at = b""  # the node whose raylet knows us as its owner
        self.create_lost = False  # the raylet placing it died: follow the row


class ActorSubmitter:
    """Every actor this process created or called, and the calls it owes them."""

    def __init__(self, io: IoLoop, refs: ReferenceTable, tasks: TaskManager, gcs: Any,
                 node_id: bytes, finish_error: Callable[[Task, list], None],
                 task_done: Callable[[Task, str], None]) -> None:
        self._io = io
        self._node_id = node_id
        self._refs = refs
        self._tasks = tasks
        self._gcs = gcs
        self._finish_error = finish_error  # fail a task's returns and end it
        self._task_done = task_done  # end a task whose returns are settled
        self.actors: dict[bytes, ActorConn] = {}
        self._creates: dict[int, ActorConn] = {}  # raylet request id -> actor
        self._sub: Any = None  # gcsd subscription to the actors table

    def actor(self, actor_id: bytes) -> ActorConn:
        a = self.actors.get(actor_id)
        if a is None:
            a = self.actors[actor_id] = ActorConn(actor_id)
        return a

    def needs_polling(self) -> bool:
        """Whether the I/O thread should turn often to follow actors' rows."""
        return bool(self.actors) and bool(
            self._sub or any(a.next_poll for a in self.actors.values()))

    # ------------------------------------------------------------- creation
    def creating(self, task: Task) -> None:
        """A creation task was submitted (its arguments may still be pending)."""
        a = self.actor(task.key[1])
        a.state = "PENDING_CREATION"
        a.create_task = task

    def send_create(self, task: Task, job_id: int) -> None:
        """The creation's arguments are resolved: ask the raylet for the actor."""
        a = self.actor(task.key[1])
        rid = self._io.next_raylet_id()
        self._creates[rid] = a
        m = task.msg
        spec = {"cls": m["fn"], "args": m["args"], "deps": m.get("deps"),
                "job": job_id, **{k: m[k] for k in _SPEC_KEYS if k in m}}
        a.owned = not m.get("detached")
        a.create_msg = {"t": "create_actor", "r": rid, "actor_id": a.actor_id,
                        "res": task.demand, "spec": spec, "owner_node": self._node_id}
        if m.get("strategy") is not None:
            a.create_msg["strategy"] = m["strategy"]
        self._io.raylet_send(a.create_msg)

    def creation_failed(self, task: Task, wire: list) -> None:
        """An argument of the creation failed: the actor is dead before it lived."""
        a = self.actor(task.key[1])
        a.state, a.dead_wire, a.create_task = "DEAD", wire, None
        self.pump(a)

    def on_raylet_reply(self, rid: int, msg: dict) -> bool:
        """A raylet reply to a ``create_actor`` of ours? Then handle it."""
        a = self._creates.pop(rid, None)
        if a is None:
            return False
        if msg.get("error") == "spill" and a.state != "DEAD" and a.create_msg is not None:
            rr = self._io.remote_raylet(msg.get("raylet_address") or "",
                                        msg.get("node_id") or b"")
            if rr is not None:  # that node's raylet places and manages it
                rid = self._io.next_raylet_id()
                a.raylet = rr
                a.create_msg = {**a.create_msg, "r": rid, "grant_or_reject": True}
                self._creates[rid] = a
                self._io.write(rr, pack(a.create_msg))
                return True
        a.create_msg = None
        task, a.create_task = a.create_task, None
        if a.state == "DEAD":
            pass  # killed here while its creation was in flight
        elif msg.get("ok"):
            a.state, a.pid, a.socket_path = "ALIVE", msg["pid"], msg["socket"]
            a.node_id, a.address = msg.get("node_id") or b"", msg.get("address") or ""
            a.owner_at = a.node_id
        else:
            a.state = "DEAD"
            a.dead_wire = actor_died_wire(a.actor_id, msg.get("msg", msg.get("error", "")),
                                          msg.get("wire"))
        if task is not None:
            self._task_done(task, "FINISHED" if msg.get("ok") else "FAILED")
        self.pump(a)
        return True

    # ---------------------------------------------------------------- calls
    def submit(self, task: Task) -> None:
        """Queue a call; calls keep their order even while arguments are pending."""
        a = self.actor(task.key[1])
        a.queue.append(task)
        self.pump(a)

    def requeue(self, task: Task) -> None:
        a = self.actor(task.key[1])
        a.inflight.pop(task.tid, None)
        a.queue.appendleft(task)
        self.pump(a)

    def pump(self, a: ActorConn) -> None:
        """Send queued calls in order, as far as arguments and the connection allow."""
        if a.state == "DEAD":
            while a.queue:
                self._finish_error(a.queue.popleft(),
                                   a.dead_wire or actor_died_wire(a.actor_id, ""))
            return
        if a.sock is None:
            if a.state == "ALIVE" and a.socket_path and (a.pid, a.node_id) != (a.lost_pid,
                                                                              a.lost_node):
                self._connect(a)
            if a.sock is None:
                if a.queue:
                    self._watch(a)
                return
        while a.queue:
            task = a.queue[0]
            if task.cancelled:
                a.queue.popleft()
                continue
            if task.unresolved:
                return
            failed = self._refs.resolve_args(task)
            if failed is NOT_READY:  # an argument is being rebuilt: wait for it
                self._refs.wait_for_args(task)
                return
            a.queue.popleft()
            if failed is not None:
                self._finish_error(task, failed)
                continue
            task.lease = a
            a.inflight[task.tid] = task
            self._tasks.mark(task, "SUBMITTED_TO_WORKER")
            self._io.write(a, pack(task.msg))

    def _connect(self, a: ActorConn) -> None:
        remote = bool(a.node_id) and a.node_id != self._node_id and bool(a.address)
        try:
            sock = connect_worker({"address": a.address, "socket": a.socket_path}, remote)
        except (OSError, ValueError):
            a.lost_pid, a.lost_node = a.pid, a.node_id
            self._watch(a)
            return
        a.sock, a.dead, a.decoder, a.out = sock, False, FrameDecoder(), bytearray()
        self._io.register(a)

    def conn_lost(self, a: ActorConn, why: str) -> None:
        """The actor's process went away: retry or fail what was in flight."""
        if a.sock is not None:
            self._io.close_conn(a)
        a.sock, a.dead = None, True
        a.lost_pid, a.lost_node = a.pid, a.node_id
        if a.state == "ALIVE":
            a.state = "UNKNOWN"
        retry = []
        for task in a.inflight.values():
            if self._tasks.on_connection_lost(task) == task_manager.RETRY:
                retry.append(task)
            else:
                self._finish_error(task, actor_died_wire(
                    a.actor_id, f"the actor died while running {task.name} ({why})"))
        a.inflight.clear()
        a.queue.extendleft(reversed(retry))
        self.pump(a)

    def idle(self, a: ActorConn) -> None:
        """Nothing is in flight to ``a`` any more: end it if its handles are gone."""
        if a.released:
            self._maybe_end(a)

    # ------------------------------------------------------ following gcsd
    def _watch(self, a: ActorConn) -> None:
        """Follow this actor's row in gcsd until it is reachable or dead."""
        if self._sub is None:
            try:
                from libclient.gcs_client import GcsSubscriber

                info = self._gcs.call("info")
                self._sub = GcsSubscriber(info["pubsub"], ["actors"])
            except Exception:
                self._sub = False  # polling alone still works
        if a.next_poll == 0.0:
            a.next_poll = time.monotonic()
            self._io.wake(b"p")

    def on_record(self, rec: Any) -> None:
        """A row of gcsd's actors table (published or polled)."""
        if not isinstance(rec, dict):
            return
        a = self.actors.get(rec.get("actor_id", b""))
        if a is None or a.state == "DEAD":
            return
        state = rec.get("state")
        node = rec.get("node_id") or b""
        if state == "ALIVE" and (rec.get("pid"), node) != (a.lost_pid, a.lost_node):
            if a.sock is not None and (a.pid, a.node_id) != (rec.get("pid"), node):
                self.conn_lost(a, "the actor restarted")
            a.state, a.pid, a.socket_path = "ALIVE", rec.get("pid", 0), rec.get("socket", "")
            a.node_id, a.address = node, rec.get("address") or ""
            a.next_poll = a.orphan_since = 0.0
            self._finish_lost_create(a, True)
            self._reown(a)
            self.pump(a)
        elif state == "DEAD":
            a.state = "DEAD"
            a.next_poll = 0.0
            if a.dead_wire is None:
                a.dead_wire = actor_died_wire(a.actor_id, rec.get("death_cause", ""))
            self._finish_lost_create(a, False)
            if a.sock is None:
                self.pump(a)
        elif state in ("PENDING_CREATION", "RESTARTING"):
            a.state = state
            if node != a.node_id:  # taken over by another node, or parked on none
                a.node_id, a.address = node, ""
                if not node:
                    a.raylet = None  # kills go to our raylet, which ends orphans

    def _finish_lost_create(self, a: ActorConn, ok: bool) -> None:
        """The raylet placing our actor died; its row tells how the creation ended."""
        if not a.create_lost:
            return
        a.create_lost, a.create_msg = False, None
        task, a.create_task = a.create_task, None
        if task is not None:
            self._task_done(task, "FINISHED" if ok else "FAILED")

    def _reown(self, a: ActorConn) -> None:
        """Our non-detached actor now lives under another raylet (its node died):
        tell that raylet we own it, so it still ends when we do."""
        if a.owned and a.owner_at != a.node_id and (a.owner_at or a.create_task is None):
            a.owner_at = a.node_id
            self._io.send_to(self._managing_raylet(a), {"t": "own_actor",
                                                        "actor_id": a.actor_id})

    def remote_raylet_lost(self, rr: RemoteRaylet) -> None:
        """Another node's raylet went away: creations it was placing follow the row."""
        for rid, a in list(self._creates.items()):
            if a.raylet is rr:
                del self._creates[rid]
                a.create_lost = True
                self._watch(a)

    def poll(self, now: float) -> None:
        """Read published rows; poll the rows of actors we wait for (I/O thread)."""
        sub = self._sub
        if sub:
            for _ in range(1000):
                try:
                    note = sub.recv(0)
                except Exception:
                    break
                if note is None:
                    break
                self.on_record(note.get("value"))
        dead_nodes: set[bytes] | None = None
        for a in list(self.actors.values()):
            if a.next_poll and now >= a.next_poll:
                a.next_poll = now + POLL_S
                try:
                    rec = self._gcs.table_get("actors", a.actor_id)
                    if rec is None and a.create_lost:
                        self._create_again(a)
                        continue
                    if _maybe_orphan(rec, a, self._node_id):
                        if dead_nodes is None:
                            dead_nodes = {n["node_id"] for n in self._gcs.get_nodes()
                                          if n.get("state") != "ALIVE"}
                        rec = self._orphan_verdict(a, rec, rec["node_id"] in dead_nodes, now)
                    self.on_record(rec)
                except Exception:
                    pass

    def _orphan_verdict(self, a: ActorConn, rec: dict, node_dead: bool, now: float) -> dict:
        """A row stuck on a node: if that node is dead and the actor cannot
        restart, it is dead now; if it can, a surviving raylet should take it
        over, and we wait for that at most ``ORPHAN_GRACE_S``."""
        if not node_dead:
            a.orphan_since = 0.0
            return rec
        node = rec["node_id"].hex()
        if int(rec.get("num_restarts") or 0) >= int(rec.get("max_restarts") or 0):
            return {**rec, "state": "DEAD", "death_cause": f"the actor's node {node} died "
                    f"and it has no restarts left (max_restarts={rec.get('max_restarts', 0)})"}
        if not a.orphan_since:
            a.orphan_since = now
        if now - a.orphan_since > ORPHAN_GRACE_S:
            return {**rec, "state": "DEAD", "death_cause": f"the actor's node {node} died "
                    f"and no surviving node restarted it within {ORPHAN_GRACE_S:.0f} s"}
        return rec

    def _create_again(self, a: ActorConn) -> None:
        """The raylet placing our actor died before it published the actor:
        nobody else knows it, so ask our own raylet to place it again."""
        a.create_lost, a.raylet = False, None
        if a.create_msg is None or a.state == "DEAD":
            return
        rid = self._io.next_raylet_id()
        self._creates[rid] = a
        a.create_msg = {k: v for k, v in a.create_msg.items() if k != "grant_or_reject"}
        a.create_msg["r"] = rid
        self._io.raylet_send(a.create_msg)

    # -------------------------------------------------------------- handles
    def handle_added(self, actor_id: bytes) -> None:
        self.actor(actor_id).handles += 1

    def handle_escaped(self, actor_id: bytes) -> None:
        self.actor(actor_id).escaped = True

    def scoped_to_handles(self, actor_id: bytes) -> None:
        self.actor(actor_id).scoped = True

    def drain_released_handles(self) -> None:
        """Apply queued ``ActorHandle.__del__`` decrements: when the last handle
        of an actor that never left this process goes, the actor ends once
        its queued calls are done."""
        released = object_ref._released_actor_handles
        while released:
            try:
                actor_id = released.popleft()
            except IndexError:
                return
            a = self.actors.get(actor_id)
            if a is None:
                continue
            a.handles -= 1
            if a.handles <= 0 and a.scoped and not a.escaped:
                a.released = True
                self._maybe_end(a)

    def _maybe_end(self, a: ActorConn) -> None:
        if a.released and not a.queue and not a.inflight and a.state != "DEAD":
            a.released = False
            self._io.send_to(self._managing_raylet(a), {
                "t": "kill_actor", "actor_id": a.actor_id, "no_restart": True,
                "cause": "all handles to the actor went out of scope"})

    def _managing_raylet(self, a: ActorConn | None) -> RemoteRaylet | None:
        """The raylet that manages an actor: the one on the node its row names
        (None: ours, which also ends actors that no live raylet manages)."""
        if a is None:
            return None
        node = a.node_id
        if not node:
            if a.raylet is not None and not a.raylet.dead:
                return a.raylet  # a creation being placed by the raylet it spilled to
            if a.create_task is not None:
                return None  # our raylet is placing it
            try:  # a handle we never followed: its row says where it lives
                rec = self._gcs.table_get("actors", a.actor_id)
            except Exception:
                return None
            node = (rec.get("node_id") or b"") if isinstance(rec, dict) else b""
        if not node or node == self._node_id:
            return None
        if a.raylet is not None and not a.raylet.dead and a.raylet.node_id == node:
            return a.raylet
        try:
            rows = self._gcs.get_nodes()
        except Exception:
            return None
        row = next((r for r in rows if r.get("node_id") == node), None)
        if row is None or row.get("state") != "ALIVE":
            return None
        a.raylet = self._io.remote_raylet(row.get("raylet_address", ""), node)
        return a.raylet

    def kill(self, actor_id: bytes, no_restart: bool) -> None:
        """Kill an actor: the raylet ends its process, and from now on no call
        made here reaches the old incarnation.

        Calls go straight to the actor's socket while the kill goes through
        the raylet, so without the local step a call made after ``kill``
        could overtake it and run.
        """
        a = self.actors.get(actor_id)
        self._io.send_to(self._managing_raylet(a), {"t": "kill_actor", "actor_id": actor_id,
                                                    "no_restart": no_restart})
        if a is None or a.state == "DEAD":
            return
        create = a.create_task
        if create is not None and create.unresolved:
            # Its creation never reached the raylet: it never will.
            create.cancelled = True
            a.create_task = None
            self._task_done(create, "FAILED")
            no_restart = True
        if no_restart:
            a.state = "DEAD"
            a.dead_wire = actor_died_wire(a.actor_id, "the actor was killed by kill()")
            self.pump(a)
        elif a.sock is not None:
            self.conn_lost(a, "killed by kill() to restart")

    # ------------------------------------------------------------- shutdown
    def raylet_lost(self) -> None:
        """Single node: the raylet's workers, actors included, die with it."""
        for a in self.actors.values():
            a.state = "DEAD"
            a.dead_wire = actor_died_wire(a.actor_id, "lost the connection to the local raylet")
            self.pump(a)

    def shutdown(self) -> None:
        """Close every actor connection (lock held)."""
        for a in self.actors.values():
            if a.sock is not None:
                a.sock.close()
                a.sock, a.dead = None, True

    def close(self) -> None:
        """Drop the gcsd subscription (after the I/O thread has stopped)."""
        if self._sub:
            self._sub.close()


def _maybe_orphan(rec: Any, a: ActorConn, my_node: bytes) -> bool:
    """A row that may be stuck on a dead node: the incarnation we lost (still
    ALIVE), or one being created or restarted on another node."""
    if not isinstance(rec, dict) or not rec.get("node_id") or rec["node_id"] == my_node:
        return False
    state = rec.get("state")
    if state == "ALIVE":
        return (rec.get("pid"), rec["node_id"]) == (a.lost_pid, a.lost_node)
    return state in ("PENDING_CREATION", "RESTARTING")
