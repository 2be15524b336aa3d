"""Black-box fuzzer: random, mutated, truncated and oversized frames to every
port and Unix socket of a running cluster, while a workload runs beside it.

    python tests/fuzz_ports.py [--seconds 60] [--seed 1] [--nodes 2]

starts a ``cluster_utils.Cluster`` (gcsd + N nodes), fuzzes it for the given
time, then checks that every daemon still serves, that the workload's
answers were all right, and that no daemon's private memory grew past
:data:`RSS_BOUND`; it prints how many messages each target received. The
test suite runs a few seconds of it (tests/test_fuzz_ports.py); the long run
is ``-m chaos_long`` there, or this command.

Targets (each node): raylet Unix socket, raylet TCP port (TLS with the
cluster's keys: an authenticated but broken member; and raw bytes: a
stranger), stored Unix socket, stored transfer port (TLS and raw), every
worker's Unix socket and TCP port; gcsd's request port (CURVE with the keys,
and a client without them) and its pub-sub port. The fuzzer runs as the
daemons' own user: it is the most trusted local peer, so what it finds are
decoding and robustness faults, not access-control ones. Messages that ask
a daemon to start processes (``create_actor``, ``actor_init``) are left
out: any member may legitimately ask for those.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from libclient import security  # noqa: E402
from libclient.protocol import HEADER, FrameDecoder, encode_body, pack  # noqa: E402

# Private (non-shared) memory a daemon may gain over a fuzz run. Shared
# memory (stored's arena, touched by the workload) is not counted.
RSS_BOUND = 64 << 20

OID = b"\x07" * 28
NODE = b"\x09" * 16
SAMPLES: dict[str, list[dict[str, Any]]] = {
    "raylet": [
        {"t": "ping", "r": 1}, {"t": "resources", "r": 2},
        {"t": "lease", "r": 3, "res": {"CPU": 1.0}, "locality": {}},
        {"t": "return_lease", "lease_id": 99_999}, {"t": "cancel_lease", "lease_r": 3},
        {"t": "blocked"}, {"t": "unblocked"},
        {"t": "hello", "r": 4, "kind": "driver", "pid": 1},
        {"t": "kill_actor", "actor_id": b"\x00" * 16, "no_restart": True},
        {"t": "own_actor", "actor_id": b"\x00" * 16},
        {"t": "to_pid", "pid": 1, "msg": {"t": "ref_removed"}, "probe": True},
        {"t": "env_failed", "r": 5},
    ],
    "stored": [
        {"t": "hello", "r": 1, "pid": 42, "name": "fuzz"},
        {"t": "create", "r": 2, "oid": OID, "size": 100}, {"t": "seal", "r": 3, "oid": OID},
        {"t": "abort", "r": 4, "oid": OID},
        {"t": "get", "r": 5, "oids": [OID], "timeout_ms": 0},
        {"t": "release", "oids": [OID]}, {"t": "contains", "r": 7, "oids": [OID]},
        {"t": "stats", "r": 8}, {"t": "ping", "r": 9}, {"t": "health", "r": 10},
        {"t": "pull", "r": 11, "oid": OID, "sources": ["127.0.0.1:1"], "timeout": 0.1},
    ],
    "transfer": [
        {"t": "stat", "r": 1, "oid": OID}, {"t": "read", "r": 2, "oid": OID, "off": 0, "len": 64},
        {"t": "free", "r": 3, "oid": b"\x08" * 28},
    ],
    "worker": [
        {"t": "task", "tid": b"\x01" * 16, "fn": b"\x02" * 16, "name": "f", "args": [],
         "nret": 1, "job": 1, "ca": ""},
        {"t": "call", "tid": b"\x01" * 16, "method": "m", "name": "f", "args": [], "nret": 1},
        {"t": "cancel", "tid": b"\x01" * 16},
    ],
    "gcsd": [
        {"t": "ping", "r": 1}, {"t": "info", "r": 2},
        {"t": "kv_get", "r": 4, "ns": "fuzz", "key": b"k"},
        {"t": "kv_put", "r": 3, "ns": "fuzz", "key": b"k", "value": b"v"},
        {"t": "get", "r": 9, "table": "actors", "key": b"a"},
        {"t": "scan", "r": 11, "table": "nodes", "prefix": b"", "limit": 2},
        {"t": "get_nodes", "r": 17},
        {"t": "heartbeat", "r": 15, "node_id": NODE, "available": {"CPU": 1.0}, "v": 1},
        {"t": "chain", "k": "ack", "s": 0, "e": 0, "src": 7, "a": 1, "c": 1},
    ],
}


@dataclass
class Target:
    """One place the fuzzer sends to. ``kind``: unix, tls, raw (TCP, no keys), zmq, zmq_raw."""

    name: str
    kind: str
    address: Any
    samples: list[dict[str, Any]]
    max_frame: int = 64 << 20
    zmq_type: int = zmq.DEALER
    samples_key: str = ""
    sent: int = 0
    connections: int = 0
    unreachable: int = 0


@dataclass
class Report:
    targets: list[Target]
    workload_ok: int = 0
    workload_wrong: list[str] = field(default_factory=list)
    rss_before: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{t.name:<34} {t.kind:<7} {t.sent:>7} messages {t.connections:>6} connections"
               + (f" ({t.unreachable} unreachable)" if t.unreachable else "")
               for t in self.targets]
        for name, before in self.rss_before.items():
            after = self.rss_after.get(name, 0)
            out.append(f"{name:<34} private memory {before >> 20} MiB -> {after >> 20} MiB")
        out.append(f"workload: {self.workload_ok} right, {len(self.workload_wrong)} wrong")
        return out


# --------------------------------------------------------------- generation
def _value(rng: random.Random, depth: int = 0) -> Any:
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, rng.randrange(1000)])
    if pick == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), 1e300])
    if pick == 4:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(12)))
    if pick == 5:
        return rng.randbytes(rng.choice([0, 1, 16, 28, 65, rng.randrange(300)]))
    if pick in (6, 7):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["t", "r", "oid", "pid", "x", "res"]): _value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def mutate(rng: random.Random, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A valid message with a few fields replaced, dropped or added."""
    msg = dict(rng.choice(samples))
    for _ in range(rng.randrange(1, 4)):
        action = rng.randrange(4)
        if action == 0 and msg:
            msg[rng.choice(list(msg))] = _value(rng)
        elif action == 1 and msg:
            msg.pop(rng.choice(list(msg)))
        elif action == 2:
            msg[rng.choice(["r", "x", "pid", "kind", "oids", "res"])] = _value(rng)
        else:
            msg["t"] = rng.choice([m["t"] for m in samples] + ["", "zz", "pg_x"])
    return msg


