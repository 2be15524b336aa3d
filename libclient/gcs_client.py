"""Client for gcsd, the control store: requests over a ZeroMQ DEALER, changes over SUB.

Every request is one frame, a msgpack map ``{"t": method, "r": id, ...}``;
gcsd answers ``{"r": id, "ok": True, ...}`` or ``{"r": id, "ok": False,
"error": ...}``. A message without ``"r"`` is one-way: gcsd sends nothing
back, which is what makes heartbeats and task-event batches cheap.

One ZeroMQ context serves the whole process (``zmq.Context.instance()``,
which pyzmq recreates after a fork). ZeroMQ sockets are not thread-safe, so
:class:`GcsClient` serialises its socket behind a lock. A call never waits
longer than its timeout: after a timeout the socket is thrown away and a
fresh one connected, so a late reply to the abandoned request can never be
taken for the answer to a later one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import msgpack
import zmq

from libclient.protocol import encode_body


class GcsError(Exception):
    """gcsd refused a request; the message is gcsd's reason."""


class GcsUnavailableError(GcsError):
    """gcsd did not answer in time (down, unreachable, or overloaded)."""


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


class GcsClient:
    """A thread-safe connection to one gcsd.

    Args:
        address: gcsd's request address, e.g. ``"tcp://127.0.0.1:6379"``.
        timeout: seconds to wait for any one reply (or to queue a send).
    """

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next_id = 0
        self._sock: zmq.Socket | None = self._connect()
        self._closed = False

    def _connect(self) -> zmq.Socket:
        sock = _context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout * 1000)))
        sock.connect(self.address)
        return sock

    def _reconnect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._connect()

    def _socket(self) -> zmq.Socket:
        if self._closed or self._sock is None:
            raise GcsError("GcsClient is closed")
        return self._sock

    # ------------------------------------------------------------ transport
    def call(self, method: str, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply.

        Returns:
            The reply map (``ok`` is True; result fields as gcsd documents them).

        Raises:
            GcsError: gcsd answered with an error.
            GcsUnavailableError: no reply within ``timeout`` seconds.
        """
        with self._lock:
            sock = self._socket()
            self._next_id += 1
            rid = self._next_id
            frame = encode_body({**fields, "t": method, "r": rid})
            deadline = time.monotonic() + self.timeout
            try:
                sock.send(frame)
            except zmq.Again:
                self._reconnect()
                raise GcsUnavailableError(f"gcsd at {self.address} is not accepting "
                                          f"requests") from None
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000))):
                    self._reconnect()
                    raise GcsUnavailableError(f"no reply from gcsd at {self.address} to "
                                              f"{method!r} within {self.timeout:g}s")
                reply = _decode(sock.recv())
                if reply.get("r") == rid:
                    break
                # A reply to a request whose caller gave up (only possible if
                # it raced the reconnect); it answers nothing we still ask.
        if not reply.get("ok"):
            raise GcsError(str(reply.get("error", "request failed")))
        return reply

    def send_oneway(self, method: str, **fields: Any) -> None:
        """Send a request that gets no reply (gcsd only logs it if it is bad).

        Raises:
            GcsUnavailableError: the send queue stayed full for ``timeout`` seconds.
        """
        frame = encode_body({**fields, "t": method})
        with self._lock:
            sock = self._socket()
            try:
                sock.send(frame)
            except zmq.Again:
                self._reconnect()
                raise GcsUnavailableError(f"gcsd at {self.address} is not accepting "
                                          f"messages") from None

    def close(self) -> None:
        """Close the socket (idempotent). The shared context stays up."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close(linger=0)
                self._sock = None

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

    def heartbeat(self, node_id: bytes, available: dict[str, float]) -> None:
        """Report liveness and free resources (one-way)."""
        self.send_oneway("heartbeat", node_id=node_id, available=available)

    def unregister_node(self, node_id: bytes) -> None:
        self.call("unregister_node", node_id=node_id)

    def get_nodes(self) -> list[dict[str, Any]]:
        """Return every node record (``node_id``, ``state``, ``resources``, ``available``...)."""
        return list(self.call("get_nodes")["nodes"])


class GcsSubscriber:
    """Receives gcsd's change notifications for some tables.

    Each notification is ``{"table", "op": "put"|"delete", "key", "value",
    "seq"}``. As with any ZeroMQ PUB/SUB, changes published before the
    subscription reaches gcsd are not delivered, and a subscriber that
    falls far behind loses messages. ``seq`` increases with every committed
    write across all tables (internal ones too, which are not published), so
    it orders changes but a gap alone does not prove a lost message.
    Not thread-safe.

    Args:
        pubsub_address: gcsd's pub-sub address (``info()["pubsub"]``).
        tables: table names to receive; empty means all.
    """

    def __init__(self, pubsub_address: str, tables: list[str]) -> None:
        self.address = pubsub_address
        self.tables = frozenset(tables)
        self._sock: zmq.Socket | None = _context().socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        # ZeroMQ matches topics by prefix; recv() re-checks the exact name.
        for table in self.tables or {""}:
            self._sock.setsockopt(zmq.SUBSCRIBE, table.encode())
        self._sock.connect(pubsub_address)

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
            return _decode(frames[1])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> GcsSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
