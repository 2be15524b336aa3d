"""The control store's request state machine: maps in, replies and publications out.

Theory of operation
-------------------
gcsd keeps Ray's GCS tables (nodes, jobs, functions, actors, objects, tasks,
lineage, kv) and tells subscribers about every change. :class:`ControlStore`
holds all of that logic and none of the I/O, in the manner of h11 and
raft's ``RawNode``: the shell feeds it one request at a time with
:meth:`ControlStore.receive` (raw frame) or :meth:`ControlStore.step`
(decoded map), and calls :meth:`ControlStore.tick` on a timer. Each call
returns an :class:`Outcome` holding

* ``reply``: the map to send back, or None for a one-way request (one with
  no ``"r"`` id, such as heartbeats and task-event batches);
* ``publications``: the changes to emit on the PUB socket, in order;
* ``notices``: log events the shell should write.

Ordering contract: by the time an Outcome is returned its writes are
committed (see :mod:`daemons.gcsd.replication`), so the shell may publish
and reply in any order. It publishes first, so that a client which sees
its reply and then subscribes has missed nothing it could have seen.

Time is an argument: ``now`` is a monotonic clock used for node liveness,
``wall`` is Unix time recorded in node records for humans. The core never
reads a clock, never sleeps and never touches a socket, so the unit tests
drive it directly and advance time by passing bigger numbers.

Faults are told apart by who caused them. A request that is undecodable,
names an unknown method or table, or has a field of the wrong type is the
remote's fault (:class:`~libclient.protocol.ProtocolError`): it gets an
error reply (if it had an id) and a warning, and changes nothing. A failed
write (disk or map full) is ours (:class:`~daemons.gcsd.tables.StorageError`):
an error reply and an error log line, and again nothing changes, because a
batch commits atomically or not at all. Neither stops the daemon.

Nodes: ``register_node`` stores the node's record with ``state="ALIVE"``;
each heartbeat refreshes it. A node unheard for ``node_timeout_s`` is
marked ``DEAD`` on the next tick; ``unregister_node`` does the same at
once. As in Ray, DEAD is final for that registration: heartbeats from a
dead node are refused until it registers again. After a restart, nodes
recorded ALIVE get a fresh timeout from the moment the store is created.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daemons.gcsd.liveness import Liveness
from daemons.gcsd.replication import Committed, Replication
from daemons.gcsd.tables import (
    META,
    PUBLIC_TABLES,
    Delete,
    EncodedPut,
    Op,
    Put,
    PutMany,
    StorageError,
    decode_value,
    encode_value,
)
from libclient.protocol import ProtocolError, decode_body
from libclient.protocol import field as _field

ALIVE = "ALIVE"
DEAD = "DEAD"

_KV_SEP = b"\x00"
_JOB_COUNTER = b"job_counter"
# LMDB's compiled-in key limit (and it refuses empty keys); checked here so a
# bad key is the client's error, not a storage failure.
MAX_KEY_BYTES = 511


@dataclass(frozen=True, slots=True)
class Publication:
    """One committed change, as sent on the PUB socket under topic ``table``."""

    table: str
    op: str  # "put" | "delete"
    key: bytes
    value: Any
    seq: int

    def body(self) -> dict[str, Any]:
        return {"table": self.table, "op": self.op, "key": self.key,
                "value": self.value, "seq": self.seq}


@dataclass(frozen=True, slots=True)
class Notice:
    """A log event for the shell to write: ``log.<level>(event, **fields)``."""

    level: str
    event: str
    fields: dict[str, Any]


@dataclass(slots=True)
class Outcome:
    """What one input produced. See the module docstring for the ordering contract."""

    reply: dict[str, Any] | None = None
    publications: list[Publication] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)


@dataclass(slots=True)
class _Effect:
    """A handler's plan: result fields, ops to commit, and what to do once committed."""

    result: dict[str, Any] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    heard: list[bytes] = field(default_factory=list)
    forget: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class Prepared:
    """A request checked and planned but not yet committed (see ControlStore.prepare)."""

    rid: int | None
    method: Any
    effect: _Effect = field(default_factory=_Effect)
    rejected: Outcome | None = None


_Handler = Callable[[dict[str, Any], float, float], _Effect]