def body(rng: random.Random, samples: list[dict[str, Any]], runs_code: bool = False) -> bytes:
    """One unframed body: valid, mutated, mangled or random.

    ``runs_code``: a worker's port, where a well-formed task or call is an
    order to run code (any member may give it); such bodies get a broken
    ``tid``, so the fuzz exercises the worker's decoding, not user code.
    """
    kind = rng.randrange(5)
    try:
        if kind in (0, 1, 2):
            msg = rng.choice(samples) if kind == 0 else mutate(rng, samples)
            if runs_code and msg.get("t") in ("task", "call"):
                msg = {**msg, "tid": rng.choice([None, "", 7, [b"x"], b""])}
            return encode_body(msg)
    except (TypeError, ValueError, OverflowError):
        pass
    seed = rng.choice(samples)
    if runs_code:  # flipped bits could still spell a well-formed task
        seed = {**seed, "tid": None}
    raw = bytearray(encode_body(seed))
    if kind == 3 and raw:
        for _ in range(rng.randrange(1, 5)):
            raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        return bytes(raw)
    return rng.randbytes(rng.randrange(1, 512))


def stream(rng: random.Random, target: Target) -> tuple[bytes, int]:
    """Bytes for one connection (length-prefixed frames) and how many messages they hold."""
    frames, n = [], rng.randrange(1, 6)
    for _ in range(n):
        b = body(rng, target.samples, target.samples_key == "worker")
        frames.append(HEADER.pack(len(b)) + b)
    tail = rng.randrange(10)
    if tail == 0:  # a length prefix past the limit (up to 4 GiB), a little body
        frames.append(HEADER.pack(rng.choice([target.max_frame + 1, 2**32 - 1]))
                      + rng.randbytes(64))
        n += 1
    elif tail == 1:  # a frame cut short
        frames.append(HEADER.pack(1000) + rng.randbytes(rng.randrange(999)))
        n += 1
    elif tail == 2:  # bytes that are no frame at all
        frames.append(rng.randbytes(rng.randrange(1, 64)))
        n += 1
    return b"".join(frames), n


