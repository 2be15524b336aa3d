"""The raylet's actor directory: lifecycle decisions for this node's actors.

Theory of operation
-------------------
An actor is a worker process dedicated to one instance of a class. The raylet
creates it (schedules a lease for its resources, hands it a worker, sends the
worker ``actor_init``), watches the process, and restarts it after a crash up
to ``max_restarts`` times, running ``__init__`` again. Callers never go
through the raylet: they read the actor's socket from gcsd's ``actors`` table
and call the worker directly.

This module only decides. ``ActorDirectory`` takes events (created, ready,
init failed, process died, owner gone, killed) and returns what should happen
as plain values; the shell (server.py) starts processes, sends messages and
writes gcsd. No sockets, clocks or processes here.

States (Ray's): PENDING_CREATION -> ALIVE -> (RESTARTING -> ALIVE)* -> DEAD.
DEAD is final.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PENDING = "PENDING_CREATION"
ALIVE = "ALIVE"
RESTARTING = "RESTARTING"
DEAD = "DEAD"


@dataclass
class ActorRecord:
    actor_id: bytes
    spec: dict[str, Any]  # opaque to the raylet except the fields read below
    demand: dict[str, float]
    owner_conn: int | None  # None once detached from its creator
    max_restarts: int
    state: str = PENDING
    num_restarts: int = 0
    pid: int = 0
    socket: str = ""
    address: str = ""  # "host:port" callers on other nodes use
    death_cause: str = ""
    no_restart: bool = False
    worker_id: bytes | None = None
    create_r: int | None = None  # the creator's request id, answered once
    strategy: Any = None  # the creation's strategy as it came on the wire
    owner_node: bytes = b""  # the creator's node (fate-sharing when that node dies)

    def public(self, node_id: bytes) -> dict[str, Any]:
        """The row written to gcsd's actors table."""
        spec = self.spec
        return {"actor_id": self.actor_id, "state": self.state, "node_id": node_id,
                "pid": self.pid, "socket": self.socket, "address": self.address,
                "num_restarts": self.num_restarts,
                "max_restarts": self.max_restarts, "death_cause": self.death_cause,
                "class_name": spec.get("class_name", ""), "job": spec.get("job", 0),
                "name": spec.get("name", ""), "namespace": spec.get("namespace", ""),
                "detached": bool(spec.get("detached")), "meta": spec.get("meta", {})}


@dataclass(frozen=True)
class Restart:
    record: ActorRecord


@dataclass(frozen=True)
class Dead:
    record: ActorRecord


@dataclass
class ActorDirectory:
    """Actors hosted by this raylet. Not thread-safe."""

    actors: dict[bytes, ActorRecord] = field(default_factory=dict)

    def create(self, actor_id: bytes, spec: dict[str, Any], demand: dict[str, float],
               owner_conn: int, create_r: int) -> ActorRecord:
        if actor_id in self.actors:
            raise ValueError("actor id already exists")
        max_restarts = spec.get("max_restarts", 0)
        if not isinstance(max_restarts, int) or max_restarts < -1:
            raise ValueError("max_restarts must be an int >= -1")
        record = ActorRecord(actor_id, spec, demand,
                             None if spec.get("detached") else owner_conn,
                             (1 << 30) if max_restarts == -1 else max_restarts,
                             create_r=create_r)
        self.actors[actor_id] = record
        return record

    def adopt(self, actor_id: bytes, spec: dict[str, Any], demand: dict[str, float],
              max_restarts: int, num_restarts: int, strategy: Any,
              owner_node: bytes) -> ActorRecord:
        """Take over an actor whose node died (actor_failover): it restarts
        here, with no creator connection until its owner re-registers."""
        old = self.actors.get(actor_id)
        if old is not None and old.state != DEAD:
            raise ValueError("actor is already managed here")
        record = ActorRecord(actor_id, spec, demand, None, max_restarts, state=RESTARTING,
                             num_restarts=num_restarts, strategy=strategy,
                             owner_node=owner_node)
        self.actors[actor_id] = record
        return record

    def reown(self, actor_id: bytes, conn_id: int) -> bool:
        """The creator of a non-detached actor taken over here registers again:
        the actor ends when that connection does, as before the takeover."""
        record = self.actors.get(actor_id)
        if (record is None or record.state == DEAD or record.owner_conn is not None
                or record.spec.get("detached")):
            return False
        record.owner_conn = conn_id
        return True

    def owner_node_died(self, node_id: bytes) -> list[ActorRecord]:
        """Non-detached actors whose creator ran on a node that died: they die too."""
        out = []
        for record in self.actors.values():
            if (record.owner_node == node_id and record.state != DEAD
                    and not record.spec.get("detached")):
                record.no_restart = True
                record.death_cause = (f"the actor's owner's node {node_id.hex()} died "
                                      "(a non-detached actor shares its owner's fate)")
                out.append(record)
        return out

    def ready(self, actor_id: bytes, pid: int, socket: str,
              address: str = "") -> ActorRecord | None:
        record = self.actors.get(actor_id)
        if record is None or record.state == DEAD:
            return None
        record.state, record.pid, record.socket, record.address = ALIVE, pid, socket, address
        return record

    def init_failed(self, actor_id: bytes, cause: str) -> ActorRecord | None:
        """``__init__`` raised: the actor is dead, never restarted (Ray's rule)."""
        return self._die(actor_id, cause)

    def process_died(self, actor_id: bytes, cause: str) -> Restart | Dead | None:
        record = self.actors.get(actor_id)
        if record is None or record.state == DEAD:
            return None
        if record.no_restart or record.num_restarts >= record.max_restarts:
            cause = record.death_cause or cause
            return Dead(self._die(actor_id, cause))  # type: ignore[arg-type]
        record.num_restarts += 1
        record.state, record.pid, record.socket, record.worker_id = RESTARTING, 0, "", None
        record.address = ""
        return Restart(record)

    def kill(self, actor_id: bytes, no_restart: bool,
             cause: str = "killed by kill()") -> ActorRecord | None:
        record = self.actors.get(actor_id)
        if record is None or record.state == DEAD:
            return None
        if no_restart:
            record.no_restart = True
            record.death_cause = cause
        return record

    def owner_gone(self, conn_id: int) -> list[ActorRecord]:
        """Actors whose creator disconnected; they die with it (unless detached)."""
        out = []
        for record in self.actors.values():
            if record.owner_conn == conn_id and record.state != DEAD:
                record.no_restart = True
                record.death_cause = "the actor's owner (its creating process) exited"
                out.append(record)
        return out

    def _die(self, actor_id: bytes, cause: str) -> ActorRecord | None:
        record = self.actors.get(actor_id)
        if record is None:
            return None
        record.state, record.death_cause = DEAD, cause
        record.pid, record.socket, record.worker_id, record.address = 0, "", None, ""
        return record

    def by_worker(self, worker_id: bytes) -> ActorRecord | None:
        for record in self.actors.values():
            if record.worker_id == worker_id and record.state != DEAD:
                return record
        return None
