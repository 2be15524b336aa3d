"""Client for gcsd, the control store: routes by shard, writes to heads, reads from tails.

Every request is one ZeroMQ frame, a msgpack map ``{"t": method, "r": id,
...}``; gcsd answers ``{"r": id, "ok": True, ...}`` or ``{"r": id, "ok":
False, "error": ...}``. A message without ``"r"`` is one-way: gcsd sends
nothing back, which is what makes heartbeats and task-event batches cheap.

Addresses. ``GcsClient("tcp://h:p")`` names one gcsd member; a
comma-separated list names several (``"tcp://a:6379,tcp://b:6379"``). On
first use the client asks a member for the layout (``config``: members,
number of shards, each shard's epoch and chain) and from then on sends each
request straight to where it belongs:

* a key's shard is ``crc32(table + NUL + key) % N`` (:func:`shard_of`);
* writes go to the shard's head, reads to its tail, scans to every tail;
* ``put_batch`` is split by shard and the parts are sent together.

Retries. Every request carries this client's random id ``"c"`` and a
request id ``"r"`` that stays the same across retries, so a write retried
after a reconfiguration (the head died after applying it, say) is applied
once: the new head recognises it and answers what the first attempt got.
A member that is not the right head/tail, or is at another epoch, answers
``{"ok": False, "retry": True}``; no answer within a short attempt timeout
counts the same. Either way the client re-reads the layout (from any
member) and tries again until ``timeout`` runs out; then it raises
:class:`GcsUnavailableError`. The longest stall is about the master's
failure-detection time plus one attempt timeout.

One ZeroMQ context serves the whole process (``zmq.Context.instance()``,
which pyzmq recreates after a fork). ZeroMQ sockets are not thread-safe, so
:class:`GcsClient` serialises its sockets behind a lock. Replies are matched
by request id, so a late reply to an abandoned attempt is simply dropped.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from libclient import security
from libclient.protocol import encode_body

# A write normally commits in a millisecond or two; no answer in this long
# means the member is gone or being replaced, so look at the layout again.
ATTEMPT_TIMEOUT_S = 0.25
# How long to wait for one member to describe the layout.
CONFIG_TIMEOUT_S = 0.25
# While a member is silent, how often to look for the chain that replaces it.
CONFIG_POLL_S = 0.03
# How long a one-way send may wait for the client (another thread's call,
# normally a millisecond or two) and for a layout: it is best-effort, and
# its callers are I/O loops.
ONEWAY_LOCK_S = 0.01
ONEWAY_LAYOUT_S = 0.25
# One-way senders never hear that the chain moved (a refused one-way message
# has no reply), so they look at the layout again this often.
ONEWAY_RECHECK_S = 2.0
_ANY_METHODS = frozenset({"ping", "info", "config"})


class GcsError(Exception):
    """gcsd refused a request; the message is gcsd's reason."""


class GcsUnavailableError(GcsError):
    """gcsd did not answer in time (down, unreachable, or overloaded)."""


# ---------------------------------------------------------------- routing
# Which replica serves what (shared with gcsd, which imports these).
READ_METHODS = frozenset({"kv_get", "kv_exists", "get"})
FANOUT_METHODS = frozenset({"kv_keys", "scan", "get_nodes"})  # read every shard's tail
WRITE_METHODS = frozenset({"kv_put", "kv_del", "put", "delete", "next_job_id",
                           "register_node", "heartbeat", "unregister_node", "put_batch"})
JOB_COUNTER = ("meta", b"job_counter")


def shard_of(table: str, key: bytes, shards: int) -> int:
    """The shard of ``table[key]``: a stable hash (crc32), the same in every process."""
    return zlib.crc32(table.encode() + b"\x00" + key) % shards


def table_hash(table: str) -> int:
    """The crc32 state after ``table`` and its separator: ``crc32(key, it)`` hashes a key.

    Equal to what shard_of computes, without joining bytes per key (batches).
    """
    return zlib.crc32(table.encode() + b"\x00")


def route_key(method: str, fields: dict[str, Any]) -> tuple[str, bytes] | None:
    """The ``(table, key)`` a single-key request touches, or None if it names none.

    None also for malformed fields: such a request goes anywhere and gcsd
    answers with the validation error.
    """
    if method in ("kv_get", "kv_exists", "kv_put", "kv_del"):
        ns, key = fields.get("ns"), fields.get("key")
        if isinstance(ns, str) and isinstance(key, bytes):
            return "kv", ns.encode() + b"\x00" + key
        return None
    if method in ("put", "get", "delete"):
        table, key = fields.get("table"), fields.get("key")
        return (table, key) if isinstance(table, str) and isinstance(key, bytes) else None
    if method == "next_job_id":
        return JOB_COUNTER
    if method in ("register_node", "heartbeat", "unregister_node"):
        node = fields.get("node_id")
        return ("nodes", node) if isinstance(node, bytes) else None
    return None