class ControlStore:
    """gcsd's pure core. Not thread-safe: the shell calls it from one thread.

    Args:
        shard: where reads come from and writes are committed.
        node_timeout_s: silence after which a node is declared DEAD.
        pubsub_address: advertised by the ``info`` method.
        version: advertised by the ``info`` method.
        now: the caller's monotonic time at creation; nodes recorded ALIVE
            by a previous run are timed from here.
    """

    def __init__(self, shard: Replication, *, node_timeout_s: float, pubsub_address: str,
                 version: str, now: float) -> None:
        self.shard = shard
        self.liveness = Liveness(node_timeout_s)
        self.pubsub_address = pubsub_address
        self.version = version
        self._handlers: dict[str, _Handler] = {
            "ping": self._step_ping,
            "info": self._step_info,
            "kv_put": self._step_kv_put,
            "kv_get": self._step_kv_get,
            "kv_del": self._step_kv_del,
            "kv_keys": self._step_kv_keys,
            "kv_exists": self._step_kv_exists,
            "put": self._step_put,
            "get": self._step_get,
            "delete": self._step_delete,
            "scan": self._step_scan,
            "put_batch": self._step_put_batch,
            "next_job_id": self._step_next_job_id,
            "register_node": self._step_register_node,
            "heartbeat": self._step_heartbeat,
            "unregister_node": self._step_unregister_node,
            "get_nodes": self._step_get_nodes,
        }
        self.reset_liveness(now)

    @property
    def methods(self) -> list[str]:
        return sorted(self._handlers)

    # ------------------------------------------------------------ inputs
    def receive(self, frame: bytes, now: float, wall: float) -> Outcome:
        """Handle one raw request frame (a msgpack map), however malformed.

        Args:
            frame: the request body as received.
            now: monotonic time. wall: Unix time.

        Returns:
            The Outcome; for a frame that is not a valid request, an error
            reply if an integer ``"r"`` could be read from it, else none.
        """
        try:
            msg = decode_body(frame)
        except ProtocolError as exc:
            return _rejected(_salvage_rid(frame), None, str(exc))
        return self.step(msg, now, wall)

    def step(self, msg: dict[str, Any], now: float, wall: float) -> Outcome:
        """Handle one decoded request map, committing through ``self.shard``.

        Returns:
            An Outcome whose writes, if any, are committed.
        """
        prep = self.prepare(msg, now, wall)
        if prep.rejected is not None:
            return prep.rejected
        effect = prep.effect
        try:
            committed = self.shard.commit(effect.ops) if effect.ops else []
        except StorageError as exc:
            out = _rejected(prep.rid, prep.method, str(exc))
            out.notices = [Notice("error", "storage_error", {"method": prep.method,
                                                              "error": str(exc)})]
            return out
        self.settle(effect, now)
        reply = None if prep.rid is None else {"r": prep.rid, "ok": True, **effect.result}
        return Outcome(reply, _publications(committed), effect.notices)

    def prepare(self, msg: dict[str, Any], now: float, wall: float) -> Prepared:
        """Validate a request and plan it against the current state, changing nothing.

        The chain shell calls this at the head, proposes ``effect.ops`` and
        answers with ``effect.result`` once they commit; then it calls
        :meth:`settle`.
        """
        method = msg.get("t")
        rid = msg.get("r")
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            # Without a usable id the sender could not match a reply anyway.
            return Prepared(None, method, rejected=_rejected(
                None, method, f"request id 'r' has type {type(rid).__name__}"))
        handler = self._handlers.get(method) if isinstance(method, str) else None
        if handler is None:
            return Prepared(rid, method, rejected=_rejected(rid, method,
                                                            f"unknown method {method!r}"))
        try:
            effect = handler(msg, now, wall)
        except ProtocolError as exc:
            return Prepared(rid, method, rejected=_rejected(rid, method, str(exc)))
        return Prepared(rid, method, effect)

    def settle(self, effect: _Effect, now: float) -> None:
        """Record the liveness side of an effect whose ops were accepted."""
        for node_id in effect.heard:
            self.liveness.heard(node_id, now)
        for node_id in effect.forget:
            self.liveness.forget(node_id)

    def reset_liveness(self, now: float) -> None:
        """Time every node recorded ALIVE afresh from ``now`` (a new head, a restart)."""
        for node_id, record in self.shard.scan("nodes"):
            if isinstance(record, dict) and record.get("state") == ALIVE:
                self.liveness.heard(node_id, now)

    def plan_tick(self, now: float, wall: float) -> tuple[list[Op], list[Notice]]:
        """The writes that declare silent nodes DEAD, without committing them."""
        ops: list[Op] = []
        notices: list[Notice] = []
        for node_id in self.liveness.expired(now):
            record = self.shard.read("nodes", node_id)
            if not isinstance(record, dict) or record.get("state") != ALIVE:
                continue
            ops.append(Put("nodes", node_id, _dead(record, wall, "heartbeat timeout")))
            notices.append(Notice("warning", "node_dead", {"node": node_id.hex(),
                                                           "reason": "heartbeat timeout"}))
        return ops, notices

    def tick(self, now: float, wall: float) -> Outcome:
        """Advance time: declare DEAD every node silent for longer than the timeout."""
        ops, notices = self.plan_tick(now, wall)
        if not ops:
            return Outcome()
        try:
            committed = self.shard.commit(ops)
        except StorageError as exc:
            # Watch them again so the next tick retries the write.
            for op in ops:
                self.liveness.heard(op.key, now - self.liveness.timeout_s)
            return Outcome(notices=[Notice("error", "storage_error",
                                           {"method": "tick", "error": str(exc)})])
        return Outcome(None, _publications(committed), notices)

    # ------------------------------------------------------------ basics
    def _step_ping(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        return _Effect()

    def _step_info(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        return _Effect({"pubsub": self.pubsub_address, "version": self.version,
                        "seq": self.shard.last_seq, "methods": self.methods})

    # ------------------------------------------------------------ kv
    def _step_kv_put(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        key = _kv_key(msg)
        value = _field(msg, "value", bytes)
        overwrite = _field(msg, "overwrite", bool, True)
        exists = self.shard.read("kv", key) is not None
        if exists and not overwrite:
            return _Effect({"added": False})
        return _Effect({"added": not exists}, [Put("kv", key, value)])

    def _step_kv_get(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        return _Effect({"value": self.shard.read("kv", _kv_key(msg))})

    def _step_kv_del(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        key = _kv_key(msg)
        if self.shard.read("kv", key) is None:
            return _Effect({"deleted": False})
        return _Effect({"deleted": True}, [Delete("kv", key)])

    def _step_kv_keys(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        ns = _namespace(msg)
        prefix = _field(msg, "prefix", bytes, b"")
        head = len(ns) + 1
        keys = [k[head:] for k, _ in self.shard.scan("kv", ns + _KV_SEP + prefix)]
        return _Effect({"keys": keys})

    def _step_kv_exists(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        return _Effect({"exists": self.shard.read("kv", _kv_key(msg)) is not None})

    # ------------------------------------------------------------ tables
    def _step_put(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        table, key = _table(msg), _key(msg, "key")
        if "value" not in msg:
            raise ProtocolError("message 'put' lacks field 'value'")
        return _Effect({}, [Put(table, key, msg["value"])])

    def _step_get(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        return _Effect({"value": self.shard.read(_table(msg), _key(msg, "key"))})

    def _step_delete(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        table, key = _table(msg), _key(msg, "key")
        if self.shard.read(table, key) is None:
            return _Effect({"deleted": False})
        return _Effect({"deleted": True}, [Delete(table, key)])

    def _step_scan(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        table = _table(msg)
        prefix = _field(msg, "prefix", bytes, b"")
        limit = _field(msg, "limit", (int, type(None)), None)
        if limit is not None and limit < 0:
            raise ProtocolError("field 'limit' must be >= 0")
        items = [[k, v] for k, v in self.shard.scan(table, prefix, limit)]
        return _Effect({"items": items})

    def _step_put_batch(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        table = _table(msg)
        items = _field(msg, "items", list)
        flat: list[bytes] = []
        for item in items:
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise ProtocolError("each of 'items' must be a [key, value] pair")
            key, value = item
            if not isinstance(key, bytes) or not 0 < len(key) <= MAX_KEY_BYTES:
                raise ProtocolError(f"each key of 'items' must be 1 to {MAX_KEY_BYTES} bytes")
            flat += (key, encode_value(value))
        # One op for the batch: replicas store and forward it without a
        # Python-level step per key (see PutMany).
        return _Effect({}, [PutMany(table, tuple(flat))] if flat else [])

    def _step_next_job_id(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        job_id = (self.shard.read(META, _JOB_COUNTER) or 0) + 1
        return _Effect({"job_id": job_id}, [Put(META, _JOB_COUNTER, job_id)])

    # ------------------------------------------------------------ nodes
    def _step_register_node(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        node_id = _key(msg, "node_id")
        info = _field(msg, "info", dict)
        record = dict(info)
        resources = record.get("resources")
        if not isinstance(resources, dict):
            resources = {}
        record.update(node_id=node_id, state=ALIVE, registered_at=wall, last_heartbeat=wall,
                      resources=resources)
        if not isinstance(record.get("available"), dict):
            record["available"] = dict(resources)
        record.pop("death_reason", None)
        notice = Notice("info", "node_registered", {"node": node_id.hex(),
                                                    "resources": resources})
        return _Effect({}, [Put("nodes", node_id, record)], [notice], heard=[node_id])

    def _step_heartbeat(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        """Liveness, and free resources when they changed.

        A heartbeat without ``available`` only refreshes the node's timer: no
        write, so nothing is published to the cluster. Raylets send the map
        only when it changed, which keeps an idle 1,000-node cluster from
        publishing 1,000 node rows a second to every raylet.
        """
        node_id = _key(msg, "node_id")
        if "available" not in msg:
            self._alive_node(node_id)
            return _Effect({}, [], heard=[node_id])
        available = _field(msg, "available", dict)
        for name, amount in available.items():
            if (not isinstance(name, str) or isinstance(amount, bool)
                    or not isinstance(amount, int | float)):
                raise ProtocolError("field 'available' must map resource names to numbers")
        record = self._alive_node(node_id)
        version = msg.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            record["version"] = version
        record.update(available=available, last_heartbeat=wall)
        if "total" in msg:  # the node's total changed (placement-group bundles come and go)
            total = _field(msg, "total", dict)
            if not all(isinstance(k, str) and not isinstance(v, bool) and isinstance(v, int | float)
                       for k, v in total.items()):
                raise ProtocolError("field 'total' must map resource names to numbers")
            record["resources"] = total
        return _Effect({}, [Put("nodes", node_id, record)], heard=[node_id])

    def _step_unregister_node(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        node_id = _key(msg, "node_id")
        record = self.shard.read("nodes", node_id)
        if not isinstance(record, dict):
            raise ProtocolError(f"node {node_id.hex()} is not registered")
        if record.get("state") != ALIVE:
            return _Effect(forget=[node_id])
        notice = Notice("info", "node_dead", {"node": node_id.hex(), "reason": "unregistered"})
        return _Effect({}, [Put("nodes", node_id, _dead(record, wall, "unregistered"))],
                       [notice], forget=[node_id])

    def _step_get_nodes(self, msg: dict[str, Any], now: float, wall: float) -> _Effect:
        nodes = []
        for node_id, record in self.shard.scan("nodes"):
            if isinstance(record, dict):
                nodes.append({**record, "node_id": node_id})
        return _Effect({"nodes": nodes})

    def _alive_node(self, node_id: bytes) -> dict[str, Any]:
        record = self.shard.read("nodes", node_id)
        if not isinstance(record, dict):
            raise ProtocolError(f"node {node_id.hex()} is not registered")
        if record.get("state") != ALIVE:
            raise ProtocolError(f"node {node_id.hex()} is {record.get('state')}; "
                                f"register it again")
        return record


# ---------------------------------------------------------------- helpers
def _rejected(rid: int | None, method: Any, error: str) -> Outcome:
    """The Outcome for a request that is the sender's fault: it changes nothing."""
    reply = None if rid is None else {"r": rid, "ok": False, "error": error}
    notice = Notice("warning", "bad_request", {"method": method if isinstance(method, str)
                                               else repr(method), "error": error})
    return Outcome(reply, [], [notice])


def _salvage_rid(frame: bytes) -> int | None:
    """Find an integer ``"r"`` in a frame that failed validation, to aim the error reply."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types
        return None
    rid = msg.get("r") if isinstance(msg, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def _publications(committed: list[Committed]) -> list[Publication]:
    pubs = []
    for c in committed:
        if c.op.table == META:
            continue  # internal bookkeeping is nobody's business
        if isinstance(c.op, Put):
            pubs.append(Publication(c.op.table, "put", c.op.key, c.op.value, c.seq))
        elif isinstance(c.op, EncodedPut):
            pubs.append(Publication(c.op.table, "put", c.op.key, decode_value(c.op.data), c.seq))
        else:
            pubs.append(Publication(c.op.table, "delete", c.op.key, None, c.seq))
    return pubs


def _dead(record: dict[str, Any], wall: float, reason: str) -> dict[str, Any]:
    return {**record, "state": DEAD, "death_reason": reason, "died_at": wall}


def _table(msg: dict[str, Any]) -> str:
    table = _field(msg, "table", str)
    if table not in PUBLIC_TABLES:
        raise ProtocolError(f"unknown table {table!r}; tables are {', '.join(PUBLIC_TABLES)}")
    return table


def _key(msg: dict[str, Any], name: str) -> bytes:
    key = _field(msg, name, bytes)
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ProtocolError(f"field {name!r} is {len(key)} bytes; keys are 1 to "
                            f"{MAX_KEY_BYTES} bytes")
    return key


def _namespace(msg: dict[str, Any]) -> bytes:
    ns = _field(msg, "ns", str).encode()
    if _KV_SEP in ns:
        raise ProtocolError("field 'ns' must not contain NUL")
    return ns


def _kv_key(msg: dict[str, Any]) -> bytes:
    key = _namespace(msg) + _KV_SEP + _field(msg, "key", bytes)
    if len(key) > MAX_KEY_BYTES:
        raise ProtocolError(f"namespace plus key is {len(key)} bytes; "
                            f"the limit is {MAX_KEY_BYTES}")
    return key
