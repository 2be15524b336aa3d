"""The raylet's I/O shell: a single-threaded selectors loop over Unix sockets.

Clients (drivers, and workers that submit nested tasks) and the node's
workers all speak framed msgpack (libclient.protocol) on one listening
socket. The policy lives in ``LeaseScheduler``; this module only moves bytes,
pairs grants with idle workers, and watches processes.

Messages handled (``t``):
  hello         {kind: driver|worker, pid, worker_id?}      -> node info
  lease         {r, res}                  -> later: {r, ok, lease_id, worker...}
  cancel_lease  {lease_r}                 -> drops a queued request
  return_lease  {lease_id, kill}          -> worker back to idle (or killed)
  blocked / unblocked {}                  -> a worker's task waits in get
  resources     {r}                       -> {total, available}
  to_pid        {pid, msg, probe?}        -> msg handed to that local process
                                             (probe: {t: pid_status, pid, store, alive})
"""

from __future__ import annotations

import os
import random
import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from daemons.raylet import actor_failover
from daemons.raylet import actors as actor_states
from daemons.raylet import worker_pool as renv_pool  # runtime-env worker states
from daemons.raylet.actors import ActorDirectory, ActorRecord, Dead, Restart
from daemons.raylet.cluster_view import ClusterView
from daemons.raylet.placement_shell import PlacementService
from daemons.raylet.resources import GpuInstances, ResourceSet
from daemons.raylet.scheduler import (
    DEFAULT,
    SPREAD,
    Grant,
    Infeasible,
    InfeasibleQueued,
    LeaseRequest,
    LeaseScheduler,
    NodeAffinity,
    Rejected,
    Spill,
    Unschedulable,
)
from daemons.raylet.worker_pool import IDLE, LEASED, STARTING, Worker, WorkerPool
from libclient import peer_guard, peer_policy, security
from libclient.lease_gate import new_token
from libclient.protocol import FrameDecoder, ProtocolError, pack
from libclient.protocol import field as mfield
from libclient.runtime_env import spec as renv_spec
from libclient.runtime_env.worker_setup import worker_environ

_HEARTBEAT_S = 1.0
_REPORT_S = 0.1  # at most ten resource reports a second per node
_MAX_START_FAILURES = 5
_ACTORS = -1  # client id of lease requests the raylet makes for its actors
_START_BACKOFF_S = 5.0
# Worker processes starting at once (interpreter start to registration):
# a hundred actors created together would otherwise start a hundred Python
# interpreters on a 2-core host, and their first gcsd requests time out
# (Ray caps this the same way, at the node's CPU count).
_MAX_STARTING = max(2, os.cpu_count() or 1)
# After a node dies, nodes that could host its actors claim them at once;
# the others park the rest (RESTARTING on no node) only after this delay.
_PARK_DELAY_S = 1.0
_CPU = ("CPU",)
# What ``to_pid`` may carry: notices between owners and borrowers, and "log" (a
# worker's stdout/stderr for its job's driver, worker_output.py); nothing else.
_NOTICES = frozenset({"ref_removed", "add_borrower", "log"})
# Workers of a runtime env (renv) idle this long are stopped; default ones stay.
_RENV_IDLE_S = 10.0


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    cid: int
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    out: bytearray = field(default_factory=bytearray)
    kind: str = ""
    worker: Worker | None = None
    leases: set[int] = field(default_factory=set)
    closed: bool = False
    actor_id: bytes | None = None  # set on the raylet's own actor_init connections
    pid: int = 0  # a local driver's or worker's pid (hello), for ``to_pid`` notices
    born: float = 0.0  # accepted at (loop time): peer_limits sweep
    tx_at: float = 0.0  # the peer last took output (loop time)
    got_msg: bool = False
    peer_pid: int = 0  # SO_PEERCRED's pid of a local peer (what hello's pid must be)


@dataclass(eq=False)
class _Lease:
    lease_id: int
    holder: _Conn | None  # None for an actor's lease, which the raylet holds
    worker: Worker
    demand: ResourceSet
    gpus: list[int]
    blocked: bool = False
    token: bytes = b""  # the holder opens its connection to the worker with it (lease_gate)


