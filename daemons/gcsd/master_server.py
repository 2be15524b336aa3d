"""The chain master's I/O shell: a ZeroMQ ROUTER, a durable state file, a tick.

Members send ``{"t": "m_hb", "r", "m", "inc", "shards": {shard: [epoch,
applied, ready_epoch, healthy, caught_up]}}``; every heartbeat is answered
with all configs, ``{"r", "ok": True, "configs": [[shard, epoch, chain]]}``.
Clients may ask ``config`` here too. Decisions are made by the pure
:class:`~daemons.gcsd.master.ChainMaster`.

The state (epochs, chains, incarnations) lives in ``DATA/master.json``,
written to a temporary file, fsynced and renamed over the old one *before*
any reply that depends on it leaves, so no epoch is ever handed out twice,
even across a crash of the master.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from daemons.gcsd.master import ChainMaster, Heartbeat, ShardReport
from daemons.shell import StopFlag
from libclient import security
from libclient.protocol import MAX_FRAME, ProtocolError, decode_body, encode_body
from libclient.protocol import field as _field

STATE_FILE = "master.json"


def load_state(data_dir: str) -> dict[str, Any] | None:
    """The persisted master state, or None on first start."""
    try:
        with open(os.path.join(data_dir, STATE_FILE), "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def save_state(data_dir: str, state: dict[str, Any]) -> None:
    """Write the state atomically and durably (tmp + fsync + rename + fsync dir)."""
    path = os.path.join(data_dir, STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MasterServer:
    """Serves the chain master on a bound ROUTER.

    Args:
        router: bound ROUTER socket (closed by close()).
        master: the pure master.
        data_dir: where master.json lives.
        members: request addresses of the members, by id.
        log: a structlog logger.
        tick_s: length of one master tick.
    """

    def __init__(self, router: zmq.Socket, master: ChainMaster, data_dir: str,
                 members: list[str], log: Any, tick_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.router = router
        self.master = master
        self.data_dir = data_dir
        self.members = members
        self.log = log
        self.tick_s = tick_s
        self.clock = clock
        self.handled = 0
        self._peers: dict[int, bytes] = {}  # member id -> its routing id, from heartbeats
        self._flush()

    def run(self, stop: StopFlag) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(stop.wake_fd_r, zmq.POLLIN)
        next_tick = self.clock() + self.tick_s
        while not stop.stopping:
            # Round up to whole milliseconds, or the last fraction spins on poll(0).
            events = dict(poller.poll(math.ceil(max(0.0, next_tick - self.clock()) * 1000)))
            if stop.wake_fd_r in events:
                try:
                    while os.read(stop.wake_fd_r, 64):
                        pass
                except BlockingIOError:
                    pass
            if self.router in events:
                self._serve_batch()
            if self.clock() >= next_tick:
                self.master.tick()
                self._flush()
                next_tick = self.clock() + self.tick_s

    def _serve_batch(self) -> None:
        for _ in range(256):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handled += 1
            if len(frames) != 2:
                self.log.warning("bad_request", frames=len(frames) - 1,
                                 error="expected exactly one body frame")
                continue
            peer, body = frames
            try:
                self._on_frame(peer, body)
            except Exception as exc:  # a bug must not take the master down
                self.log.exception("internal_error", error=str(exc))

    def _on_frame(self, peer: bytes, body: bytes) -> None:
        rid = None
        try:
            msg = decode_body(body)
            rid = msg.get("r") if isinstance(msg.get("r"), int) else None
            if msg["t"] == "m_hb":
                hb = _heartbeat(msg)
                self.master.step(hb)
                if 0 <= hb.member < len(self.members):
                    self._peers[hb.member] = peer
                self._flush()
            elif msg["t"] == "m_sus":  # a member lost its connection to another
                self.master.suspect(_field(msg, "x", int), by=_field(msg, "m", int))
                self._flush()
            elif msg["t"] not in ("config", "ping"):
                raise ProtocolError(f"unknown method {msg['t']!r}")
        except ProtocolError as exc:
            self.log.warning("bad_request", peer=peer.hex(), error=str(exc))
            if rid is not None:
                self._send(peer, {"r": rid, "ok": False, "error": str(exc)})
            return
        if rid is not None:
            self._send(peer, {"r": rid, "ok": True, "configs": self.master.configs(),
                              "members": self.members, "shards": self.master.shards})

    def _flush(self) -> None:
        """Persist, then log and tell the members: the ordering contract of MasterReady.

        Members would learn a new config from the answer to their next
        heartbeat anyway; pushing it saves up to a heartbeat period of
        stall after a failure.
        """
        rd = self.master.ready()
        if rd.state is not None:
            save_state(self.data_dir, rd.state)
        for n in rd.notices:
            getattr(self.log, n.level)(n.event, **n.fields)
        self.master.advance(rd)
        if rd.state is not None and any(n.event == "master_reconfigured" for n in rd.notices):
            push = {"r": 0, "ok": True, "configs": self.master.configs(),
                    "members": self.members, "shards": self.master.shards}
            for peer in self._peers.values():
                self._send(peer, push)

    def _send(self, peer: bytes, reply: dict[str, Any]) -> None:
        try:
            self.router.send_multipart([peer, encode_body(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.warning("reply_dropped", peer=peer.hex(), error=str(exc))

    def close(self) -> None:
        self.router.close(linger=0)


def bind_master(ctx: zmq.Context, host: str, port: int, max_message: int = MAX_FRAME
                ) -> tuple[zmq.Socket, str]:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.MAXMSGSIZE, max_message)
    security.curve_server(router)
    if port == 0:
        port = router.bind_to_random_port(f"tcp://{host}")
    else:
        router.bind(f"tcp://{host}:{port}")
    return router, f"tcp://{host}:{port}"


def _heartbeat(msg: dict[str, Any]) -> Heartbeat:
    member = _field(msg, "m", int)
    inc = _field(msg, "inc", int)
    raw = _field(msg, "shards", dict)
    shards: dict[int, ShardReport] = {}
    for s, rep in raw.items():
        if (not isinstance(s, int) or not isinstance(rep, list) or len(rep) != 5
                or not all(isinstance(x, int) for x in rep[:3])):
            raise ProtocolError("shards must map shard -> [epoch, applied, ready, ok, caught_up]")
        shards[s] = ShardReport(rep[0], rep[1], rep[2], bool(rep[3]), bool(rep[4]))
    return Heartbeat(member, inc, shards)