# --------------------------------------------------------------- sending
def _drain(sock: socket.socket, seconds: float) -> None:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (OSError, ssl.SSLError):
        pass


def hit(rng: random.Random, target: Target, ctx: zmq.Context) -> None:
    """One connection's worth of fuzz to ``target``."""
    if target.kind in ("zmq", "zmq_raw"):
        sock = ctx.socket(target.zmq_type)
        sock.linger = 0
        if target.kind == "zmq":
            security.curve_client(sock)
        sock.connect(target.address)
        n = rng.randrange(1, 8)
        for _ in range(n):
            try:  # without a peer yet (or a refused handshake) a send would block
                sock.send(body(rng, target.samples), zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.001)
        sock.poll(5)
        sock.close()
        target.sent += n
        target.connections += 1
        return
    try:
        if target.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(0.5)  # a busy worker accepts late: move on
            sock.connect(target.address)
        elif target.kind == "tls":
            # The transfer port speaks the bulk link (libclient/bulk_link.py).
            sock = security.connect(target.address, 0.3, bulk=target.samples_key == "transfer")
        else:
            sock = socket.create_connection(target.address, timeout=0.5)
        sock.settimeout(0.5)
    except (OSError, ssl.SSLError):
        target.unreachable += 1
        return
    data, n = stream(rng, target)
    try:
        sock.sendall(data)
        _drain(sock, rng.choice([0.0, 0.0, 0.005]))
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()
    target.sent += n
    target.connections += 1


def oversized_zmq(target: Target, ctx: zmq.Context) -> None:
    """One ZeroMQ message past gcsd's MAXMSGSIZE: the connection must be dropped."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    security.curve_client(sock)
    sock.connect(target.address)
    try:
        sock.send(b"\x00" * ((64 << 20) + 1), zmq.NOBLOCK)
    except zmq.Again:
        pass
    sock.poll(500)
    sock.close()
    target.sent += 1
    target.connections += 1


# --------------------------------------------------------------- discovery
def _listening_tcp(pid: int) -> list[tuple[str, int]]:
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def discover(cluster: Any) -> tuple[list[Target], dict[str, int]]:
    """Every port and socket of the cluster, and the daemons' pids by name."""
    from libclient.gcs_client import GcsClient

    targets: list[Target] = []
    pids: dict[str, int] = {}
    gcs = cluster.gcs_address if cluster.gcs_address.startswith("tcp://") else \
        f"tcp://{cluster.gcs_address}"
    host, _, port = gcs.rpartition(":")
    targets += [Target("gcsd request", "zmq", gcs, SAMPLES["gcsd"], samples_key="gcsd"),
                Target("gcsd request (no keys)", "zmq_raw", gcs, SAMPLES["gcsd"], samples_key="gcsd"),
                Target("gcsd pub-sub", "zmq", f"{host}:{int(port) + 1}", SAMPLES["gcsd"],
                       zmq_type=zmq.XSUB, samples_key="gcsd")]
    with GcsClient(cluster.head_node.address, timeout=10) as client:
        nodes = [n for n in client.get_nodes() if n.get("state") == "ALIVE"]
    for i, node in enumerate(cluster.list_all_nodes()):
        pids[f"node{i} stored"] = node.daemon_pid("stored")
        pids[f"node{i} raylet"] = node.daemon_pid("raylet")
    pids["gcsd"] = cluster.head_node.daemon_pid("gcsd")
    for i, info in enumerate(sorted(nodes, key=lambda n: n["raylet_socket"])):
        tag = f"node{i}"
        rh, _, rp = info["raylet_address"].rpartition(":")
        sh, _, sp = info["store_address"].rpartition(":")
        targets += [
            Target(f"{tag} raylet unix", "unix", info["raylet_socket"], SAMPLES["raylet"], samples_key="raylet"),
            Target(f"{tag} raylet tcp", "tls", (rh, int(rp)), SAMPLES["raylet"], samples_key="raylet"),
            Target(f"{tag} raylet tcp (no keys)", "raw", (rh, int(rp)), SAMPLES["raylet"], samples_key="raylet"),
            Target(f"{tag} stored unix", "unix", info["store_socket"], SAMPLES["stored"],
                   16 << 20, samples_key="stored"),
            Target(f"{tag} stored transfer", "tls", (sh, int(sp)), SAMPLES["transfer"], 4096, samples_key="transfer"),
            Target(f"{tag} stored transfer (no keys)", "raw", (sh, int(sp)), SAMPLES["transfer"], samples_key="transfer"),
        ]
        run = os.path.dirname(info["raylet_socket"])
        for j, path in enumerate(sorted(glob.glob(f"{run}/*.sock"))):
            if os.path.basename(path) not in ("raylet.sock", "stored.sock"):
                targets.append(Target(f"{tag} worker{j} unix", "unix", path, SAMPLES["worker"], samples_key="worker"))
        for j, child in enumerate(psutil.Process(info["pid"]).children()):
            for addr in _listening_tcp(child.pid):
                targets.append(Target(f"{tag} worker{j} tcp", "tls", addr, SAMPLES["worker"], samples_key="worker"))
    return targets, pids


