"""Bounded input on every port: oversized frames and connection floods, real daemons.

The flood test starts its daemons with ``[security] max_connections = 64``,
so a flood past the cap is cheap to make.
"""

import glob
import os
import socket
import time

import numpy as np
import psutil
import pytest
import zmq

import libclient as ray
from libclient import security
from libclient.cluster_utils import Cluster
from libclient.gcs_client import GcsClient
from libclient.protocol import pack

CAP = 64
HUGE = (4 << 30) - 1  # a 4 GiB length prefix


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        c.connect()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@ray.remote(num_cpus=1)
def _total(x):
    return int(np.asarray(x).sum())


def _node(c):
    with GcsClient(c.head_node.address, timeout=10) as gcs:
        return next(n for n in gcs.get_nodes() if n.get("state") == "ALIVE")


def _hp(address):
    host, _, port = address.rpartition(":")
    return host, int(port)


def _closed(sock, timeout=10.0):
    """The peer ends the connection (an error frame may come first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


def _unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _private(pid):
    m = psutil.Process(pid).memory_info()
    return m.rss - m.shared


def test_a_4gib_length_prefix_is_refused_on_every_port(cluster):
    node = _node(cluster)
    run = os.path.dirname(node["raylet_socket"])
    assert ray.get(_total.remote(np.ones(10, dtype=np.uint8)), timeout=60) == 10  # workers up
    workers = [p for p in glob.glob(f"{run}/*.sock")
               if os.path.basename(p) not in ("raylet.sock", "stored.sock")]
    worker_tcp = [(c.laddr.ip, c.laddr.port) for w in psutil.Process(node["pid"]).children()
                  for c in w.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert workers and worker_tcp
    pids = {"raylet": cluster.head_node.daemon_pid("raylet"),
            "stored": cluster.head_node.daemon_pid("stored"),
            "gcsd": cluster.head_node.daemon_pid("gcsd")}
    before = {k: _private(p) for k, p in pids.items()}
    opens = {
        "raylet unix": lambda: _unix(node["raylet_socket"]),
        "raylet tcp": lambda: security.connect(_hp(node["raylet_address"]), 5.0),
        "stored unix": lambda: _unix(node["store_socket"]),
        "stored transfer": lambda: security.connect(_hp(node["store_address"]), 5.0, bulk=True),
        "worker unix": lambda: _unix(workers[0]),
        "worker tcp": lambda: security.connect(worker_tcp[0], 5.0),
    }
    for name, open_ in opens.items():
        sock = open_()
        try:
            sock.sendall(HUGE.to_bytes(4, "little") + b"\x00" * 64)
            assert _closed(sock), name
        finally:
            sock.close()
    # gcsd (ZeroMQ): a message past MAXMSGSIZE drops the connection; gcsd serves on.
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        security.curve_client(s)
        s.connect(cluster.head_node.address)
        s.send(b"\x00" * ((64 << 20) + 1))
        assert not s.poll(1000)
        s.close()
    finally:
        ctx.term()
    with GcsClient(cluster.head_node.address, timeout=10) as gcs:
        gcs.ping()
    for k, pid in pids.items():
        assert _private(pid) - before[k] < 32 << 20, k
    assert ray.get(_total.remote(np.ones(1000, dtype=np.uint8)), timeout=60) == 1000


@pytest.fixture
def capped_node(tmp_path):
    """gcsd, stored and raylet started on their own with ``max_connections = 64``."""
    from test_standalone import _start, _stop

    capped = ["--set", f"security.max_connections={CAP}", "--config", "none"]
    run, procs = tmp_path / "run", []
    try:
        gcs_proc, gcs = _start("gcsd", ["--port", "0", "--data-dir", str(tmp_path / "gcs"),
                                        "--config", "none"], tmp_path)
        procs.append(gcs_proc)
        store_proc, _ = _start("stored", ["--socket", str(run / "stored.sock"),
                                          "--memory", str(64 << 20), *capped], tmp_path)
        procs.append(store_proc)
        raylet_proc, ready = _start("raylet", ["--socket", str(run / "raylet.sock"),
                                               "--store-socket", str(run / "stored.sock"),
                                               "--gcs-address", gcs["address"],
                                               "--num-cpus", "1", *capped], tmp_path)
        procs.append(raylet_proc)
        yield {"run": run, "procs": procs, "tmp": tmp_path}
    finally:
        for p in reversed(procs):
            _stop(p)


def _ping(sock, r):
    sock.sendall(pack({"t": "ping", "r": r}))
    sock.settimeout(10)
    return sock.recv(4096)


def test_a_connection_flood_past_the_cap_is_refused_and_members_are_served(capped_node):
    run = capped_node["run"]
    for name in ("raylet", "stored"):
        path = str(run / f"{name}.sock")
        member = _unix(path)  # connected before the flood
        flood = []
        try:
            for _ in range(CAP + 20):
                flood.append(_unix(path))
            time.sleep(0.5)
            refused = 0  # the ones past the cap were accepted and closed at once
            for s in flood:
                s.setblocking(False)
                try:
                    refused += s.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    refused += 1
            assert refused >= 20, (name, refused)
            assert _ping(member, 1), name  # the member is served throughout
        finally:
            for s in flood:
                s.close()
        time.sleep(0.3)
        again = _unix(path)  # once the flood is gone, new clients get in again
        assert _ping(again, 2), name
        again.close()
        member.close()
        log = open(capped_node["tmp"] / f"{name}.log").read()
        assert 1 <= log.count('"connection_refused"') <= 3, name  # once per peer, not per socket
    for p in capped_node["procs"]:
        assert p.poll() is None
