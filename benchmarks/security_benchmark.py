"""What the cluster's link security costs, per mechanism (docs/benchmarks.md, docs/security.md).

    python benchmarks/security_benchmark.py [--mib 1024] [--json out.json]

Over loopback between two processes, one sender and one receiver:

* bulk throughput: plain TCP, TLS 1.3 through Python's ``ssl`` (what raylet,
  worker and actor links use), the bulk link (libclient/bulk_link.py: TLS
  handshake, then 4 MiB AES-GCM records; what stored-to-stored uses by
  default), the bulk link with ``encrypt_bulk = false`` (HMAC handshake, then
  plain bytes with a GMAC per record), ZeroMQ plain and ZeroMQ CURVE (gcsd's links);
* connection set-up: plain TCP connect vs connect + TLS handshake (what a
  remote worker lease or a new link costs once).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import ssl
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libclient import security  # noqa: E402

CHUNK = 4 << 20


def _tcp_receiver(port_q: mp.Queue, keys_dir: str | None, mode: str, total: int) -> None:
    keys = security.load(keys_dir, encrypt_bulk=mode != "hmac") if keys_dir else None
    listen = socket.create_server(("127.0.0.1", 0))
    port_q.put(listen.getsockname()[1])
    sock, _ = listen.accept()
    if keys is not None:
        if mode in ("hmac", "bulk"):
            sock = security.server_wrap(sock, keys, bulk=True)
        else:
            sock = security.accept_tls(sock, keys)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    while got < total:
        n = sock.recv_into(view)
        if not n:
            break
        got += n
    sock.sendall(b"k")
    sock.close()


def bulk_tcp(mode: str, keys_dir: str, total: int) -> float:
    """GB/s sending ``total`` bytes over one connection."""
    q: mp.Queue = mp.Queue()
    use = keys_dir if mode != "plain" else None
    p = mp.Process(target=_tcp_receiver, args=(q, use, mode, total))
    p.start()
    port = q.get()
    keys = security.load(keys_dir, encrypt_bulk=mode != "hmac") if use else None
    if keys is None:
        sock = socket.create_connection(("127.0.0.1", port))
    else:
        sock = security.connect(("127.0.0.1", port), 5.0, keys, bulk=mode != "tls")
    data = memoryview(os.urandom(CHUNK))
    t = time.perf_counter()
    sent = 0
    while sent < total:
        sock.sendall(data)
        sent += CHUNK
    sock.recv(1)
    dt = time.perf_counter() - t
    sock.close()
    p.join()
    return total / dt / 1e9


def _zmq_receiver(port_q: mp.Queue, keys_dir: str | None, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    zap = None
    s = ctx.socket(zmq.PULL)
    if keys_dir:
        keys = security.load(keys_dir)

        class _Log:
            def warning(self, *a: object, **k: object) -> None:
                pass

        zap = security.ZapHandler(ctx, keys, _Log())
        security.curve_server(s, keys)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    port_q.put(port)
    for _ in range(count):
        s.recv(copy=False)
    port_q.put("done")
    s.close()
    if zap:
        zap.stop()
    ctx.term()


def bulk_zmq(curve: bool, keys_dir: str, total: int) -> float:
    import zmq

    count = total // CHUNK
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=_zmq_receiver, args=(q, keys_dir if curve else None, count))
    p.start()
    port = q.get()
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    if curve:
        security.curve_client(s, security.load(keys_dir))
    s.connect(f"tcp://127.0.0.1:{port}")
    data = os.urandom(CHUNK)
    s.send(b"warm")  # the CURVE handshake before the clock starts
    t = time.perf_counter()
    for _ in range(count - 1):
        s.send(data, copy=False)
    assert q.get() == "done"
    dt = time.perf_counter() - t
    s.close()
    ctx.term()
    p.join()
    return (count - 1) * CHUNK / dt / 1e9


def _accept_loop(port_q: mp.Queue, keys_dir: str | None, n: int) -> None:
    keys = security.load(keys_dir) if keys_dir else None
    listen = socket.create_server(("127.0.0.1", 0), backlog=128)
    port_q.put(listen.getsockname()[1])
    for _ in range(n):
        sock, _ = listen.accept()
        if keys is not None:
            sock = security.accept_tls(sock, keys)
        sock.sendall(b"k")
        sock.close()


def connect_cost(tls: bool, keys_dir: str, n: int = 200) -> float:
    """Milliseconds per connect (+ handshake) and first byte back."""
    q: mp.Queue = mp.Queue()
    p = mp.Process(target=_accept_loop, args=(q, keys_dir if tls else None, n))
    p.start()
    port = q.get()
    keys = security.load(keys_dir) if tls else None
    t = time.perf_counter()
    for _ in range(n):
        sock = security.connect(("127.0.0.1", port), 5.0, keys) if tls \
            else socket.create_connection(("127.0.0.1", port))
        sock.recv(1)
        sock.close()
    dt = time.perf_counter() - t
    p.join()
    return dt / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--json")
    ns = ap.parse_args()
    total = ns.mib << 20
    keys_dir = security.keygen(os.path.join(tempfile.mkdtemp(prefix="shoal-bench-"), "keys"))
    out = {
        "tcp_plain_GBps": bulk_tcp("plain", keys_dir, total),
        "tcp_tls13_aesgcm_GBps": bulk_tcp("tls", keys_dir, total),
        "tcp_bulk_link_aesgcm_GBps": bulk_tcp("bulk", keys_dir, total),
        "tcp_bulk_link_gmac_only_GBps": bulk_tcp("hmac", keys_dir, total),
        "zmq_plain_GBps": bulk_zmq(False, keys_dir, total),
        "zmq_curve_GBps": bulk_zmq(True, keys_dir, total),
        "connect_plain_ms": connect_cost(False, keys_dir),
        "connect_tls13_ms": connect_cost(True, keys_dir),
    }
    out["openssl"] = ssl.OPENSSL_VERSION
    for k, v in out.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