def private_memory(pid: int) -> int:
    mem = psutil.Process(pid).memory_info()
    return mem.rss - mem.shared


# --------------------------------------------------------------- the run
def fuzz(cluster: Any, seconds: float, seed: int, workload: Any,
         exclude: tuple[str, ...] = ()) -> Report:
    """Fuzz every target of ``cluster`` for ``seconds`` while ``workload(stop, report)`` runs
    (leaving out targets whose name contains one of ``exclude``)."""
    targets, pids = discover(cluster)
    targets = [t for t in targets if not any(x in t.name for x in exclude)]
    report = Report(targets)
    report.rss_before = {name: private_memory(pid) for name, pid in pids.items()}
    stop = threading.Event()
    worker = threading.Thread(target=workload, args=(stop, report), daemon=True)
    worker.start()
    # The sender is a process of its own: a driver's waits spin and would
    # starve a sending thread of the GIL.
    spec = json.dumps([[t.name, t.kind, t.address, t.samples_key, t.max_frame, t.zmq_type]
                       for t in targets])
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--send",
                              "--seconds", str(seconds), "--seed", str(seed)], input=spec,
                             capture_output=True, text=True, timeout=seconds + 120)
    finally:
        stop.set()
        worker.join(120)
    if out.returncode != 0:
        raise RuntimeError(f"fuzz sender failed: {out.stderr[-2000:]}")
    for t, (sent, conns, unreachable) in zip(targets, json.loads(out.stdout), strict=True):
        t.sent, t.connections, t.unreachable = sent, conns, unreachable
    report.rss_after = {name: private_memory(pid) for name, pid in pids.items()
                        if psutil.pid_exists(pid)}
    return report


def send(spec: list[list[Any]], seconds: float, seed: int) -> list[list[int]]:
    """The sending side (in its own process): hit random targets until time is up."""
    targets = [Target(name, kind, tuple(addr) if isinstance(addr, list) else addr,
                      SAMPLES[key], max_frame, zmq_type, samples_key=key)
               for name, kind, addr, key, max_frame, zmq_type in spec]
    rng = random.Random(seed)
    ctx = zmq.Context()
    try:
        oversized_zmq(targets[0], ctx)
        deadline = time.monotonic() + seconds
        rest_until = [0.0] * len(targets)  # a busy worker does not accept: leave it a while
        while (now := time.monotonic()) < deadline:
            ready = [i for i, t in enumerate(rest_until) if t <= now] or range(len(targets))
            i = rng.choice(ready)
            missed = targets[i].unreachable
            hit(rng, targets[i], ctx)
            if targets[i].unreachable > missed:
                rest_until[i] = time.monotonic() + 1.0
    finally:
        ctx.term()
    return [[t.sent, t.connections, t.unreachable] for t in targets]


