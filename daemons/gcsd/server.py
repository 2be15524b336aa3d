"""gcsd's I/O shell: a ZeroMQ ROUTER for requests, a PUB for changes, one thread.

The shell owns the sockets, the clocks and the signal wake-up pipe; every
decision is made by :class:`daemons.gcsd.core.ControlStore`. Per loop turn
it waits (zmq poll) for a request, the stop pipe, or the next tick; drains
up to ``BATCH`` requests without blocking, hands each frame to the core,
then emits what the core returned: publications first, then the reply, then
the log lines.

ZeroMQ sends never block here: a ROUTER drops replies to a peer that has
gone or whose queue is full, and a PUB drops at its high-water mark (a
subscriber that falls behind notices the gap in ``seq``). So a slow or dead
client can never stall the control store.

A frame that does not parse, or breaks the core in a way nobody foresaw,
costs one error reply and one log line; the loop keeps serving.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from daemons.gcsd.core import ControlStore, Outcome
from daemons.shell import ConfigError, StopFlag
from libclient.protocol import MAX_FRAME, encode_body

# Requests handled per wake-up before the shell looks at the clock and the
# stop pipe again; keeps ticks and SIGTERM prompt under a request flood.
BATCH = 256
# Queue depth per peer, in messages. ZeroMQ's default is 1000; task-event
# batches arrive one-way and in bursts, so give them room before a DEALER
# client sees back-pressure.
RCV_HWM = 10_000


def bind_sockets(ctx: zmq.Context, host: str, port: int) -> tuple[zmq.Socket, zmq.Socket,
                                                                   str, str]:
    """Bind the ROUTER on ``host:port`` and the PUB on ``port+1`` (or random ports for 0).

    Returns:
        ``(router, pub, request_address, pubsub_address)``.

    Raises:
        ConfigError: a port is taken or the host cannot be bound.
    """
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)  # a hostile size never gets buffered
    router.setsockopt(zmq.RCVHWM, RCV_HWM)
    try:
        if port == 0:
            rport = router.bind_to_random_port(f"tcp://{host}")
            pport = pub.bind_to_random_port(f"tcp://{host}")
        else:
            rport, pport = port, port + 1
            router.bind(f"tcp://{host}:{rport}")
            pub.bind(f"tcp://{host}:{pport}")
    except zmq.ZMQError as exc:
        router.close()
        pub.close()
        where = f"{host}:{port}" if port == 0 else f"{host}:{port} / {host}:{port + 1}"
        raise ConfigError(f"cannot bind {where}: {exc}") from None
    return router, pub, f"tcp://{host}:{rport}", f"tcp://{host}:{pport}"


class GcsServer:
    """Moves frames between ZeroMQ and the core.

    Args:
        router, pub: bound sockets (see :func:`bind_sockets`); closed by close().
        core: the control store.
        log: a structlog logger.
        tick_s: how often to call ``core.tick``.
        clock, wall: monotonic and Unix time sources, injectable for tests.
    """

    def __init__(self, router: zmq.Socket, pub: zmq.Socket, core: ControlStore, log: Any,
                 tick_s: float, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.router = router
        self.pub = pub
        self.core = core
        self.log = log
        self.tick_s = tick_s
        self.clock = clock
        self.wall = wall
        self.handled = 0

    def run(self, stop: StopFlag) -> None:
        """Serve until ``stop`` is set (by SIGTERM/SIGINT via its wake pipe)."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(stop.wake_fd_r, zmq.POLLIN)
        next_tick = self.clock() + self.tick_s
        while not stop.stopping:
            wait_ms = max(0.0, next_tick - self.clock()) * 1000
            events = dict(poller.poll(wait_ms))
            if stop.wake_fd_r in events:
                _drain(stop.wake_fd_r)
            if self.router in events:
                self._serve_batch()
            now = self.clock()
            if now >= next_tick:
                self._emit(None, self.core.tick(now, self.wall()))
                next_tick = now + self.tick_s

    def _serve_batch(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handled += 1
            peer, body = frames[0], frames[1:]
            if len(body) != 1:
                # Our clients send one frame per request; anything else is not ours.
                self.log.warning("bad_request", peer=peer.hex(), frames=len(body),
                                 error="expected exactly one body frame")
                continue
            try:
                outcome = self.core.receive(body[0], self.clock(), self.wall())
            except Exception as exc:  # a core bug must not take the store down
                self.log.exception("internal_error", peer=peer.hex(), error=str(exc))
                continue
            self._emit(peer, outcome)

    def _emit(self, peer: bytes | None, outcome: Outcome) -> None:
        for p in outcome.publications:
            self.pub.send_multipart([p.table.encode(), encode_body(p.body())])
        if outcome.reply is not None and peer is not None:
            try:
                self.router.send_multipart([peer, encode_body(outcome.reply)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                self.log.warning("reply_dropped", peer=peer.hex(), error=str(exc))
        for n in outcome.notices:
            fields = dict(n.fields)
            if peer is not None:
                fields["peer"] = peer.hex()
            getattr(self.log, n.level)(n.event, **fields)

    def close(self) -> None:
        for sock in (self.router, self.pub):
            sock.close(linger=0)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass
