"""gcsd's I/O shell: a ZeroMQ ROUTER for requests and chain traffic, a PUB for changes.

The shell owns the sockets, the clocks, LMDB and the signal wake-up pipe;
every decision is made by pure objects: :class:`~daemons.gcsd.core.ControlStore`
(what a request means) and :class:`~daemons.gcsd.chain.ChainReplica` (when
it is committed), one of each per shard this member hosts.

One thread, one loop. Per turn it waits (zmq poll) for a request, a reply
from the chain master, the stop pipe, or the next tick; drains up to
``BATCH`` frames without blocking; and after each input carries out the
replica's :class:`~daemons.gcsd.chain.Ready` in contract order: persist,
then send to neighbours, then publish and answer clients.

Requests (``{"t", "r", ...}``; optional ``"s"`` shard, ``"e"`` epoch the
client believes in, ``"c"`` client id for dedup):

* writes go to the shard's head: planned by the core against the head's
  state, proposed to the chain, answered once committed;
* reads go to the shard's tail (a tail just appended answers only once it
  has caught up, so reads never go backwards);
* a request for a shard whose head/tail is elsewhere, or with an epoch
  that is not ours, gets ``{"ok": False, "retry": True}`` and the client
  refreshes its configuration and tries again.

Without ``"s"`` the shell finds the shard from the key, and requests that
span shards (scans, batches) are split over the local shards, so a plain
single-member gcsd needs no routing at all on the client side.

Frames that one turn produces for the same neighbour, or the same client,
leave as one multipart ZeroMQ message (each part a complete message, read
in order): a turn that serves several shards wakes each peer once, not once
per shard. Requests likewise may arrive several to a message.

Sends never block: ROUTER replies to a vanished peer are dropped, the PUB
drops at its high-water mark (subscribers see the gap in ``tseq``), and
chain messages to a dead neighbour are dropped and resent on a timer.
Nothing a peer sends can stop the loop: bad frames cost an error reply (if
they carry a request id) and a log line.
"""

from __future__ import annotations

import heapq
import math
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from daemons.gcsd.chain import (
    IDLE,
    CatchUp,
    ChainReplica,
    Config,
    Entry,
    Forward,
    Incremental,
    Ready,
    Resend,
    Send,
    ServeSync,
    plan_catchup,
)
from daemons.gcsd.core import ControlStore, Notice, Outcome
from daemons.gcsd.shardstore import LOG_KEEP, ShardStore
from daemons.gcsd.tables import (
    META,
    EncodedPut,
    Put,
    PutMany,
    StorageError,
    decode_value,
    encode_value,
)
from daemons.gcsd.wire import chain_header, decode_chain, decode_configs, encode_chain
from daemons.shell import ConfigError, StopFlag
from libclient import security, spin
from libclient.gcs_client import (
    FANOUT_METHODS,
    READ_METHODS,
    WRITE_METHODS,
    merge_replies,
    route_key,
    shard_of,
    table_hash,
)
from libclient.protocol import MAX_FRAME, ProtocolError, decode_body, encode_body
from libclient.protocol import field as _field

# Requests handled per wake-up before the shell looks at the clock and the
# stop pipe again; keeps ticks and SIGTERM prompt under a request flood.
BATCH = 256
# Queue depth per peer, in messages. ZeroMQ's default is 1000; task-event
# batches arrive one-way and in bursts, so give them room before a DEALER
# client sees back-pressure.
RCV_HWM = 10_000
# Chain links carry resends and snapshots in bursts.
PEER_HWM = 100_000
# Chain ticks: resend and catch-up timers count these.
CHAIN_TICK_S = 0.01
# A bundle for one destination is sent early once it holds this many bytes.
BUNDLE_BYTES = 1 << 20


def bind_sockets(ctx: zmq.Context, host: str, port: int, max_message: int = MAX_FRAME
                 ) -> tuple[zmq.Socket, zmq.Socket, str, str]:
    """Bind the ROUTER on ``host:port`` and the XPUB on ``port+1`` (or random ports for 0).

    ``max_message`` (``[gcsd] max_message``): a longer message drops the
    sender's connection inside libzmq before it is buffered.

    An XPUB rather than a PUB: it tells us which tables anyone subscribes
    to, so changes nobody listens for (most task events) are never encoded.

    Returns:
        ``(router, pub, request_address, pubsub_address)``.

    Raises:
        ConfigError: a port is taken or the host cannot be bound.
    """
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.XPUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
        security.curve_server(sock)  # cluster keys in force: CURVE, clients checked by ZAP
    router.setsockopt(zmq.MAXMSGSIZE, max_message)  # a hostile size never gets buffered
    router.setsockopt(zmq.RCVHWM, RCV_HWM)
    # Clients name their sockets (so a tail can answer them); a client that
    # reconnects under its name takes the old connection's place.
    router.setsockopt(zmq.ROUTER_HANDOVER, 1)
    pub.setsockopt(zmq.SNDHWM, PEER_HWM)
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