def still_serving(cluster: Any) -> list[str]:
    """What does not answer a ping now (empty: everything serves)."""
    from libclient.gcs_client import GcsClient

    bad = []
    with GcsClient(cluster.head_node.address, timeout=10) as client:
        client.ping()
        nodes = [n for n in client.get_nodes() if n.get("state") == "ALIVE"]
    if len(nodes) != len(cluster.list_all_nodes()):
        bad.append(f"{len(nodes)} nodes alive of {len(cluster.list_all_nodes())}")
    for info in nodes:
        for path in (info["raylet_socket"], info["store_socket"]):
            if _ping_unix(path) is None:
                bad.append(path)
        host, _, port = info["raylet_address"].rpartition(":")
        sock = security.connect((host, int(port)), 5.0)
        try:
            sock.sendall(pack({"t": "ping", "r": 1}))
            if _reply(sock) is None:
                bad.append(info["raylet_address"])
        finally:
            sock.close()
    return bad


def _ping_unix(path: str) -> dict[str, Any] | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(pack({"t": "ping", "r": 1}))
        return _reply(sock)
    except OSError:
        return None
    finally:
        sock.close()


def _reply(sock: socket.socket) -> dict[str, Any] | None:
    dec = FrameDecoder()
    sock.settimeout(10)
    while True:
        msg = dec.next()
        if msg is not None:
            return msg
        data = sock.recv(65536)
        if not data:
            return None
        dec.feed(data)


def default_workload(stop: threading.Event, report: Report) -> None:
    """Tasks with objects and actor calls, each answer checked."""
    import numpy as np

    import libclient as ray

    @ray.remote(num_cpus=1)
    def total(x: Any) -> int:
        return int(np.asarray(x).sum())

    @ray.remote(num_cpus=1)
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    counter, expect, i = Counter.remote(), 0, 0
    # A pause between rounds: the driver's waits spin and hold the GIL, and
    # the fuzzer shares this process.
    while not stop.wait(0.01):
        i += 1
        try:
            n = 1000 + i
            got = ray.get(total.remote(ray.put(np.ones(n, dtype=np.uint8))), timeout=60)
            expect += i
            got_n = ray.get(counter.add.remote(i), timeout=60)
            for what, value, want in (("task", got, n), ("actor", got_n, expect)):
                if value == want:
                    report.workload_ok += 1
                else:
                    report.workload_wrong.append(f"{what}: {value} != {want}")
        except Exception as exc:  # a wrong answer, reported, not a crash of the fuzzer
            report.workload_wrong.append(f"{type(exc).__name__}: {exc}")
            return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--send", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.send:  # the sender process fuzz() starts: targets on stdin, counts on stdout
        print(json.dumps(send(json.loads(sys.stdin.read()), ns.seconds, ns.seed)))
        return 0
    from libclient.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(ns.nodes - 1):
            cluster.add_node(num_cpus=2)
        cluster.connect()
        report = fuzz(cluster, ns.seconds, ns.seed, default_workload)
        bad = still_serving(cluster)
        print("\n".join(report.lines()))
        grown = {k: v - report.rss_before[k] for k, v in report.rss_after.items()
                 if v - report.rss_before[k] > RSS_BOUND}
        missing = sorted(set(report.rss_before) - set(report.rss_after))
        print(f"not serving: {bad or 'none'}; grew past {RSS_BOUND >> 20} MiB: {grown or 'none'}; "
              f"gone: {missing or 'none'}")
        return 0 if not (bad or grown or missing or report.workload_wrong) else 1
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