class Raylet:
    def __init__(self, *, listen: socket.socket, socket_path: str, node_id: bytes,
                 tcp_listen: socket.socket | None = None, store_address: str = "",
                 resources: dict[str, float], gpus: list[dict[str, Any]], pool: WorkerPool,
                 store_socket: str, gcs: Any, gcs_address: str, log: Any,
                 max_workers: int, wake_fd: int,
                 store_watch: socket.socket | None = None) -> None:
        self.listen = listen
        self.socket_path = socket_path
        self.node_id = node_id
        self.total = ResourceSet.of(resources)
        # Every node's resources as gcsd last published them; the policy
        # grants here, queues, or names another node (spillback).
        self.view = ClusterView()
        self.scheduler = LeaseScheduler(self.total, node_id=node_id, view=self.view,
                                        rng=random.Random(), queue_infeasible=True)
        self.gpu_instances = GpuInstances(int(resources.get("GPU", 0)))
        self.gpus = gpus
        self.pool = pool
        self.store_socket = store_socket
        self.store_address = store_address  # stored's TCP address, for other nodes
        self.gcs = gcs
        self.gcs_address = gcs_address
        self.log = log
        self.max_workers = max_workers
        self.sel = selectors.DefaultSelector()
        self.sel.register(listen, selectors.EVENT_READ, None)
        # Submitters on other nodes (spillback, remote leases) reach us over TCP
        # and speak the same framed protocol as local clients.
        self.tcp_listen = tcp_listen
        if tcp_listen is not None:
            self.sel.register(tcp_listen, selectors.EVENT_READ, "tcp")
        self.sel.register(wake_fd, selectors.EVENT_READ, "wake")
        # A connection to our stored that carries nothing: when it closes,
        # stored died and took every object on this node with it.
        self.store_watch = store_watch
        if store_watch is not None:
            store_watch.setblocking(False)
            self.sel.register(store_watch, selectors.EVENT_READ, "store")
        self.exit_status = 0  # non-zero: the loop ended because this node cannot serve
        self.conns: dict[int, _Conn] = {}
        self._by_pid: dict[int, _Conn] = {}  # local drivers and workers, by pid
        self.stopping = False  # close() runs: the node is leaving
        self._last_heartbeat = 0.0
        self.leases: dict[int, _Lease] = {}
        # Granted requests waiting for a worker: (request, conn, lease_r, gpus).
        self.awaiting: list[tuple[LeaseRequest, _Conn, list[int]]] = []
        self.request_conn: dict[tuple[int, int], _Conn] = {}
        self.actors = ActorDirectory()
        self._actor_reqs: dict[int, bytes] = {}  # lease request id -> actor id
        # Creations not yet placed: actor id -> (creator's conn, its request id).
        self._actor_creators: dict[bytes, tuple[_Conn, int]] = {}
        self._next_actor_req = 0
        self.last_loop = time.monotonic()
        self._next_cid = 0
        # peer_limits: who may connect (SO_PEERCRED), how many, how much unread
        self.gate = peer_guard.LocalGate(log, "raylet")
        self.limits = peer_guard.limits()
        self._nconn = {socket.AF_UNIX: 0, socket.AF_INET: 0, socket.AF_INET6: 0}
        self._limit_log = peer_policy.LogOncePerPeer()
        self._cut: dict[int, str] = {}
        self._swept = 0.0
        self._next_lease = 0
        self._last_report = 0.0
        self._reported: dict[str, float] | None = None  # free resources gcsd last heard
        self._report_version = 0
        self.cluster_nodes: dict[bytes, dict[str, Any]] = {}  # gcsd's node rows, kept current
        self._node_sub: Any = None
        # When to look at the actors of dead nodes (actor_failover): first to
        # claim what fits here, later also to park what fits nowhere known.
        self._sweep_at: float | None = None
        self._park_at: float | None = None
        self.prestart = int(resources.get("CPU", 0))
        # Workers that exit before registering, in a row (a broken Python
        # environment, say). Past the limit, waiting leases fail with the
        # reason instead of waiting forever, and restarts back off.
        self._start_failures = 0
        self._no_starts_until = 0.0
        # Placement groups: coordinator of those created here, host of bundles.
        self.placement = PlacementService(self)
        # Runtime envs (renv): the env each lease request wants, by (client id,
        # request id), until a worker of that env is paired with it.
        self._lease_env: dict[tuple[int, int], tuple[str, dict[str, Any]]] = {}
        self._renv_workers = False  # ever started one: reap its idle workers

    # ---- lifecycle -------------------------------------------------------
    def start_workers(self) -> None:
        for _ in range(self.prestart):
            self.pool.start()

    def run(self, stop: Any) -> None:
        while not stop.stopping and not self.exit_status:
            self.last_loop = time.monotonic()  # a watchdog reads this: the loop turns
            for key, events in self.sel.select(timeout=0.1):
                if key.data is None:
                    self._accept(self.listen)
                elif key.data == "tcp":
                    self._accept(self.tcp_listen)
                elif key.data == "wake":
                    try:
                        os.read(key.fd, 64)
                    except BlockingIOError:
                        pass
                elif key.data == "store":
                    self._on_store_watch()
                else:
                    conn = key.data
                    if events & selectors.EVENT_READ:
                        self._on_readable(conn)
                    if events & selectors.EVENT_WRITE and not conn.closed:
                        self._flush(conn)
            self._housekeeping()

    def _on_store_watch(self) -> None:
        """stored closed our watch connection: it died (or was restarted).

        Its arena, and so every object on this node, is gone, and workers
        hold connections to a store that no longer exists. The raylet ends
        (non-zero), taking its workers with it, and unregisters the node:
        owners see their copies here as lost, drivers here see their raylet
        go, and a supervisor restarts both daemons as a fresh node.
        """
        try:
            data = self.store_watch.recv(4096)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # stored says nothing on this connection; ignore it if it does
        self.log.error("store_lost", store_socket=self.store_socket,
                       reason="stored closed the raylet's connection; leaving the cluster")
        self.exit_status = 3

    def close(self) -> None:
        # The node is leaving: its actors fail over like any dead node's (the
        # row stays theirs to restart elsewhere), so the connections closed
        # below must not pass for their owners exiting.
        self.stopping = True
        for conn in list(self.conns.values()):
            self._close(conn, "raylet stopping")
        self.pool.stop_all()
        self.placement.close()  # placement groups: peer links
        self.sel.close()
        self.listen.close()
        if self.tcp_listen is not None:
            self.tcp_listen.close()
        if self._node_sub:
            self._node_sub.close()
        if self.store_watch is not None:
            self.store_watch.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    # ---- connections ------------------------------------------------------
    def _accept(self, listen: socket.socket) -> None:
        try:
            sock, _ = listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and friends: keep serving the others
            self.log.warning("accept_failed", error=str(exc))
            return
        cred = self.gate.admit(sock)  # peer_limits: SO_PEERCRED on local peers
        if cred is None or not self._admit_more(sock):
            return
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = security.server_wrap(sock)  # TLS with the cluster's keys, if any
        self._next_cid += 1
        conn = _Conn(sock, self._next_cid, born=self.last_loop, tx_at=self.last_loop)
        conn.decoder.max_frame = self.limits.max_frame
        conn.peer_pid = cred.pid
        self._nconn[sock.family] += 1
        self.conns[conn.cid] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, f"recv failed: {exc}")
            return
        if not data:
            self._close(conn, "peer closed")
            return
        conn.decoder.feed(data)
        while not conn.closed:
            try:
                msg = conn.decoder.next()
            except ProtocolError as exc:
                self.log.warning("bad_message", conn=conn.cid, error=str(exc))
                self._send(conn, {"t": "error", "ok": False, "error": str(exc)})
                self._flush(conn)
                self._close(conn, "protocol error")
                return
            if msg is None:
                return
            conn.got_msg = True
            try:
                self._dispatch(conn, msg)
            except ProtocolError as exc:
                self.log.warning("bad_request", conn=conn.cid, type=msg.get("t"), error=str(exc))
                self._send(conn, {"r": msg.get("r") if isinstance(msg.get("r"), int) else None,
                                  "ok": False, "error": str(exc)})

    def _send(self, conn: _Conn, msg: dict[str, Any]) -> None:
        if conn.closed:
            return
        msg.setdefault("t", "reply")  # every frame names its type (protocol rule)
        was_empty = not conn.out
        conn.out += pack(msg)
        if was_empty:
            self._flush(conn)
        elif len(conn.out) > self.limits.max_out_bytes:  # peer_limits: cut off at the sweep
            self._cut.setdefault(conn.cid, f"{len(conn.out)} bytes unread")
            conn.out.clear()

    def _flush(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._close(conn, f"send failed: {exc}")
            return
        if n:
            del conn.out[:n]
            conn.tx_at = self.last_loop
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.sel.modify(conn.sock, mask, conn)

    def _close(self, conn: _Conn, why: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self.conns.pop(conn.cid, None) is not None:
            self._nconn[conn.sock.family] -= 1
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn.pid and self._by_pid.get(conn.pid) is conn:
            del self._by_pid[conn.pid]
        self.log.info("client_closed", conn=conn.cid, kind=conn.kind, reason=why)
        self.scheduler.cancel(conn.cid)
        self.awaiting = [a for a in self.awaiting if a[1] is not conn or self._unreserve(a)]
        if self._lease_env:  # renv of its requests
            for key in [k for k in self._lease_env if k[0] == conn.cid]:
                del self._lease_env[key]
        if not self.stopping:
            for record in self.actors.owner_gone(conn.cid):
                self._kill_actor(record)
            self.placement.owner_gone(conn.cid)  # its placement groups end with it
        # A holder that vanished may have left tasks running: kill its workers.
        for lease_id in list(conn.leases):
            self._end_lease(lease_id, kill=True)
        if conn.worker is not None:
            worker, conn.worker = conn.worker, None
            worker.conn = None
            self._worker_gone(worker)
        self._schedule()

    def _unreserve(self, item: tuple[LeaseRequest, _Conn, list[int]]) -> bool:
        req, _conn, gpus = item
        self.scheduler.release(req.demand)
        self.gpu_instances.release(gpus, req.demand.get("GPU"))
        return False

    # ---- messages ---------------------------------------------------------
    def _dispatch(self, conn: _Conn, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "lease":
            self._on_lease(conn, msg)
        elif t == "return_lease":
            lease_id = mfield(msg, "lease_id", int)
            if lease_id in conn.leases:
                self._end_lease(lease_id, kill=bool(msg.get("kill", False)))
                self._schedule()
        elif t == "cancel_lease":
            rid = mfield(msg, "lease_r", int)
            for req in self.scheduler.cancel(conn.cid, rid):
                self._send(conn, {"r": req.request_id, "ok": False, "error": "cancelled"})
                if self._lease_env:  # renv of a request that never got a worker
                    self._lease_env.pop((conn.cid, req.request_id), None)
        elif t == "blocked" or t == "unblocked":
            self._on_blocked(conn, t == "blocked")
        elif t == "hello":
            self._on_hello(conn, msg)
        elif t == "resources":
            self._send(conn, {"r": mfield(msg, "r", int), "ok": True,
                              "total": self.total.to_dict(),
                              "available": self.scheduler.available.to_dict()})
        elif t == "create_actor":
            self._on_create_actor(conn, msg)
        elif t == "kill_actor":
            actor_id = mfield(msg, "actor_id", bytes)
            no_restart = bool(msg.get("no_restart", True))
            cause = mfield(msg, "cause", str, "killed by kill()")
            record = self.actors.kill(actor_id, no_restart, cause)
            if record is not None:
                self._kill_actor(record)
            elif no_restart and actor_id not in self.actors.actors:
                self._kill_orphan(actor_id, cause)
        elif t == "own_actor":
            if self.actors.reown(mfield(msg, "actor_id", bytes), conn.cid):
                self.log.info("actor_owner_registered", actor_id=msg["actor_id"].hex(),
                              conn=conn.cid)
        elif t == "actor_ready" and conn.actor_id is not None:
            self._on_actor_ready(conn, msg)
        elif t == "actor_failed" and conn.actor_id is not None:
            self._on_actor_failed(conn, msg)
        elif t == "env_failed":
            self._on_renv_failed(conn, msg)
        elif t == "ping":
            self._send(conn, {"r": mfield(msg, "r", int), "ok": True})
        elif t == "to_pid":
            self._on_to_pid(conn, msg)
        elif t.startswith("pg_"):
            self.placement.on_message(conn, msg)  # placement groups
        else:
            raise ProtocolError(f"unknown message type {t!r}")

    def _on_to_pid(self, conn: _Conn, msg: dict[str, Any]) -> None:
        """Hand a borrower/owner notice to a local process (its pid), from any
        node: owners do not listen, but every process is connected to us.
        Only notice types are passed on; a probe for a process not connected
        here is answered ``pid_status`` (alive or not): owners ask it of
        borrowers, borrowers of owners."""
        pid = mfield(msg, "pid", int)
        body = mfield(msg, "msg", dict)
        target = self._by_pid.get(pid)
        if msg.get("probe"):
            self._send(conn, {"t": "pid_status", "pid": pid, "store": self.store_address,
                              "alive": target is not None})
            return
        if body.get("t") not in _NOTICES:
            raise ProtocolError(f"to_pid carries {body.get('t')!r}, not a notice")
        if target is not None:
            self._send(target, body)

    def _on_hello(self, conn: _Conn, msg: dict[str, Any]) -> None:
        kind = mfield(msg, "kind", str)
        if kind not in ("driver", "worker", "remote"):
            raise ProtocolError(f"unknown client kind {kind!r}")
        conn.kind = kind
        if kind != "remote" and conn.sock.family == socket.AF_UNIX:
            claimed = mfield(msg, "pid", int, 0)
            # The kernel's pid, not the claimed one (peer_limits): a local
            # client cannot take another process's ``to_pid`` notices.
            conn.pid = (conn.peer_pid or claimed) if claimed else 0
            if conn.pid:
                self._by_pid[conn.pid] = conn
        if kind == "worker" and conn.sock.family != socket.AF_UNIX:
            raise ProtocolError("workers register over the Unix socket only")
        if kind == "worker":
            wid = mfield(msg, "worker_id", bytes)
            worker = self.pool.workers.get(wid)
            if worker is None:
                raise ProtocolError("unknown worker id")
            worker.conn = conn
            worker.state = IDLE
            conn.worker = worker
            self._start_failures = 0
            self.log.info("worker_registered", worker_id=wid.hex(), worker_pid=worker.pid)
        self._send(conn, {"r": mfield(msg, "r", int), "ok": True, "node_id": self.node_id,
                          "store_socket": self.store_socket, "gcs_address": self.gcs_address,
                          "store_address": self.store_address,
                          "resources": self.total.to_dict(), "gpus": self.gpus,
                          **self._keys_for_local_clients(conn)})
        if kind == "worker":
            self._schedule()

    def _keys_for_local_clients(self, conn: _Conn) -> dict[str, Any]:
        """Where the cluster's keys are, for a driver on this host: it reached
        us over the Unix socket in a directory only our user can enter, so it
        may read the (0600) key files of the same user. Never over TCP."""
        keys = security.current()
        if keys is None or conn.sock.family != socket.AF_UNIX:
            return {}
        return {"keys_dir": keys.directory, "encrypt_bulk": bool(keys.encrypt_bulk)}

    def _on_lease(self, conn: _Conn, msg: dict[str, Any]) -> None:
        rid = mfield(msg, "r", int)
        res = mfield(msg, "res", dict)
        locality = mfield(msg, "locality", dict, {})
        try:
            demand = ResourceSet.of(res)
            req = LeaseRequest(rid, conn.cid, demand, _strategy(msg.get("strategy")),
                               bool(mfield(msg, "grant_or_reject", bool, False)),
                               {k: v for k, v in locality.items()
                                if isinstance(k, bytes) and isinstance(v, int)})
            self._know_target(req.strategy)
            renv = msg.get("renv")
            if renv is not None:  # a runtime env: its own kind of worker
                env = renv_spec.check_wire(renv)
                if env[0]:
                    self._lease_env[(conn.cid, rid)] = env
            result = self.scheduler.submit(req)
        except (TypeError, ValueError) as exc:
            self._lease_env.pop((conn.cid, rid), None)
            raise ProtocolError(str(exc)) from None
        if isinstance(result, Infeasible):
            self.log.warning("lease_infeasible", reason=result.reason)
            self._send(conn, {"r": rid, "ok": False, "error": "infeasible",
                              "msg": result.reason})
            return
        self.request_conn[(conn.cid, rid)] = conn
        self._schedule()

    def _know_target(self, strategy: Any) -> None:
        """Affinity to a node we have not heard of may be to one that just joined:
        read gcsd's node table before the policy calls it unknown."""
        if (isinstance(strategy, NodeAffinity) and strategy.node_id not in self.view
                and strategy.node_id != self.node_id and self.gcs is not None):
            self._load_nodes()

    def _on_blocked(self, conn: _Conn, blocked: bool) -> None:
        worker = conn.worker
        if worker is None or worker.lease_id is None:
            return
        lease = self.leases.get(worker.lease_id)
        if lease is None or lease.blocked == blocked:
            return
        lease.blocked = blocked
        cpu = lease.demand.only(_CPU)
        if blocked:
            self.scheduler.release(cpu)
        else:
            self.scheduler.acquire(cpu)
        self._schedule()

    # ---- scheduling -------------------------------------------------------
    def _schedule(self) -> None:
        for decision in self.scheduler.decide(time.monotonic()):
            req = decision.request
            if isinstance(decision, InfeasibleQueued):
                self.log.warning("lease_infeasible", reason=decision.reason,
                                 demand=req.demand.to_dict())
                continue
            if not isinstance(decision, Grant):
                self._refuse(decision)
                continue
            conn = self.request_conn.pop((req.client_id, req.request_id), None)
            if req.client_id == _ACTORS:
                gpus = self.gpu_instances.acquire(req.demand.get("GPU")) or []
                self.awaiting.append((req, None, gpus))  # type: ignore[arg-type]
                continue
            if conn is None or conn.closed:
                self.scheduler.release(req.demand)
                continue
            gpus = self.gpu_instances.acquire(req.demand.get("GPU"))
            if gpus is None:  # fractional packing failed although the total fits
                self.scheduler.release(req.demand)
                self.scheduler.submit(req)
                self.request_conn[(req.client_id, req.request_id)] = conn
                continue
            self.awaiting.append((req, conn, gpus))
        self._assign_workers()

    def _refuse(self, decision: Spill | Unschedulable | Rejected) -> None:
        """Answer a lease this node will not grant: where to ask instead, or why not."""
        req = decision.request
        if self._lease_env:  # its renv is not ours to start
            self._lease_env.pop((req.client_id, req.request_id), None)
        conn = self.request_conn.pop((req.client_id, req.request_id), None)
        if req.client_id == _ACTORS:
            actor_id = self._actor_reqs.pop(req.request_id, None)
            record = self.actors.actors.get(actor_id) if actor_id else None
            creator = self._actor_creators.pop(actor_id, None) if actor_id else None
            if record is None:
                return
            if isinstance(decision, Spill) and creator is not None and not creator[0].closed:
                # Another node will host (and manage) it: the creator asks there.
                del self.actors.actors[record.actor_id]
                row = self.cluster_nodes.get(decision.node_id) or {}
                self._send(creator[0], {"r": creator[1], "ok": False, "error": "spill",
                                        "node_id": decision.node_id,
                                        "raylet_address": row.get("raylet_address", "")})
                return
            why = getattr(decision, "reason", "it cannot be placed on this node")
            self.actors.init_failed(record.actor_id, f"unschedulable: {why}")
            self._actor_dead(record)
            return
        if conn is None or conn.closed:
            return
        if isinstance(decision, Spill):
            row = self.cluster_nodes.get(decision.node_id) or {}
            self._send(conn, {"r": req.request_id, "ok": False, "error": "spill",
                              "node_id": decision.node_id,
                              "raylet_address": row.get("raylet_address", "")})
        else:
            kind = "unschedulable" if isinstance(decision, Unschedulable) else "rejected"
            self._send(conn, {"r": req.request_id, "ok": False, "error": kind,
                              "msg": decision.reason})

    def _assign_workers(self) -> None:
        if self._lease_env:
            self._assign_renv_workers()
            return
        while self.awaiting:
            worker = self.pool.idle()
            if worker is None:
                starting = self.pool.count("STARTING")
                pooled = sum(1 for w in self.pool.workers.values() if w.actor_id is None)
                actors_waiting = sum(1 for a in self.awaiting if a[1] is None)
                if (starting < min(len(self.awaiting), _MAX_STARTING) and self._can_start()
                        and (pooled < self.max_workers or actors_waiting > starting)):
                    self.pool.start()
                return
            req, conn, gpus = self.awaiting.pop(0)
            self._lease_worker(req, conn, gpus, worker)

    def _lease_worker(self, req: LeaseRequest, conn: _Conn | None, gpus: list[int],
                      worker: Worker) -> None:
        """Pair a granted request with an idle worker: an actor's, or a client's lease."""
        self._next_lease += 1
        lease = _Lease(self._next_lease, conn, worker, req.demand, gpus, token=new_token())
        self.leases[lease.lease_id] = lease
        worker.state = LEASED
        worker.lease_id = lease.lease_id
        # The worker serves only a connection that opens with this lease's
        # token (security issue 11); it hears the token first, on its own link.
        self._tell_token(worker, lease.token)
        if conn is None:
            self._start_actor(req, worker, gpus)
            return
        conn.leases.add(lease.lease_id)
        self._send(conn, {"r": req.request_id, "ok": True, "lease_id": lease.lease_id,
                          "worker_id": worker.worker_id, "socket": worker.socket_path,
                          "address": worker.address, "node_id": self.node_id,
                          "pid": worker.pid, "gpus": gpus, "tok": lease.token})

    def _tell_token(self, worker: Worker, token: bytes | None) -> None:
        """A worker's current lease token (None: no lease; nobody is served)."""
        if worker.conn is not None:
            self._send(worker.conn, {"t": "lease_token", "tok": token})

    # ---- runtime envs (renv): workers of one env never serve another ------
    def _assign_renv_workers(self) -> None:
        """``_assign_workers`` while some request wants a runtime env: each
        grant takes an idle worker of its own env (key "" is the default);
        one more worker of each env still short of workers is started."""
        items, self.awaiting = self.awaiting, []
        short: dict[str, list[Any]] = {}  # env key -> [waiting, wire, actors waiting]
        keep = []
        for item in items:
            req, conn, gpus = item
            key, wire = self._lease_env.get((req.client_id, req.request_id), ("", {}))
            worker = self.pool.idle(key)
            if worker is None:
                keep.append(item)
                need = short.setdefault(key, [0, wire, 0])
                need[0] += 1
                need[2] += conn is None
                continue
            self._lease_env.pop((req.client_id, req.request_id), None)
            self._lease_worker(req, conn, gpus, worker)
        self.awaiting = keep + self.awaiting
        for key, (waiting, wire, actors_waiting) in short.items():
            starting = sum(1 for w in self.pool.workers.values()
                           if w.state == STARTING and w.env_key == key)
            if (starting >= waiting or not self._can_start()
                    or self.pool.count(STARTING) >= _MAX_STARTING):
                continue
            pooled = sum(1 for w in self.pool.workers.values() if w.actor_id is None)
            if pooled >= self.max_workers and actors_waiting <= starting:
                # Full: an idle worker of another env makes room (Ray does the same).
                victim = next((w for w in self.pool.workers.values() if w.state == IDLE
                               and w.actor_id is None and w.env_key != key), None)
                if victim is None:
                    continue
                victim.state = renv_pool.RETIRING
                self.pool.kill(victim)
            self._start_renv_worker(key, wire)

    def _start_renv_worker(self, key: str, wire: dict[str, Any]) -> None:
        if not key:
            self.pool.start()
            return
        self._renv_workers = True
        cache = os.path.join(self.pool.socket_dir, "runtime_resources")
        worker = self.pool.start(key, worker_environ(wire, cache, self.gcs_address))
        self.log.info("renv_worker_starting", env=key, worker_pid=worker.pid)

    def _on_renv_failed(self, conn: _Conn, msg: dict[str, Any]) -> None:
        """A worker could not set its runtime env up: fail what waits for that env."""
        wid = mfield(msg, "worker_id", bytes)
        error = mfield(msg, "error", str)
        self._send(conn, {"r": mfield(msg, "r", int), "ok": True})
        worker = self.pool.workers.get(wid)
        if worker is None or worker.state != STARTING or not worker.env_key:
            return
        worker.state = renv_pool.ENV_FAILED  # it exits; not a start failure of the pool
        self.log.warning("runtime_env_setup_failed", env=worker.env_key, worker_pid=worker.pid,
                         error=error)
        keep = []
        for item in self.awaiting:
            req, c, _gpus = item
            ident = (req.client_id, req.request_id)
            if self._lease_env.get(ident, ("",))[0] != worker.env_key:
                keep.append(item)
                continue
            del self._lease_env[ident]
            self._unreserve(item)
            if c is not None:
                self._send(c, {"r": req.request_id, "ok": False,
                               "error": "runtime_env_setup_failed", "msg": error})
                continue
            actor_id = self._actor_reqs.pop(req.request_id, None)
            record = self.actors.actors.get(actor_id) if actor_id else None
            if record is not None:
                self.actors.init_failed(record.actor_id,
                                        f"its runtime_env could not be set up: {error}")
                self._actor_dead(record)
        self.awaiting = keep
        self._schedule()

    def _reap_idle_renv_workers(self) -> None:
        """Stop runtime-env workers idle for ``_RENV_IDLE_S``: the next task of
        that env starts one again (its packages stay cached on this node)."""
        now = time.monotonic()
        for w in list(self.pool.workers.values()):
            if not w.env_key or w.actor_id is not None:
                continue
            if w.state != IDLE:
                w.idle_since = 0.0
            elif not w.idle_since:
                w.idle_since = now
            elif now - w.idle_since > _RENV_IDLE_S:
                w.state = renv_pool.RETIRING
                self.pool.kill(w)

    def _end_lease(self, lease_id: int, kill: bool) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return
        if lease.holder is not None:
            lease.holder.leases.discard(lease_id)
        demand = lease.demand.only(tuple(k for k in lease.demand.to_dict() if k != "CPU")) \
            if lease.blocked else lease.demand
        self.scheduler.release(demand)
        self.gpu_instances.release(lease.gpus, lease.demand.get("GPU"))
        worker = lease.worker
        worker.lease_id = None
        if worker.worker_id not in self.pool.workers:
            return
        if kill:
            self.pool.kill(worker)
        else:
            worker.state = IDLE
            self._tell_token(worker, None)  # the old holder may not come back

    def _worker_gone(self, worker: Worker) -> None:
        """A worker's process exited or its connection closed: account and replace it."""
        if worker.conn is not None and not worker.conn.closed:
            worker.conn.worker = None
            self._close(worker.conn, "worker process exited")
        if worker.lease_id is not None:
            self._end_lease(worker.lease_id, kill=False)
        self.pool.forget(worker)
        try:
            worker.proc.wait(timeout=0.5)
        except Exception:
            self.pool.kill(worker)
            worker.proc.wait()
        self.log.info("worker_exited", worker_id=worker.worker_id.hex(),
                      worker_pid=worker.pid, returncode=worker.proc.returncode)
        if worker.actor_id is not None:
            self._actor_process_died(worker)
        if worker.state == STARTING:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                self._no_starts_until = time.monotonic() + _START_BACKOFF_S
                reason = (f"{self._start_failures} workers in a row exited before registering "
                          f"(last status {worker.proc.returncode}); see the raylet log")
                self.log.error("workers_fail_to_start", reason=reason)
                for req, conn, gpus in self.awaiting:
                    self._unreserve((req, conn, gpus))
                    self._send(conn, {"r": req.request_id, "ok": False,
                                      "error": "worker_start_failed", "msg": reason})
                self.awaiting = []
        self._refill()
        self._schedule()

    def _can_start(self) -> bool:
        return time.monotonic() >= self._no_starts_until

    def _refill(self) -> None:
        if not self._can_start():
            return
        live = sum(1 for w in self.pool.workers.values() if w.actor_id is None)
        for _ in range(max(0, self.prestart - live)):
            self.pool.start()

    # ---- actors -----------------------------------------------------------
    def _on_create_actor(self, conn: _Conn, msg: dict[str, Any]) -> None:
        rid = mfield(msg, "r", int)
        actor_id = mfield(msg, "actor_id", bytes)
        spec = mfield(msg, "spec", dict)
        res = mfield(msg, "res", dict)
        try:
            demand = ResourceSet.of(res)
            record = self.actors.create(actor_id, spec, res, conn.cid, rid)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        grant_or_reject = bool(mfield(msg, "grant_or_reject", bool, False))
        strategy = _strategy(msg.get("strategy"))
        self._know_target(strategy)
        record.strategy = msg.get("strategy")
        record.owner_node = (self.node_id if conn.sock.family == socket.AF_UNIX
                             else mfield(msg, "owner_node", bytes, b""))
        if spec.get("renv") is not None:  # checked before the actor is recorded
            try:
                renv_spec.check_wire(spec["renv"])
            except ValueError as exc:
                del self.actors.actors[actor_id]
                raise ProtocolError(f"bad runtime env: {exc}") from None
        if grant_or_reject and not demand.fits_in(self.scheduler.total):  # + placement bundles
            self.actors.init_failed(actor_id, f"infeasible: needs {res}, node has "
                                              f"{self.total.to_dict()}")
            self._publish_actor(record)
            self._send(conn, {"r": rid, "ok": False, "error": "infeasible",
                              "msg": record.death_cause})
            record.create_r = None
            return
        self.log.info("actor_created", actor_id=actor_id.hex(),
                      class_name=spec.get("class_name", ""))
        self._actor_creators[actor_id] = (conn, rid)
        self._request_actor_lease(record, strategy, grant_or_reject)

    def _request_actor_lease(self, record: ActorRecord, strategy: Any = None,
                             grant_or_reject: bool = True) -> None:
        """Place an actor. A creation may be spilled to another node's raylet,
        which then manages it; a restart stays on this node (``strategy`` None)."""
        self._next_actor_req += 1
        self._actor_reqs[self._next_actor_req] = record.actor_id
        if strategy is None:
            strategy, grant_or_reject = NodeAffinity(self.node_id, soft=False), True
        renv = record.spec.get("renv")
        if renv:  # the actor's worker starts in its runtime env
            env = renv_spec.check_wire(renv)
            if env[0]:
                self._lease_env[(_ACTORS, self._next_actor_req)] = env
        self.scheduler.submit(LeaseRequest(self._next_actor_req, _ACTORS,
                                           ResourceSet.of(record.demand), strategy,
                                           grant_or_reject))
        self._schedule()

    def _start_actor(self, req: LeaseRequest, worker: Worker, gpus: list[int]) -> None:
        actor_id = self._actor_reqs.pop(req.request_id, None)
        record = self.actors.actors.get(actor_id) if actor_id else None
        if record is None or record.state == actor_states.DEAD:
            self._end_lease(worker.lease_id, kill=False)  # type: ignore[arg-type]
            return
        worker.actor_id = record.actor_id
        record.worker_id = worker.worker_id
        if self._actor_creators.pop(record.actor_id, None) is not None:
            # Placed here: this raylet manages it now. A restartable actor's
            # spec goes to gcsd first, so it can restart elsewhere if we die.
            self._record_for_failover(record)
            self._publish_actor(record)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(worker.socket_path)
        except OSError as exc:
            sock.close()
            self.log.warning("actor_connect_failed", actor_id=record.actor_id.hex(), error=str(exc))
            self.pool.kill(worker)
            return
        sock.setblocking(False)
        self._next_cid += 1
        conn = _Conn(sock, self._next_cid, kind="actor_init", actor_id=record.actor_id,
                     born=self.last_loop, tx_at=self.last_loop)
        self._nconn[socket.AF_UNIX] += 1  # peer_limits: _close counts every conn down
        self.conns[conn.cid] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        lease = self.leases.get(worker.lease_id)  # type: ignore[arg-type]
        self._send(conn, {"t": "hi", "tok": lease.token if lease is not None else b""})
        self._send(conn, {"t": "actor_init", "actor_id": record.actor_id, "spec": record.spec,
                          "gpus": gpus})
        self._refill()

    def _on_actor_ready(self, conn: _Conn, msg: dict[str, Any]) -> None:
        worker = next((w for w in self.pool.workers.values() if w.actor_id == conn.actor_id), None)
        record = None
        if worker is not None:
            record = self.actors.ready(conn.actor_id, worker.pid,  # type: ignore[arg-type]
                                       worker.socket_path, worker.address)
        self._close(conn, "actor initialised")
        if record is None:
            return
        self.log.info("actor_alive", actor_id=record.actor_id.hex(), worker_pid=record.pid,
                      num_restarts=record.num_restarts)
        self._publish_actor(record)
        answer = {"ok": True, "socket": record.socket, "pid": record.pid,
                  "address": record.address, "node_id": self.node_id}
        if isinstance(msg.get("brw"), list):  # refs __init__ kept, for their owners
            answer["brw"] = msg["brw"]
        self._answer_creator(record, answer)

    def _on_actor_failed(self, conn: _Conn, msg: dict[str, Any]) -> None:
        cause = mfield(msg, "error", str)
        record = self.actors.init_failed(conn.actor_id, cause)  # type: ignore[arg-type]
        self._close(conn, "actor init failed")
        if record is None:
            return
        self.log.warning("actor_init_failed", actor_id=record.actor_id.hex(), cause=cause)
        record.spec["death_wire"] = msg.get("wire")
        self._actor_dead(record)
        worker = next((w for w in self.pool.workers.values()
                       if w.actor_id == record.actor_id), None)
        if worker is not None:
            worker.actor_id = None
            self.pool.kill(worker)

    def _actor_process_died(self, worker: Worker) -> None:
        record = self.actors.by_worker(worker.worker_id)
        if record is None:
            return
        code = worker.proc.returncode
        decision = self.actors.process_died(record.actor_id,
                                            f"the actor's worker process (pid {worker.pid}) "
                                            f"died with status {code}")
        if isinstance(decision, Restart):
            self.log.warning("actor_restarting", actor_id=record.actor_id.hex(),
                             num_restarts=record.num_restarts)
            self._publish_actor(record)
            self._request_actor_lease(record)
        elif isinstance(decision, Dead):
            self._actor_dead(record)

    def _kill_actor(self, record: ActorRecord) -> None:
        worker = self.pool.workers.get(record.worker_id) if record.worker_id else None
        if worker is not None:
            self.pool.kill(worker)  # the exit runs the usual death path
            return
        # Not running (queued for a lease, or between restarts): dead now. A
        # grant still waiting for a worker finds no actor and ends its lease.
        for rid, aid in list(self._actor_reqs.items()):
            if aid == record.actor_id:
                del self._actor_reqs[rid]
                self.scheduler.cancel(_ACTORS, rid)
        dead = self.actors.process_died(record.actor_id, record.death_cause or "killed")
        if isinstance(dead, Dead):
            self._actor_dead(record)

    def _actor_dead(self, record: ActorRecord) -> None:
        self._actor_creators.pop(record.actor_id, None)
        self.log.info("actor_dead", actor_id=record.actor_id.hex(), cause=record.death_cause)
        self._publish_actor(record)
        self._answer_creator(record, {"ok": False, "error": "actor_died",
                                      "msg": record.death_cause,
                                      "wire": record.spec.get("death_wire")})
        self._release_name(record.actor_id, record.spec)
        if record.max_restarts and self.gcs is not None:
            self._forget_failover(record.actor_id)

    def _release_name(self, actor_id: bytes, spec: dict[str, Any]) -> None:
        name = spec.get("name")
        if not name or self.gcs is None:
            return
        ns = "actor_names:" + spec.get("namespace", "")
        try:
            if self.gcs.kv_get(ns, name.encode()) == actor_id:  # not a successor's
                self.gcs.kv_del(ns, name.encode())
        except Exception as exc:
            self.log.warning("actor_name_release_failed", error=str(exc))

    def _answer_creator(self, record: ActorRecord, reply: dict[str, Any]) -> None:
        if record.create_r is None or record.owner_conn is None:
            record.create_r = None
            return
        conn = self.conns.get(record.owner_conn)
        if conn is not None:
            self._send(conn, {"r": record.create_r, **reply})
        record.create_r = None

    def _publish_actor(self, record: ActorRecord) -> None:
        if self.gcs is None:
            return
        try:
            self.gcs.table_put("actors", record.actor_id, record.public(self.node_id))
        except Exception as exc:
            self.log.warning("actor_publish_failed", actor_id=record.actor_id.hex(),
                             error=str(exc))

    # ---- actors of dead nodes (actor_failover decides) ----------------------
    def _record_for_failover(self, record: ActorRecord) -> None:
        if not record.max_restarts or self.gcs is None:
            return
        body = actor_failover.failover_record(record.spec, record.demand, record.strategy,
                                              record.owner_node)
        try:
            self.gcs.kv_put(actor_failover.RECORDS_NS, record.actor_id,
                            msgpack.packb(body, use_bin_type=True))
        except Exception as exc:
            self.log.warning("actor_failover_record_failed", actor_id=record.actor_id.hex(),
                             error=str(exc))

    def _forget_failover(self, actor_id: bytes) -> None:
        """The actor is DEAD: drop its record and the claims on its rows."""
        try:
            self.gcs.kv_del(actor_failover.RECORDS_NS, actor_id)
            for key in self.gcs.kv_keys(actor_failover.CLAIMS_NS,
                                        actor_failover.claims_prefix(actor_id)):
                self.gcs.kv_del(actor_failover.CLAIMS_NS, key)
        except Exception as exc:
            self.log.warning("actor_failover_cleanup_failed", actor_id=actor_id.hex(),
                             error=str(exc))

    def _schedule_sweeps(self) -> None:
        now = time.monotonic()
        if self._sweep_at is None:
            self._sweep_at = now
        self._park_at = now + _PARK_DELAY_S

    def _run_due_sweeps(self, now: float) -> None:
        park = self._park_at is not None and self._park_at <= now
        if park:
            self._sweep_at = self._park_at = None
        elif self._sweep_at is not None and self._sweep_at <= now:
            self._sweep_at = None
        else:
            return
        self._sweep_orphans(park)

    def _dead_nodes(self) -> set[bytes]:
        return {n for n, row in self.cluster_nodes.items() if row.get("state") != "ALIVE"}

    def _sweep_orphans(self, may_park: bool) -> None:
        """Read the actors of dead nodes and claim what this raylet should act on."""
        dead = self._dead_nodes()
        if not dead:
            return
        try:
            rows = [v for _, v in self.gcs.table_scan("actors")]
            orphans = [r for r in rows if actor_failover.is_orphan(r, dead)]
            records = {}
            for row in orphans:
                if actor_failover.has_restart_left(row):
                    raw = self.gcs.kv_get(actor_failover.RECORDS_NS, row["actor_id"])
                    if raw is not None:
                        records[row["actor_id"]] = msgpack.unpackb(raw, raw=False)
        except Exception as exc:
            self.log.warning("actor_sweep_failed", error=str(exc))
            return
        plan = actor_failover.plan_orphans(orphans, dead_nodes=dead, my_node=self.node_id,
                                           my_total=self.total, records=records,
                                           may_park=may_park)
        for takeover in plan:
            try:
                won = self.gcs.kv_put(actor_failover.CLAIMS_NS, takeover.claim, self.node_id,
                                      overwrite=False)
            except Exception as exc:
                self.log.warning("actor_claim_failed", actor_id=takeover.actor_id.hex(),
                                 error=str(exc))
                continue
            if won:
                self._take_over(takeover)

    def _take_over(self, t: actor_failover.Takeover) -> None:
        self.log.warning("actor_failover", actor_id=t.actor_id.hex(), action=t.action,
                         num_restarts=t.row.get("num_restarts"),
                         cause=t.row.get("death_cause", ""))
        if t.action in (actor_failover.DECLARE_DEAD, actor_failover.PARK):
            try:
                self.gcs.table_put("actors", t.actor_id, t.row)
            except Exception as exc:
                self.log.warning("actor_publish_failed", actor_id=t.actor_id.hex(),
                                 error=str(exc))
            if t.action == actor_failover.DECLARE_DEAD:
                self._release_name(t.actor_id, {"name": t.row.get("name"),
                                                "namespace": t.row.get("namespace", "")})
                self._forget_failover(t.actor_id)
            return
        rec = t.record or {}
        try:
            record = self.actors.adopt(t.actor_id, rec["spec"], rec.get("demand") or {},
                                       int(t.row["max_restarts"]), int(t.row["num_restarts"]),
                                       rec.get("strategy"), rec.get("owner_node") or b"")
        except (KeyError, TypeError, ValueError) as exc:
            self.log.warning("actor_adopt_failed", actor_id=t.actor_id.hex(), error=str(exc))
            return
        self._publish_actor(record)  # RESTARTING here: callers and kills find us
        self._request_actor_lease(record)

    def _kill_orphan(self, actor_id: bytes, cause: str) -> None:
        """``kill`` of an actor nobody manages (parked, or its node dead): claim and end it."""
        if self.gcs is None:
            return
        try:
            row = self.gcs.table_get("actors", actor_id)
            if not actor_failover.is_orphan(row, self._dead_nodes()):
                # Its raylet may be dead without gcsd knowing yet: make sure a
                # later takeover ends it instead of bringing it back.
                if (isinstance(row, dict) and row.get("state") != actor_states.DEAD
                        and self.gcs.kv_exists(actor_failover.RECORDS_NS, actor_id)):
                    self.gcs.kv_put(actor_failover.RECORDS_NS, actor_id,
                                    msgpack.packb({"killed": cause}, use_bin_type=True))
                return
            if self.gcs.kv_put(actor_failover.CLAIMS_NS, actor_failover.claim_key(row),
                               self.node_id, overwrite=False):
                self._take_over(actor_failover.Takeover(
                    actor_failover.DECLARE_DEAD, actor_id, b"",
                    {**row, "state": actor_states.DEAD, "death_cause": cause, "pid": 0,
                     "socket": "", "address": ""}))
        except Exception as exc:
            self.log.warning("actor_kill_failed", actor_id=actor_id.hex(), error=str(exc))

    # ---- periodic ---------------------------------------------------------
    def _admit_more(self, sock: socket.socket) -> bool:
        """peer_limits: serve at most ``max_connections`` per listener; close the rest."""
        if self.limits.admit(self._nconn.get(sock.family, 0)):
            return True
        try:
            peer = sock.getpeername() if sock.family != socket.AF_UNIX else "unix"
        except OSError:
            peer = "?"
        sock.close()
        peer_key = peer[0] if isinstance(peer, tuple) else peer
        if self._limit_log.should_log(peer_key, "cap"):
            self.log.warning("connection_refused", peer=str(peer_key),
                             reason=f"at the cap of {self.limits.max_connections} connections",
                             times=self._limit_log.count(peer_key, "cap"))
        return False

    def _sweep_limits(self, now: float) -> None:
        """peer_limits: once a second, cut off silent TCP peers and stalled readers."""
        if now - self._swept < 1.0 and not self._cut:
            return
        self._swept = now
        states = [peer_policy.ConnState(c.cid, now - c.born, c.got_msg, len(c.out),
                                        now - c.tx_at, c.sock.family != socket.AF_UNIX)
                  for c in self.conns.values()]
        cut = dict(peer_policy.overdue(self.limits, states))
        cut.update(self._cut)
        self._cut = {}
        for cid, why in cut.items():
            conn = self.conns.get(cid)
            if conn is None:
                continue
            if self._limit_log.should_log((conn.kind, conn.pid), "cut"):
                self.log.warning("peer_cut_off", conn=cid, kind=conn.kind, pid=conn.pid,
                                 reason=why)
            self._close(conn, f"cut off: {why}")

    def _housekeeping(self) -> None:
        self._sweep_limits(self.last_loop)
        self._expire_spill_guesses(self.last_loop)
        for worker in self.pool.reap():
            self._worker_gone(worker)
        self._refill()
        self.placement.tick()  # placement groups: peer replies, pending groups
        if self.gcs is not None:
            now = time.monotonic()
            self._report(now)
            self._follow_nodes()
            if self._park_at is not None:
                self._run_due_sweeps(now)
        if self._renv_workers:
            self._reap_idle_renv_workers()

    def _expire_spill_guesses(self, now: float) -> None:
        """A spill's optimistic guess that outlived its timeout is a view change.

        A node whose free resources stay the same sends no new snapshot, so
        only this expiry shows it free again; ``decide`` applies it, but
        nothing else may call ``decide`` (a client that never followed its
        spill, then a quiet node): queued leases would wait forever
        (found by tests/fuzz_ports.py).
        """
        if self.view.expire_optimism(now) and self.scheduler.queued:
            self._schedule()

    def _report(self, now: float) -> None:
        """Tell gcsd we live, and what is free when that changed.

        Free resources go out only on change, at most every ``_REPORT_S``,
        with a version so receivers drop reordered ones; otherwise a bare
        heartbeat once a second, which gcsd does not publish.
        """
        available = self.scheduler.available.to_dict()
        try:
            if available != self._reported and now - self._last_report >= _REPORT_S:
                self._report_version += 1
                self.gcs.heartbeat(self.node_id, available, self._report_version,
                                   total=self.placement.total_if_changed())  # placement bundles
                self._reported = available
                self._last_report = self._last_heartbeat = now
            elif now - self._last_heartbeat >= _HEARTBEAT_S:
                self.gcs.heartbeat(self.node_id)
                self._last_heartbeat = now
        except Exception as exc:
            self._last_heartbeat = now
            self.log.warning("heartbeat_failed", error=str(exc))

    def _follow_nodes(self) -> None:
        """Keep ``cluster_nodes`` current from gcsd's node table (pub-sub, snapshot on gaps)."""
        sub = self._node_sub
        if sub is None:
            try:
                self._node_sub = sub = self.gcs.subscribe(["nodes"])
            except Exception as exc:
                self.log.warning("node_subscribe_failed", error=str(exc))
                self._node_sub = False
                return
            self._load_nodes()
        if not sub:
            return
        gaps = sub.gaps
        for _ in range(10_000):
            try:
                note = sub.recv(0)
            except Exception:
                break
            if note is None:
                break
            value = note.get("value")
            if isinstance(value, dict) and isinstance(note.get("key"), bytes):
                self._on_node(note["key"], value)
        if sub.gaps != gaps:
            self._load_nodes()  # notifications were lost: read the table again

    def _load_nodes(self) -> None:
        try:
            rows = self.gcs.get_nodes()
        except Exception as exc:
            self.log.warning("node_snapshot_failed", error=str(exc))
            return
        for row in rows:
            if isinstance(row, dict) and isinstance(row.get("node_id"), bytes):
                self._on_node(row["node_id"], row)

    def _on_node(self, node_id: bytes, row: dict[str, Any]) -> None:
        old = self.cluster_nodes.get(node_id)
        if old is not None and old.get("state") == "ALIVE" and row.get("state") != "ALIVE":
            self.log.warning("node_dead_seen", node=node_id.hex(),
                             reason=row.get("death_reason", ""))
        if (row.get("state") != "ALIVE" and node_id != self.node_id
                and (old is None or old.get("state") == "ALIVE")):
            # A node died (or died before we joined): its actors need a new
            # home or a death notice, and actors it owned share its fate.
            self.cluster_nodes[node_id] = row
            for record in self.actors.owner_node_died(node_id):
                self._kill_actor(record)
            if node_id in self.view:
                self.view.mark_dead(node_id)
            self.placement.node_dead(node_id)  # placement groups: reschedule its bundles
            self._schedule_sweeps()
        elif old is None and row.get("state") == "ALIVE" and node_id != self.node_id:
            self.log.info("node_joined", node=node_id.hex(),
                          address=row.get("raylet_address", ""))
        self.cluster_nodes[node_id] = row
        if node_id == self.node_id:
            if row.get("state") != "ALIVE" and not self.stopping:
                # Declared dead (final, as in Ray): others restart our actors
                # and retry our tasks. Ray's raylet exits here; ours only says
                # so for now (see docs/architecture.md, When daemons die).
                self.log.error("declared_dead", reason=row.get("death_reason", ""),
                               state=str(row.get("state")))
            return  # the scheduler keeps our own entry
        try:
            if row.get("state") != "ALIVE":
                self.view.mark_dead(node_id)
            else:
                self.view.update(node_id, ResourceSet.of(row.get("resources") or {}),
                                 ResourceSet.of(row.get("available") or {}),
                                 int(row.get("version") or 0))
        except (TypeError, ValueError) as exc:
            self.log.warning("bad_node_row", node=node_id.hex(), error=str(exc))
            return
        self._schedule()  # a node that joined or freed up may take queued work


def _strategy(wire: Any) -> str | NodeAffinity:
    """A lease request's ``strategy`` field: None, "DEFAULT", "SPREAD" or
    ``{node_id, soft}`` (libclient.util.scheduling_strategies.to_wire)."""
    if wire is None or wire == DEFAULT:
        return DEFAULT
    if wire == SPREAD:
        return SPREAD
    if isinstance(wire, dict) and isinstance(wire.get("node_id"), bytes):
        return NodeAffinity(wire["node_id"], bool(wire.get("soft", False)))
    raise ProtocolError(f"unknown scheduling strategy {wire!r}")