def pubsub_of(address: str) -> str:
    """A member's pub-sub address: its request port plus one (the deployment convention)."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + 1}"


@dataclass
class Deployment:
    """Where this member sits. ``master`` None means a static single-member chain."""

    member: int
    members: list[str]
    shards: int
    master: str | None
    heartbeat_s: float = 0.1
    chain_length: int = 1
    incarnation: int = field(default_factory=time.time_ns)


@dataclass
class _Pending:
    """A client request waiting for one or more commits."""

    peer: bytes
    rid: int | None
    parts: int
    result: dict[str, Any]
    failed: bool = False
    quiet: bool = False  # the tail answers success; we only answer failure


@dataclass
class _Replica:
    shard: int
    store: ShardStore
    chain: ChainReplica
    core: ControlStore
    waiters: list[tuple[int, int, _Pending, dict[str, Any] | None]] = field(default_factory=list)
    failed: bool = False
    snap: tuple[int, int, int] | None = None  # (src, epoch, next part) while installing


class GcsServer:
    """Moves frames between ZeroMQ, LMDB and the pure cores.

    Args:
        router, pub: bound sockets (see :func:`bind_sockets`); closed by close().
        replicas: ``shard -> (ShardStore, ControlStore)`` for every shard hosted.
        deployment: who we are and who the others are.
        log: a structlog logger.
        tick_s: how often to call the cores' liveness ticks.
        ctx: the ZeroMQ context for peer and master links.
        max_message: the largest message read from a chain peer (as the router's).
        clock, wall: monotonic and Unix time sources, injectable for tests.
    """

    def __init__(self, router: zmq.Socket, pub: zmq.Socket,
                 replicas: dict[int, tuple[ShardStore, ControlStore]],
                 deployment: Deployment, log: Any, tick_s: float, ctx: zmq.Context,
                 pubsub_address: str, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, max_message: int = MAX_FRAME) -> None:
        self.router = router
        self.max_message = max_message
        self.pub = pub
        self.dep = deployment
        self.log = log
        self.tick_s = tick_s
        self.ctx = ctx
        self.clock = clock
        self.wall = wall
        self.last_loop = time.monotonic()
        self.pubsub_address = pubsub_address
        self._topics: set[bytes] = set()  # prefixes subscribers asked for
        self._wanted: dict[str, bool] = {}  # table -> does any prefix match (cache)
        self._deferred: set[int] | None = None  # shards to pump after this batch
        # While bundling: frames per neighbour and per client, sent by _send_bundles.
        self._bundling = False
        self._to_peers: dict[int, list[bytes]] = {}
        self._to_clients: dict[bytes, list[bytes]] = {}
        self._bundled_bytes: dict[int | bytes, int] = {}
        self.handled = 0
        self._rid = 0
        self._peers: dict[int, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, int] = {}  # peer socket monitor -> member
        self._poller: zmq.Poller | None = None
        self._spin = spin.Adaptive()
        self._master: zmq.Socket | None = None
        self._reps: dict[int, _Replica] = {}
        for s, (store, core) in replicas.items():
            chain = ChainReplica(s, deployment.member, applied=store.applied,
                                 last_epoch=store.last_epoch, dedup=store.dedup_items(),
                                 marks=store.marks, chain_length=deployment.chain_length)
            self._reps[s] = _Replica(s, store, chain, core)
        if deployment.master is not None:
            self._master = self._dealer(deployment.master)

    # ------------------------------------------------------------ loop
    def run(self, stop: StopFlag) -> None:
        """Serve until ``stop`` is set (by SIGTERM/SIGINT via its wake pipe)."""
        if self.dep.master is None:
            for s in self._reps:  # a static chain of one: this member alone
                self._step_chain(s, Config(s, 1, (self.dep.member,)))
        poller = self._poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(stop.wake_fd_r, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        if self._master is not None:
            poller.register(self._master, zmq.POLLIN)
            for m in range(len(self.dep.members)):
                if m != self.dep.member:
                    self._peer_sock(m)  # watch every member's connection from the start
        now = self.clock()
        next_tick = now + self.tick_s
        next_chain_tick = now + CHAIN_TICK_S
        # No master (a static chain of one): no heartbeats, and no deadline
        # for them either, or the loop below would never sleep.
        next_beat = now if self._master is not None else float("inf")
        while not stop.stopping:
            self.last_loop = time.monotonic()  # the systemd watchdog reads this
            # Round up: zmq_poll takes whole milliseconds, and a fraction
            # rounded down spins the loop on poll(0) until the tick is due.
            wait_ms = math.ceil(max(0.0, min(next_tick, next_chain_tick, next_beat)
                                    - self.clock()) * 1000)
            events = self._spin_poll(poller, wait_ms)
            if stop.wake_fd_r in events:
                _drain(stop.wake_fd_r)
            if self.pub in events:
                self._serve_subscriptions()
            if self.router in events:
                self._serve_batch()
            for mon in self._monitors.keys() & events.keys():
                self._on_monitor(mon)
            if self._master is not None and self._master in events:
                self._serve_master()
            now = self.clock()
            if now >= next_chain_tick:
                self._bundling = True
                try:
                    for s, rep in self._reps.items():
                        rep.chain.tick()
                        self._pump(s)
                finally:
                    self._send_bundles()
                next_chain_tick = now + CHAIN_TICK_S
            if now >= next_tick:
                self._tick_liveness(now)
                next_tick = now + self.tick_s
            if self._master is not None and now >= next_beat:
                self._heartbeat()
                next_beat = now + self.dep.heartbeat_s

    def _spin_poll(self, poller: zmq.Poller, wait_ms: int) -> dict[Any, int]:
        """Poll, first without sleeping for a moment (see libclient.spin): the next
        hop of a write usually arrives within a fraction of a millisecond, and
        waking a sleeping process costs more than that on a VM."""
        window = self._spin.window(spin.SPIN_S) if wait_ms else 0.0
        if window:
            end = time.perf_counter() + window
            while True:
                events = poller.poll(0)
                if events:
                    self._spin.record(True)
                    return dict(events)
                if time.perf_counter() >= end:
                    self._spin.record(False)
                    break
        return dict(poller.poll(wait_ms))

    def _serve_batch(self) -> None:
        self._deferred = set()
        self._bundling = True
        try:
            self._serve_frames()
        finally:
            dirty, self._deferred = self._deferred, None
            try:
                for s in sorted(dirty):
                    self._pump_now(s)
            finally:
                self._send_bundles()

    def _serve_frames(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            peer = frames[0]
            for frame in frames[1:]:  # usually one; a neighbour's bundle has several
                self.handled += 1
                try:
                    self._on_frame(peer, frame)
                except Exception as exc:  # a bug must not take the store down
                    self.log.exception("internal_error", peer=peer.hex(), error=str(exc))

    def _serve_subscriptions(self) -> None:
        """Track subscriptions. XPUB hands us the first subscribe and last unsubscribe per topic."""
        for _ in range(BATCH):
            try:
                frame = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] == b"\x01":
                self._topics.add(frame[1:])
            elif frame[:1] == b"\x00":
                self._topics.discard(frame[1:])
            else:
                continue  # not a subscription message: ignore
            self._wanted.clear()

    def _subscribed(self, table: str) -> bool:
        wanted = self._wanted.get(table)
        if wanted is None:
            topic = table.encode()
            wanted = self._wanted[table] = any(topic.startswith(t) for t in self._topics)
        return wanted

    # ------------------------------------------------------------ requests
    def _on_frame(self, peer: bytes, frame: bytes) -> None:
        try:
            msg = decode_body(frame)
        except ProtocolError as exc:
            self._reject(peer, _salvage_rid(frame), None, str(exc))
            return
        method = msg["t"]
        rid = msg.get("r")
        if rid is not None and (not isinstance(rid, int) or isinstance(rid, bool)):
            self._reject(peer, None, method, f"request id 'r' has type {type(rid).__name__}")
            return
        if method == "chain":
            self._on_chain(peer, msg)
        elif method == "snap":
            self._on_snapshot(peer, msg)
        elif method in ("ping", "info", "config"):
            self._reply(peer, rid, self._answer_any(method))
        elif method in FANOUT_METHODS or method == "put_batch":
            self._on_multi(peer, msg, rid)
        elif method in READ_METHODS or method in WRITE_METHODS:
            s = self._shard_for(msg)
            if s is not None:
                self._on_single(peer, msg, rid, s)
            else:
                self._reject(peer, rid, method, f"unknown shard {msg.get('s')!r}")
        else:
            # Unknown methods get the core's own answer (and log line).
            any_rep = next(iter(self._reps.values()))
            self._emit(peer, any_rep.core.step(msg, self.clock(), self.wall()))

    def _shard_for(self, msg: dict[str, Any]) -> int | None:
        s = msg.get("s")
        if s is None:
            where = route_key(msg["t"], msg)
            s = shard_of(*where, self.dep.shards) if where else next(iter(self._reps))
        if isinstance(s, int) and not isinstance(s, bool) and s in self._reps:
            return s
        return None

    def _answer_any(self, method: str) -> dict[str, Any]:
        if method == "ping":
            return {}
        if method == "config":
            return self._config()
        any_rep = next(iter(self._reps.values()))
        pubsubs = [self.pubsub_address if m == self.dep.member else pubsub_of(a)
                   for m, a in enumerate(self.dep.members)]
        return {"pubsub": ",".join(pubsubs), "version": any_rep.core.version,
                "seq": sum(r.chain.applied for r in self._reps.values()),
                "methods": sorted({*any_rep.core.methods, "config"}),
                "member": self.dep.member}  # the layout is in "config"

    def _config(self) -> dict[str, Any]:
        return {"members": list(self.dep.members), "shards": self.dep.shards,
                "member": self.dep.member,
                "configs": [[s, r.chain.epoch, list(r.chain.chain)]
                            for s, r in sorted(self._reps.items())]}

    def _check_role(self, rep: _Replica, msg: dict[str, Any], write: bool) -> str | None:
        """Why this replica cannot serve the request now (a retryable refusal), if it cannot."""
        if rep.failed:
            return f"shard {rep.shard} has failed on member {self.dep.member}"
        epoch = msg.get("e")
        if (epoch is not None and epoch != rep.chain.epoch
                and not _oneway_to_head(rep, msg, write, epoch)):
            return (f"stale configuration for shard {rep.shard}: epoch {epoch}, "
                    f"member {self.dep.member} is at {rep.chain.epoch}")
        if write and not rep.chain.is_head:
            return f"member {self.dep.member} is not the head of shard {rep.shard}"
        if not write and not rep.chain.readable:
            return f"member {self.dep.member} is not a readable tail of shard {rep.shard}"
        return None

    def _on_single(self, peer: bytes, msg: dict[str, Any], rid: int | None, s: int) -> None:
        rep = self._reps[s]
        method = msg["t"]
        write = method in WRITE_METHODS
        refusal = self._check_role(rep, msg, write)
        if refusal is not None:
            self._refuse(peer, rid, method, refusal)
            return
        if not write:
            self._flush(s)
            self._emit(peer, rep.core.step(msg, self.clock(), self.wall()), rep.chain.epoch)
            return
        pending = _Pending(peer, rid, 1, {})
        self._write(rep, msg, pending)
        self._pump(s)

    def _write(self, rep: _Replica, msg: dict[str, Any], pending: _Pending) -> None:
        """Plan one write at the head, propose it, and wait for its commit."""
        cid = msg.get("c", pending.peer)
        if not isinstance(cid, bytes) or not cid:
            cid = pending.peer
        rid = pending.rid
        if rid is not None:
            dup = rep.chain.duplicate(cid, rid)
            if dup is not None:  # a retry: answer what the first attempt got, once committed
                result = dup.result if isinstance(dup.result, dict) else {}
                self._wait(rep, dup.seq, pending, result)
                return
        now = self.clock()
        prep = rep.core.prepare(msg, now, self.wall())
        if prep.rejected is not None:
            self._fail(pending, prep.rejected)
            return
        effect = prep.effect
        if effect.ops:
            # The tail answers a client that asks for it ("tr") and whose
            # sockets carry its id as their routing id, so the tail can reach it.
            reply_to = b""
            if (msg.get("tr") is True and rid is not None and cid == pending.peer
                    and pending.parts == 1 and rep.chain.succ is not None):
                reply_to = cid
                pending.quiet = True
            # Encode each value once, here: every replica stores and
            # forwards these bytes as they are.
            ops = [EncodedPut(op.table, op.key, encode_value(op.value)) if isinstance(op, Put)
                   else op for op in effect.ops]
            proposed = rep.chain.propose(ops, cid if rid is not None else b"",
                                         rid or 0, effect.result, reply_to)
            seq = getattr(proposed, "seq", None)
            if seq is None:
                self._refuse_pending(pending, msg["t"], "not the head")
                return
        else:
            # Nothing to write, but the answer was read from the head's
            # state, which may hold uncommitted entries: answer once they
            # commit, so the client never sees a write that could be lost.
            seq = rep.chain.applied
        rep.core.settle(effect, now)
        self._log_notices(pending.peer, effect.notices)
        # Answered by _release once committed *and* persisted, never from
        # here: even a chain of one persists only when the shell pumps.
        self._wait(rep, seq, pending, effect.result)

    def _on_multi(self, peer: bytes, msg: dict[str, Any], rid: int | None) -> None:
        """Scans and batches: one shard if ``"s"`` says so, else every shard hosted here."""
        method = msg["t"]
        if "s" in msg:
            s = self._shard_for(msg)
            shards = [s] if s is not None else []
            if not shards:
                self._reject(peer, rid, method, f"unknown shard {msg.get('s')!r}")
                return
        else:
            if len(self._reps) != self.dep.shards:
                self._refuse(peer, rid, method, "this member does not host every shard; "
                                                "name one with 's'")
                return
            shards = sorted(self._reps)
        if method == "put_batch":
            self._on_put_batch(peer, msg, rid, shards)
            return
        outcomes: list[Outcome] = []
        for s in shards:
            rep = self._reps[s]
            refusal = self._check_role(rep, msg, write=False)
            if refusal is not None:
                self._refuse(peer, rid, method, refusal)
                return
            self._flush(s)
            outcomes.append(rep.core.step(msg, self.clock(), self.wall()))
        if len(outcomes) == 1:
            self._emit(peer, outcomes[0], self._reps[shards[0]].chain.epoch)
            return
        bad = next((o for o in outcomes if o.reply is not None and not o.reply.get("ok")), None)
        if bad is not None or rid is None:
            self._emit(peer, bad or outcomes[0])
            return
        self._reply(peer, rid, merge_replies(method, msg, [o.reply or {} for o in outcomes]))

    def _on_put_batch(self, peer: bytes, msg: dict[str, Any], rid: int | None,
                      shards: list[int]) -> None:
        items = msg.get("items")
        if len(shards) == 1 or not isinstance(items, list):
            parts = {shards[0]: items}
        else:
            parts = {}
            table = msg.get("table")
            seed = table_hash(table) if isinstance(table, str) else 0
            n, crc32 = self.dep.shards, zlib.crc32
            for item in items:
                key = item[0] if isinstance(item, list | tuple) and len(item) == 2 else None
                if not isinstance(key, bytes) or not isinstance(table, str):
                    parts = {shards[0]: items}  # let the core name the problem
                    break
                parts.setdefault(crc32(key, seed) % n, []).append(item)
        for s in parts:
            refusal = self._check_role(self._reps[s], msg, write=True)
            if refusal is not None:
                self._refuse(peer, rid, "put_batch", refusal)
                return
        pending = _Pending(peer, rid, len(parts), {})
        for s, part in parts.items():
            self._write(self._reps[s], {**msg, "items": part}, pending)
            self._pump(s)

    # ------------------------------------------------------------ waiting
    def _wait(self, rep: _Replica, seq: int, pending: _Pending,
              result: dict[str, Any] | None) -> None:
        self._rid += 1
        heapq.heappush(rep.waiters, (seq, self._rid, pending, result))

    def _part_done(self, pending: _Pending, result: dict[str, Any], epoch: int) -> None:
        if pending.failed:
            return
        pending.result.update(result)
        pending.parts -= 1
        if pending.parts == 0 and pending.rid is not None and not pending.quiet:
            self._reply(pending.peer, pending.rid, {**pending.result, "e": epoch})

    def _fail(self, pending: _Pending, outcome: Outcome) -> None:
        if pending.failed:
            return
        pending.failed = True
        self._emit(pending.peer, outcome)

    def _refuse_pending(self, pending: _Pending, method: str, why: str) -> None:
        if not pending.failed:
            pending.failed = True
            self._refuse(pending.peer, pending.rid, method, why)

    def _release(self, rep: _Replica) -> None:
        """Answer every waiter whose seq is now committed."""
        committed = rep.chain.committed
        while rep.waiters and rep.waiters[0][0] <= committed:
            _seq, _n, pending, result = heapq.heappop(rep.waiters)
            self._part_done(pending, result or {}, rep.chain.epoch)

    # ------------------------------------------------------------ chain
    def _on_chain(self, peer: bytes, msg: dict[str, Any]) -> None:
        try:
            kind, s, _epoch, src = chain_header(msg)
            cm = decode_chain(msg)
        except ProtocolError as exc:
            self.log.warning("bad_chain_message", peer=peer.hex(), error=str(exc))
            return
        if s not in self._reps or not 0 <= src < len(self.dep.members):
            self.log.warning("bad_chain_message", peer=peer.hex(), kind=kind, shard=s,
                             src=src, error="unknown shard or member")
            return
        self._step_chain(s, cm)

    def _step_chain(self, s: int, msg: Any) -> None:
        rep = self._reps[s]
        if rep.failed:
            return
        rep.chain.step(msg)
        self._pump(s)

    def _pump(self, s: int) -> None:
        """Carry out shard ``s``'s Ready now, or at the end of the request batch being served.

        Deferring lets every request and chain message that arrived together
        share one LMDB transaction, one Forward and one Ack per shard.
        """
        if self._deferred is not None:
            self._deferred.add(s)
        else:
            self._pump_now(s)

    def _flush(self, s: int) -> None:
        """Pump a deferred shard now: a read must see the writes that came before it."""
        if self._deferred is not None and s in self._deferred:
            self._deferred.discard(s)
            self._pump_now(s)

    def _pump_now(self, s: int) -> None:
        """Carry out the replica's Ready batches in contract order."""
        rep = self._reps[s]
        while rep.chain.has_ready() and not rep.failed:
            rd = rep.chain.ready()
            try:
                rep.store.persist(rd.persist)
            except StorageError as exc:
                # The replica's memory is now ahead of its disk: it must not
                # answer for anything again. Report it; the master removes it.
                rep.failed = True
                self.log.error("replica_failed", shard=s, error=str(exc))
                self._fail_waiters(rep, f"storage error: {exc}")
                return
            for m in rd.messages:
                self._carry(s, rep, m)
            self._answer_from_tail(rep, rd.publish)
            self._publish(s, rd.publish)
            self._release(rep)
            for n in rd.notices:
                getattr(self.log, n.level)(n.event, **n.fields)
            if rd.role is not None:
                self._on_role(rep, rd)
            rep.chain.advance(rd)
        if not rep.failed:
            self._release(rep)  # waiters on entries that were already committed

    def _answer_from_tail(self, rep: _Replica, entries: tuple[Entry, ...]) -> None:
        """As the tail, answer the clients of newly committed entries that asked for it."""
        for e in entries:
            if e.reply_to and e.rid:
                result = e.result if isinstance(e.result, dict) else {}
                self._send_reply(e.reply_to, {**result, "r": e.rid, "ok": True,
                                              "e": rep.chain.epoch})

    def _on_role(self, rep: _Replica, rd: Ready) -> None:
        old, new = rd.role or ("", "")
        if rep.chain.is_head and old not in ("HEAD", "SOLE"):
            rep.core.reset_liveness(self.clock())  # a new head times nodes afresh
        if not rep.chain.is_head:
            self._fail_waiters(rep, f"member {self.dep.member} is no longer the head of "
                                    f"shard {rep.shard}", retry=True)

    def _fail_waiters(self, rep: _Replica, why: str, retry: bool = True) -> None:
        waiters, rep.waiters = rep.waiters, []
        for _seq, _n, pending, _result in waiters:
            self._refuse_pending(pending, "write", why)

    def _carry(self, s: int, rep: _Replica, m: Any) -> None:
        if isinstance(m, Send):
            self._send_peer(m.dest, encode_chain(m.msg))
        elif isinstance(m, Resend):
            entries = tuple(rep.store.entries(m.first, m.last))
            if entries and entries[0].seq != m.first:
                # Trimmed from our log: the successor is too far behind to
                # be fed entries. Send nothing; it rejoins via a snapshot.
                self.log.warning("resend_beyond_log", shard=s, first=m.first,
                                 log_first=entries[0].seq)
                return
            for i in range(0, max(1, len(entries)), 256):
                fwd = Forward(s, m.epoch, self.dep.member, entries[i:i + 256], m.committed)
                self._send_peer(m.dest, encode_chain(fwd))
        elif isinstance(m, ServeSync):
            self._serve_sync(s, rep, m)

    def _serve_sync(self, s: int, rep: _Replica, m: ServeSync) -> None:
        store = rep.store
        plan = plan_catchup(m.applied, m.last_epoch, tail_applied=store.applied,
                            log_first=store.log_first(), epoch_at=store.epoch_at)
        if isinstance(plan, Incremental):
            entries = tuple(store.entries(plan.first, plan.last))
            cu = CatchUp(s, m.epoch, self.dep.member, entries, store.applied)
            self._send_peer(m.dest, encode_chain(cu))
            return
        self.log.info("snapshot_send", shard=s, to=m.dest, applied=store.applied)
        dedup = rep.chain.dedup_items(LOG_KEEP)
        part = 0
        for chunk in store.snapshot_chunks():
            self._send_peer(m.dest, {"t": "snap", "s": s, "e": m.epoch, "src": self.dep.member,
                                     "n": part, "items": chunk})
            part += 1
        self._send_peer(m.dest, {"t": "snap", "s": s, "e": m.epoch, "src": self.dep.member,
                                 "n": part, "items": [], "end": True, "a": store.applied,
                                 "le": store.last_epoch, "marks": store.marks,
                                 "dedup": [list(d) for d in dedup]})

    def _on_snapshot(self, peer: bytes, msg: dict[str, Any]) -> None:
        try:
            s, epoch, src = _field(msg, "s", int), _field(msg, "e", int), _field(msg, "src", int)
            part, items = _field(msg, "n", int), _field(msg, "items", list)
            rep = self._reps.get(s)
            if rep is None:
                raise ProtocolError(f"unknown shard {s}")
            chain = rep.chain
            if chain.role != IDLE or chain.epoch != epoch or chain.tail != src:
                return  # not for this replica now; a later sync starts over
            if part == 0:
                rep.store.begin_install()
                rep.snap = (src, epoch, 0)
            if rep.snap != (src, epoch, part):
                rep.snap = None  # a part went missing: wait for the next attempt
                return
            for item in items:
                if (not isinstance(item, list) or len(item) != 3 or item[0] not in
                        ("nodes", "jobs", "functions", "actors", "objects", "tasks",
                         "lineage", "kv", META) or not isinstance(item[1], bytes)):
                    raise ProtocolError("snapshot items must be [table, key, value]")
            rep.store.install_chunk(items)
            rep.snap = (src, epoch, part + 1)
            if msg.get("end") is True:
                applied, le = _field(msg, "a", int), _field(msg, "le", int)
                marks, dedup = _field(msg, "marks", dict), _field(msg, "dedup", list)
                dd = [(d[0], d[1], d[2], d[3]) for d in dedup
                      if isinstance(d, list) and len(d) == 4]
                rep.store.finish_install(applied, le, marks, dd)
                rep.snap = None
                self.log.info("snapshot_installed", shard=s, applied=applied, src=src)
                chain.restored(applied, le, dd, marks)
                self._pump(s)
        except (ProtocolError, StorageError, TypeError, ValueError) as exc:
            self.log.warning("bad_snapshot", peer=peer.hex(), error=str(exc))

    def _publish(self, s: int, entries: tuple[Entry, ...]) -> None:
        if not self._topics:
            return  # nobody subscribed to anything
        for e in entries:
            for op, mark in zip(e.ops, e.marks, strict=False):
                if op.table == META or not self._subscribed(op.table):
                    continue  # nobody listens: the mark still counts it
                if isinstance(op, PutMany):
                    for i, (key, data) in enumerate(op.pairs()):
                        self._send_pub(op.table, {
                            "table": op.table, "op": "put", "key": key,
                            "value": decode_value(data), "seq": e.seq, "shard": s,
                            "tseq": mark + i})
                    continue
                if isinstance(op, EncodedPut | Put):
                    value = decode_value(op.data) if isinstance(op, EncodedPut) else op.value
                    body = {"table": op.table, "op": "put", "key": op.key, "value": value,
                            "seq": e.seq, "shard": s, "tseq": mark}
                else:
                    body = {"table": op.table, "op": "delete", "key": op.key, "value": None,
                            "seq": e.seq, "shard": s, "tseq": mark}
                self._send_pub(op.table, body)

    def _send_pub(self, table: str, body: dict[str, Any]) -> None:
        try:
            self.pub.send_multipart([table.encode(), encode_body(body)], zmq.NOBLOCK)
        except zmq.Again:
            pass  # a subscriber that falls behind sees the gap in tseq

    # ------------------------------------------------------------ liveness
    def _tick_liveness(self, now: float) -> None:
        wall = self.wall()
        for s, rep in self._reps.items():
            if not rep.chain.is_head or rep.failed:
                continue
            ops, notices = rep.core.plan_tick(now, wall)
            if ops:
                rep.chain.propose(ops)
                self._log_notices(None, notices)
                self._pump(s)

    # ------------------------------------------------------------ master
    def _heartbeat(self) -> None:
        if self._master is None:
            return
        shards = {s: [r.chain.epoch, r.chain.applied, r.chain.ready_epoch, not r.failed,
                      r.chain.caught_up] for s, r in self._reps.items()}
        self._rid += 1
        frame = encode_body({"t": "m_hb", "r": self._rid, "m": self.dep.member,
                             "inc": self.dep.incarnation, "shards": shards})
        try:
            self._master.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass  # master down or unreachable: we keep serving the configs we have

    def _serve_master(self) -> None:
        assert self._master is not None
        for _ in range(BATCH):
            try:
                frame = self._master.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
                if not isinstance(msg, dict) or not msg.get("ok"):
                    raise ProtocolError(f"master refused: {msg!r:.200}")
                configs = decode_configs(msg.get("configs"))
            except (ProtocolError, ValueError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError) as exc:
                self.log.warning("bad_master_reply", error=str(exc))
                continue
            for s, epoch, chain in configs:
                if s in self._reps and epoch > self._reps[s].chain.epoch:
                    if any(not 0 <= m < len(self.dep.members) for m in chain):
                        self.log.warning("bad_master_reply", error="unknown member in chain")
                        continue
                    self._step_chain(s, Config(s, epoch, chain))

    # ------------------------------------------------------------ sending
    def _dealer(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not there
        sock.setsockopt(zmq.SNDHWM, PEER_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        security.curve_client(sock)
        sock.connect(address)
        return sock

    def _peer_sock(self, member: int) -> zmq.Socket:
        """The DEALER to a member, made on first use, with a monitor when a master exists.

        A killed member's TCP connections close at once; the monitor sees
        that and we tell the master, which then needs no ``dead_s`` of
        silence to replace it (only a missing heartbeat shortly after).
        """
        sock = self._peers.get(member)
        if sock is None:
            sock = self._peers[member] = self._dealer(self.dep.members[member])
            if self._master is not None:
                mon = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                self._monitors[mon] = member
                if self._poller is not None:
                    self._poller.register(mon, zmq.POLLIN)
        return sock

    def _on_monitor(self, mon: zmq.Socket) -> None:
        member = self._monitors[mon]
        lost = False
        while True:
            try:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
            except zmq.Again:
                break
            except (zmq.ZMQError, ValueError, struct.error) as exc:
                self.log.warning("bad_monitor_event", member=member, error=str(exc))
                break
            lost = lost or event.get("event") == zmq.EVENT_DISCONNECTED
        if lost and self._master is not None:
            self.log.info("peer_disconnected", member=member)
            try:
                self._master.send(encode_body({"t": "m_sus", "m": self.dep.member,
                                               "x": member}), zmq.NOBLOCK)
            except zmq.Again:
                pass  # master unreachable: its heartbeat timeout still applies

    def _send_peer(self, member: int, msg: dict[str, Any]) -> None:
        frame = encode_body(msg)
        if self._bundling:
            self._to_peers.setdefault(member, []).append(frame)
            if self._grow(member, len(frame)):
                self._flush_peer(member, self._to_peers.pop(member))
            return
        self._flush_peer(member, [frame])

    def _flush_peer(self, member: int, frames: list[bytes]) -> None:
        sock = self._peer_sock(member)
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected (yet, or any more): the resend timer covers it

    def _grow(self, dest: int | bytes, size: int) -> bool:
        """Count a bundled frame; True when the bundle should go now."""
        total = self._bundled_bytes.get(dest, 0) + size
        if total >= BUNDLE_BYTES:
            self._bundled_bytes.pop(dest, None)
            return True
        self._bundled_bytes[dest] = total
        return False

    def _send_bundles(self) -> None:
        """Send what this turn bundled, one message per neighbour and per client."""
        self._bundling = False
        peers, self._to_peers = self._to_peers, {}
        clients, self._to_clients = self._to_clients, {}
        self._bundled_bytes.clear()
        for member, frames in peers.items():
            self._flush_peer(member, frames)
        for peer, frames in clients.items():
            self._flush_reply(peer, frames)

    def _reply(self, peer: bytes, rid: int | None, fields: dict[str, Any]) -> None:
        if rid is None:
            return
        self._send_reply(peer, {"r": rid, "ok": True, **fields})

    def _send_reply(self, peer: bytes, reply: dict[str, Any]) -> None:
        frame = encode_body(reply)
        if self._bundling:
            self._to_clients.setdefault(peer, []).append(frame)
            if self._grow(peer, len(frame)):
                self._flush_reply(peer, self._to_clients.pop(peer))
            return
        self._flush_reply(peer, [frame])

    def _flush_reply(self, peer: bytes, frames: list[bytes]) -> None:
        try:
            self.router.send_multipart([peer, *frames], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.warning("reply_dropped", peer=peer.hex(), error=str(exc))

    def _reject(self, peer: bytes, rid: int | None, method: Any, error: str) -> None:
        self.log.warning("bad_request", peer=peer.hex(), error=error,
                         method=method if isinstance(method, str) else repr(method))
        if rid is not None:
            self._send_reply(peer, {"r": rid, "ok": False, "error": error})

    def _refuse(self, peer: bytes, rid: int | None, method: str, why: str) -> None:
        """A request we cannot serve here and now: the client should look elsewhere."""
        self.log.debug("request_redirected", method=method, why=why)
        if rid is not None:
            self._send_reply(peer, {"r": rid, "ok": False, "retry": True, "error": why})

    def _emit(self, peer: bytes | None, outcome: Outcome, epoch: int | None = None) -> None:
        if outcome.reply is not None and peer is not None:
            reply = outcome.reply
            if epoch is not None and reply.get("ok"):
                reply = {**reply, "e": epoch}
            self._send_reply(peer, reply)
        self._log_notices(peer, outcome.notices)

    def _log_notices(self, peer: bytes | None, notices: list[Notice]) -> None:
        for n in notices:
            fields = dict(n.fields)
            if peer is not None:
                fields["peer"] = peer.hex()
            getattr(self.log, n.level)(n.event, **fields)

    def close(self) -> None:
        for sock in self._peers.values():
            if self._master is not None:
                sock.disable_monitor()
        for sock in (self.router, self.pub, self._master, *self._peers.values(),
                     *self._monitors):
            if sock is not None:
                sock.close(linger=0)
        for rep in self._reps.values():
            rep.store.close()


def _salvage_rid(frame: bytes) -> int | None:
    """Find an integer ``"r"`` in a frame that failed validation, to aim the error reply."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types
        return None
    rid = msg.get("r") if isinstance(msg, dict) else None
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


def _oneway_to_head(rep: _Replica, msg: dict[str, Any], write: bool, epoch: Any) -> bool:
    """A one-way write (a heartbeat, task events) from a client whose layout is older.

    Nobody reads the refusal of a one-way message, so refusing it would drop
    it silently until the client happens to refresh its layout: a raylet's
    heartbeats then stop counting and its node is declared dead. The head of a
    newer epoch is still the right place for it, so take it. (A client ahead
    of us is still refused: we may be a deposed head that has not heard yet.)
    """
    return (write and msg.get("r") is None and isinstance(epoch, int)
            and epoch < rep.chain.epoch and rep.chain.is_head)