def _context() -> zmq.Context:
    return zmq.Context.instance()


def _decode(frame: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types
        raise GcsError("gcsd sent an undecodable reply") from None
    if not isinstance(msg, dict):
        raise GcsError("gcsd sent a reply that is not a map")
    return msg


def _bytes(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else key


@dataclass
class Layout:
    """Where every shard lives, as the members last told us."""

    members: list[str]
    shards: int
    epochs: list[int]
    chains: list[list[int]]

    def head(self, shard: int) -> str:
        return self.members[self.chains[shard][0]]

    def tail(self, shard: int) -> str:
        return self.members[self.chains[shard][-1]]


def merge_replies(method: str, fields: dict[str, Any],
                  replies: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-shard answers to a scan-like request (shared with gcsd)."""
    if method == "scan":
        items = sorted((it for r in replies for it in r.get("items", [])), key=lambda i: i[0])
        limit = fields.get("limit")
        if isinstance(limit, int) and not isinstance(limit, bool):
            items = items[:limit]
        return {"items": items}
    if method == "kv_keys":
        return {"keys": sorted(k for r in replies for k in r.get("keys", []))}
    return {"nodes": [n for r in replies for n in r.get("nodes", [])]}


@dataclass
class _Part:
    shard: int | None  # None: any member (unroutable or shard-less requests)
    fields: dict[str, Any]
    write: bool
    rid: int
    reply: dict[str, Any] | None = None


class GcsClient:
    """A thread-safe client of a gcsd deployment (one member or many).

    Args:
        address: one member's request address, e.g. ``"tcp://127.0.0.1:6379"``,
            or several, comma-separated.
        timeout: seconds a call may take, retries included (or to queue a send).
    """

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.addresses = [a.strip() for a in address.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError("GcsClient needs at least one address")
        self.timeout = timeout
        self._lock = threading.Lock()
        # Also the routing id of every socket, so a chain's tail can answer
        # us directly (ZeroMQ reserves ids that start with a zero byte).
        self._cid = b"c" + os.urandom(8)
        self._up: set[str] = set()  # members that have answered on their socket
        self._rids = itertools.count(1)
        self._socks: dict[str, zmq.Socket] = {}
        self._layout: Layout | None = None
        self._stale = False
        self._layout_at = 0.0  # monotonic time of the last layout read
        self._closed = False
        self._next_member = 0
        self.retries = 0  # attempts that had to be repeated (for tests and benchmarks)

    # ------------------------------------------------------------ sockets
    def _sock(self, address: str) -> zmq.Socket:
        if self._closed:
            raise GcsError("GcsClient is closed")
        sock = self._socks.get(address)
        if sock is None:
            sock = _context().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, self._cid)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            security.curve_client(sock)  # the cluster's CURVE keys, if it has them
            sock.connect(address)
            self._socks[address] = sock
        return sock

    def _drop_sock(self, address: str) -> None:
        """Forget a socket whose peer stopped answering, with whatever it had queued."""
        sock = self._socks.pop(address, None)
        self._up.discard(address)
        if sock is not None:
            sock.close(linger=0)

    def _send(self, address: str, msg: dict[str, Any]) -> bool:
        return self._send_frames(address, [encode_body(msg)])

    def _send_frames(self, address: str, frames: list[bytes]) -> bool:
        """Send frames as one message (gcsd reads each as a request); False if full."""
        try:
            self._sock(address).send_multipart(frames, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _collect(self, waiting: dict[int, Any], deadline: float) -> dict[int, dict[str, Any]]:
        """Wait until every rid in ``waiting`` is answered or ``deadline`` passes."""
        got: dict[int, dict[str, Any]] = {}
        poller = zmq.Poller()
        where: dict[zmq.Socket, str] = {}
        for address, sock in self._socks.items():
            poller.register(sock, zmq.POLLIN)
            where[sock] = address
        while len(got) < len(waiting):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for sock, _ev in poller.poll(max(1, int(remaining * 1000))):
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    reply = _decode(frame)
                    self._up.add(where[sock])
                    rid = reply.get("r")
                    if rid in waiting:
                        got[rid] = reply
                    # else: the answer to an attempt we already gave up on
        return got

    # ------------------------------------------------------------ layout
    def _refresh(self, deadline: float, avoid: set[str] = frozenset()) -> bool:
        """Ask members for the layout; keep, per shard, the highest epoch heard."""
        known = self._layout.members if self._layout and len(self._layout.members) > 1 else []
        candidates = list(dict.fromkeys([*known, *self.addresses]))
        n = len(candidates)
        order = [candidates[(self._next_member + i) % n] for i in range(n)]
        order.sort(key=lambda a: a in avoid)
        self._next_member += 1
        for address in order:
            if time.monotonic() >= deadline:
                return False
            rid = next(self._rids)
            if not self._send(address, {"t": "config", "r": rid}):
                continue
            got = self._collect({rid: None}, min(deadline, time.monotonic() + CONFIG_TIMEOUT_S))
            reply = got.get(rid)
            if reply is None:
                self._drop_sock(address)
                continue
            layout = _layout(reply, address, self.addresses)
            if layout is None:
                continue
            old = self._layout
            if old is not None and old.shards == layout.shards and old.members == layout.members:
                for s in range(layout.shards):  # never go back to an older epoch
                    if old.epochs[s] > layout.epochs[s]:
                        layout.epochs[s], layout.chains[s] = old.epochs[s], old.chains[s]
            self._layout = layout
            self._stale = False
            self._layout_at = time.monotonic()
            if len(layout.members) > 1:
                # Connect to every member now: a tail can only answer a
                # client whose connection it already has (see _target).
                for member in layout.members:
                    if member not in self._up:
                        self._send(member, {"t": "ping", "r": next(self._rids)})
            return True
        return False

    def layout(self) -> Layout:
        """The current layout (fetched on first use)."""
        with self._lock:
            deadline = time.monotonic() + self.timeout
            while self._layout is None:
                if not self._refresh(deadline) and time.monotonic() >= deadline:
                    raise GcsUnavailableError(f"no gcsd member at {self.address} answered")
            return self._layout

    # ------------------------------------------------------------ transport
    def call(self, method: str, **fields: Any) -> dict[str, Any]:
        """Send a request to wherever it belongs and wait for its reply.

        Returns:
            The reply map (``ok`` is True; result fields as gcsd documents them).

        Raises:
            GcsError: gcsd answered with an error.
            GcsUnavailableError: no (usable) reply within ``timeout`` seconds.
        """
        with self._lock:
            deadline = time.monotonic() + self.timeout
            if method in _ANY_METHODS:
                return self._run(method, [_Part(None, fields, False, next(self._rids))],
                                 deadline)[0]
            parts = self._plan(method, fields, deadline)
            replies = self._run(method, parts, deadline)
        if len(replies) == 1:
            return replies[0]
        if method == "put_batch":
            return {"ok": True}
        return {"ok": True, **merge_replies(method, fields, replies)}

    def _plan(self, method: str, fields: dict[str, Any], deadline: float) -> list[_Part]:
        """Split a request into per-shard parts (one part if it has one shard)."""
        layout = self._ensure_layout(deadline)
        write = method in WRITE_METHODS
        if "s" in fields or layout is None:
            return [_Part(fields.get("s"), fields, write, next(self._rids))]
        single = len(layout.members) == 1  # one member serves every shard: let it split
        if method in FANOUT_METHODS:
            if single:
                return [_Part(None, fields, False, next(self._rids))]
            return [_Part(s, fields, False, next(self._rids)) for s in range(layout.shards)]
        if method == "put_batch":
            items, table = fields.get("items"), fields.get("table")
            if single or not isinstance(items, list) or not isinstance(table, str):
                return [_Part(None if single else 0, fields, True, next(self._rids))]
            groups: dict[int, list[Any]] = {}
            seed, n, crc32 = table_hash(table), layout.shards, zlib.crc32
            for item in items:
                key = item[0] if isinstance(item, list | tuple) and item else None
                if not isinstance(key, bytes):
                    return [_Part(0, fields, True, next(self._rids))]  # gcsd names the fault
                groups.setdefault(crc32(key, seed) % n, []).append(item)
            return [_Part(s, {**fields, "items": part}, True, next(self._rids))
                    for s, part in groups.items()]
        where = route_key(method, fields)
        shard = shard_of(*where, layout.shards) if where else None
        return [_Part(shard, fields, write, next(self._rids))]

    def _ensure_layout(self, deadline: float) -> Layout | None:
        if self._layout is None or self._stale:
            self._refresh(deadline)
        return self._layout

    def _target(self, part: _Part) -> tuple[str, dict[str, Any]]:
        layout = self._layout
        extra: dict[str, Any] = {"c": self._cid}
        if part.shard is None or layout is None or not 0 <= part.shard < layout.shards:
            address = layout.members[0] if layout and len(layout.members) == 1 else None
            return address or self.addresses[self._next_member % len(self.addresses)], extra
        s = part.shard
        extra.update(s=s, e=layout.epochs[s])
        if part.write and self._up.issuperset(layout.members):
            extra["tr"] = True  # any member may be the tail by now, and each can reach us
        return (layout.head(s) if part.write else layout.tail(s)), extra

    def _run(self, method: str, parts: list[_Part], deadline: float) -> list[dict[str, Any]]:
        """Send every part until each is answered; retry refusals and silence."""
        pending = list(parts)
        while True:
            targets: dict[int, str] = {}
            waiting: dict[int, _Part] = {}
            by_address: dict[str, list[tuple[_Part, bytes]]] = {}
            for part in pending:
                address, extra = self._target(part)
                frame = encode_body({**part.fields, **extra, "t": method, "r": part.rid})
                by_address.setdefault(address, []).append((part, frame))
            for address, group in by_address.items():
                # One message per member: parts for shards it heads travel,
                # and are forwarded down their chains, together.
                if self._send_frames(address, [frame for _part, frame in group]):
                    for part, _frame in group:
                        targets[part.rid] = address
                        waiting[part.rid] = part
            got = self._collect(waiting, min(deadline, time.monotonic() + ATTEMPT_TIMEOUT_S))
            failed: GcsError | None = None
            silent: set[str] = set()
            retry = False
            for part in pending:
                reply = got.get(part.rid)
                if reply is None:
                    silent.add(targets.get(part.rid, ""))
                    continue
                if reply.get("ok"):
                    part.reply = reply
                    self._note_epoch(part, reply)
                elif reply.get("retry"):
                    retry = True
                else:
                    failed = GcsError(str(reply.get("error", "request failed")))
            if failed is not None:
                raise failed
            pending = [p for p in pending if p.reply is None]
            if not pending:
                return [p.reply for p in parts if p.reply is not None]
            if time.monotonic() >= deadline:
                raise GcsUnavailableError(
                    f"no reply from gcsd at {self.address} to {method!r} within "
                    f"{self.timeout:g}s")
            self.retries += 1
            for address in silent:
                self._drop_sock(address)
            if silent:
                self._await_reconfig(deadline, silent)
            elif retry and self._refresh(deadline):
                time.sleep(0.01)  # the member may not have heard the new config yet

    def _await_reconfig(self, deadline: float, silent: set[str]) -> None:
        """After silence, watch the layout until an epoch moves (or one attempt's time passes).

        A dead member is replaced when the master times it out; resending
        to it before then only waits another attempt. Looking every
        CONFIG_POLL_S lets the retry go out as soon as the new chain exists.
        """
        before = list(self._layout.epochs) if self._layout else None
        until = min(deadline, time.monotonic() + ATTEMPT_TIMEOUT_S)
        while self._refresh(deadline, avoid=silent) and before is not None:
            if self._layout is None or self._layout.epochs != before:
                return
            if time.monotonic() + CONFIG_POLL_S >= until:
                return
            time.sleep(CONFIG_POLL_S)

    def _note_epoch(self, part: _Part, reply: dict[str, Any]) -> None:
        epoch = reply.get("e")
        layout = self._layout
        if (part.shard is not None and layout is not None and isinstance(epoch, int)
                and 0 <= part.shard < layout.shards and epoch > layout.epochs[part.shard]):
            self._stale = True  # the chain changed under us: look before the next call

    def send_oneway(self, method: str, **fields: Any) -> None:
        """Send a request that gets no reply (gcsd only logs it if it is bad).

        Raises:
            GcsUnavailableError: the layout could not be read, a send queue is
                full, or another thread's call has held the client for
                ``ONEWAY_LOCK_S`` (it is waiting out a gcsd outage, say).
        """
        # One-way sends are best-effort and go out from I/O loops (task
        # events, heartbeats): never park such a loop behind a call that is
        # retrying for seconds while gcsd is down.
        if not self._lock.acquire(timeout=ONEWAY_LOCK_S):
            raise GcsUnavailableError("gcsd client busy: another call is waiting for gcsd")
        try:
            now = time.monotonic()
            deadline = now + min(self.timeout, ONEWAY_LAYOUT_S)
            layout = self._layout
            if (layout is not None and len(layout.members) > 1
                    and now - self._layout_at > ONEWAY_RECHECK_S):
                self._stale = True  # a heartbeat must not follow a head that moved
            parts = self._plan(method, fields, deadline)
            if self._layout is None:
                raise GcsUnavailableError(f"no gcsd member at {self.address} answered")
            for part in parts:
                address, extra = self._target(part)
                if not self._send(address, {**part.fields, **extra, "t": method}):
                    raise GcsUnavailableError(f"gcsd at {address} is not accepting messages")
        finally:
            self._lock.release()

    def close(self) -> None:
        """Close the sockets (idempotent). The shared context stays up."""
        with self._lock:
            self._closed = True
            for sock in self._socks.values():
                sock.close(linger=0)
            self._socks.clear()

    def __enter__(self) -> GcsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ basics
    def ping(self) -> None:
        self.call("ping")

    def info(self) -> dict[str, Any]:
        """Return gcsd's ``pubsub`` address, ``version`` and current ``seq``."""
        return self.call("info")

    def subscribe(self, tables: Iterable[str]) -> GcsSubscriber:
        """Open a :class:`GcsSubscriber` on this gcsd's pub-sub address."""
        return GcsSubscriber(self.info()["pubsub"], list(tables))

    # ------------------------------------------------------------ kv
    def kv_put(self, ns: str, key: bytes | str, value: bytes, overwrite: bool = True) -> bool:
        """Store ``value`` under ``(ns, key)``; return True if the key was new."""
        return bool(self.call("kv_put", ns=ns, key=_bytes(key), value=value,
                              overwrite=overwrite)["added"])

    def kv_get(self, ns: str, key: bytes | str) -> bytes | None:
        return self.call("kv_get", ns=ns, key=_bytes(key))["value"]

    def kv_del(self, ns: str, key: bytes | str) -> bool:
        """Delete ``(ns, key)``; return whether it existed."""
        return bool(self.call("kv_del", ns=ns, key=_bytes(key))["deleted"])

    def kv_keys(self, ns: str, prefix: bytes | str = b"") -> list[bytes]:
        return list(self.call("kv_keys", ns=ns, prefix=_bytes(prefix))["keys"])

    def kv_exists(self, ns: str, key: bytes | str) -> bool:
        return bool(self.call("kv_exists", ns=ns, key=_bytes(key))["exists"])

    # ------------------------------------------------------------ tables
    def table_put(self, table: str, key: bytes, value: Any) -> None:
        self.call("put", table=table, key=key, value=value)

    def table_get(self, table: str, key: bytes) -> Any:
        """Return the value under ``key``, or None if there is none."""
        return self.call("get", table=table, key=key)["value"]

    def table_delete(self, table: str, key: bytes) -> bool:
        return bool(self.call("delete", table=table, key=key)["deleted"])

    def table_scan(self, table: str, prefix: bytes = b"",
                   limit: int | None = None) -> list[tuple[bytes, Any]]:
        """Return ``(key, value)`` pairs with keys starting with ``prefix``, in key order."""
        fields: dict[str, Any] = {"table": table, "prefix": prefix}
        if limit is not None:
            fields["limit"] = limit
        return [(k, v) for k, v in self.call("scan", **fields)["items"]]

    def put_batch(self, table: str, items: Iterable[tuple[bytes, Any] | list[Any]],
                  wait: bool = False) -> None:
        """Write many keys in one gcsd transaction.

        With ``wait=False`` the batch is sent one-way: cheap, and a bad batch
        is only logged by gcsd. Use ``wait=True`` to learn about errors.
        """
        pairs = [[k, v] for k, v in items]
        if wait:
            self.call("put_batch", table=table, items=pairs)
        else:
            self.send_oneway("put_batch", table=table, items=pairs)

    def next_job_id(self) -> int:
        """Allocate a cluster-unique job id (1, 2, ...; survives gcsd restarts)."""
        return int(self.call("next_job_id")["job_id"])

    # ------------------------------------------------------------ nodes
    def register_node(self, node_id: bytes, info: dict[str, Any]) -> None:
        self.call("register_node", node_id=node_id, info=info)

    def heartbeat(self, node_id: bytes, available: dict[str, float] | None = None,
                  version: int | None = None, total: dict[str, float] | None = None) -> None:
        """Report liveness, and free resources if given (one-way).

        Without ``available`` gcsd only refreshes the node's timer and
        publishes nothing; send the map (with its version) when it changed,
        and ``total`` too when that changed (placement-group bundles).
        """
        if available is None:
            self.send_oneway("heartbeat", node_id=node_id)
        elif total is not None:
            self.send_oneway("heartbeat", node_id=node_id, available=available,
                             version=version or 0, total=total)
        else:
            self.send_oneway("heartbeat", node_id=node_id, available=available,
                             version=version or 0)

    def unregister_node(self, node_id: bytes) -> None:
        self.call("unregister_node", node_id=node_id)

    def get_nodes(self) -> list[dict[str, Any]]:
        """Return every node record (``node_id``, ``state``, ``resources``, ``available``...)."""
        return list(self.call("get_nodes")["nodes"])


class GcsSubscriber:
    """Receives gcsd's change notifications for some tables.

    Each notification is ``{"table", "op": "put"|"delete", "key", "value",
    "seq", "shard", "tseq"}``. ``seq`` is the shard's update number;
    ``tseq`` numbers the changes to one table on one shard, 1, 2, 3, ..., so
    a jump means notifications were lost (a PUB drops them before the
    subscription reaches gcsd, and when a subscriber falls far behind). The
    subscriber counts such jumps in :attr:`gaps` (per ``(shard, table)`` in
    :attr:`missed`); the cure is to read the table again (``table_scan``,
    the snapshot) and carry on. After a tail fails, its successor may send
    some notifications again; those (``tseq`` not above the last one seen)
    are dropped here. Not thread-safe.

    Args:
        pubsub_address: gcsd's pub-sub address (``info()["pubsub"]``); with
            several members, their addresses comma-separated.
        tables: table names to receive; empty means all.
    """

    def __init__(self, pubsub_address: str, tables: list[str]) -> None:
        self.address = pubsub_address
        self.tables = frozenset(tables)
        self.gaps = 0
        self.missed: set[tuple[int, str]] = set()
        self._last: dict[tuple[int, str], int] = {}
        self._sock: zmq.Socket | None = _context().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        security.curve_client(self._sock)
        # ZeroMQ matches topics by prefix; recv() re-checks the exact name.
        for table in self.tables or {""}:
            self._sock.setsockopt(zmq.SUBSCRIBE, table.encode())
        for address in pubsub_address.split(","):
            if address.strip():
                self._sock.connect(address.strip())

    def recv(self, timeout: float) -> dict[str, Any] | None:
        """Return the next change, or None if none arrives within ``timeout`` seconds."""
        if self._sock is None:
            raise GcsError("GcsSubscriber is closed")
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if not self._sock.poll(int(remaining * 1000)):
                return None
            frames = self._sock.recv_multipart()
            if len(frames) != 2:
                continue
            topic = frames[0].decode(errors="replace")
            if self.tables and topic not in self.tables:
                continue
            msg = _decode(frames[1])
            if self._fresh(msg):
                return msg

    def _fresh(self, msg: dict[str, Any]) -> bool:
        shard, tseq, table = msg.get("shard"), msg.get("tseq"), msg.get("table")
        if not isinstance(shard, int) or not isinstance(tseq, int) or not isinstance(table, str):
            return True
        key = (shard, table)
        last = self._last.get(key)
        if last is not None and tseq <= last:
            return False  # sent again by a new tail
        if last is not None and tseq > last + 1:
            self.gaps += 1
            self.missed.add(key)
        self._last[key] = tseq
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> GcsSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _layout(reply: dict[str, Any], asked: str, given: list[str]) -> Layout | None:
    """Check a ``config`` reply; a lone member is reached at the address we used."""
    members, shards, configs = reply.get("members"), reply.get("shards"), reply.get("configs")
    if (not isinstance(members, list) or not members or not isinstance(shards, int)
            or not isinstance(configs, list) or len(configs) != shards):
        return None
    if len(members) == 1:
        members = [asked]
    epochs, chains = [0] * shards, [[0]] * shards
    for item in configs:
        try:
            s, epoch, chain = item
            if not chain or any(not 0 <= m < len(members) for m in chain):
                return None
            epochs[s], chains[s] = int(epoch), list(chain)
        except (TypeError, ValueError, IndexError):
            return None
    return Layout(list(members), shards, epochs, chains)
