"""Real multi-node clusters on one machine, through ``libclient.cluster_utils``.

Every node has its own launcher, stored, raylet, runtime directory and
ports; they share only the head's gcsd, reached over TCP.
"""

import os
import time

import psutil
import pytest

from libclient.cluster_utils import Cluster


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_timeout_s": 2.0})
    try:
        c.add_node(num_cpus=2, resources={"accel": 1})
        c.wait_for_nodes()
        c.connect(namespace="multinode")
        yield c
    finally:
        c.shutdown()


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_nodes_register_with_their_own_addresses_and_resources(cluster):
    import libclient as ray

    nodes = {n["NodeID"]: n for n in ray.nodes()}
    mine = {n.node_id for n in cluster.list_all_nodes()}
    assert mine <= set(nodes)
    assert all(nodes[i]["Alive"] for i in mine)
    raylets = {nodes[i]["RayletAddress"] for i in mine}
    assert len(raylets) == len(mine) and all(a.startswith("127.0.0.1:") for a in raylets)
    sockets = {nodes[i]["RayletSocketName"] for i in mine}
    assert len(sockets) == len(mine)  # each node its own runtime directory
    total = ray.cluster_resources()
    assert total["CPU"] == 3 and total["accel"] == 1
    # The driver connected by gcsd address lands on the head node.
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id


def test_nodes_share_no_runtime_directory(cluster):
    """No process of one node holds a file or socket under another node's directory."""
    nodes = cluster.list_all_nodes()
    for node in nodes:
        others = [n.session_dir for n in nodes if n is not node]
        for proc in node.all_processes():
            try:
                paths = [f.path for f in proc.open_files()]
                paths += [c.laddr for c in proc.net_connections(kind="unix") if c.laddr]
                paths += [c.raddr for c in proc.net_connections(kind="unix") if c.raddr]
            except psutil.NoSuchProcess:
                continue
            for path in paths:
                assert not any(str(path).startswith(d) for d in others), (proc, path)


def test_graceful_removal_is_seen_at_once_and_sigkill_within_the_timeout(cluster):
    import libclient as ray

    extra = cluster.add_node(num_cpus=1, resources={"spare": 2})
    _wait(lambda: ray.cluster_resources().get("spare") == 2, what="node to join")
    t0 = time.monotonic()
    cluster.remove_node(extra, allow_graceful=True)
    _wait(lambda: "spare" not in ray.cluster_resources(), timeout=5, what="unregister")
    assert time.monotonic() - t0 < 5

    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    _wait(lambda: ray.cluster_resources().get("doomed") == 1, what="node to join")
    pids = [p.pid for p in doomed.all_processes()]
    assert len(pids) >= 3  # launcher, stored, raylet (+ workers)
    t0 = time.monotonic()
    cluster.remove_node(doomed, allow_graceful=False)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    row = _wait(lambda: next((n for n in ray.nodes() if n["NodeID"] == doomed.node_id
                              and not n["Alive"]), None), timeout=10, what="node death")
    # node_timeout_s=2 on this cluster; the gcsd tick is at most 0.5 s.
    assert time.monotonic() - t0 < 6
    assert "heartbeat" in row["DeathReason"]
    assert "doomed" not in ray.cluster_resources()


def test_init_by_gcs_address_without_a_local_raylet_says_why(tmp_path):
    from libclient.api import _local_raylet

    # A gcsd address with nobody behind it: a clear error, not a hang.
    with pytest.raises(Exception) as info:
        _local_raylet("127.0.0.1:1")
    assert "127.0.0.1:1" in str(info.value) or "gcsd" in str(info.value).lower()


def test_remote_raylet_port_survives_garbage_and_strangers(cluster):
    import socket

    import libclient as ray

    node = next(n for n in ray.nodes() if n["NodeID"] == cluster.head_node.node_id)
    host, port = node["RayletAddress"].rsplit(":", 1)
    for payload in (b"\x00" * 3, b"\xff\xff\xff\x7f" + b"x" * 100, b"\x05\x00\x00\x00hello",
                    os.urandom(4096)):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    silent = socket.create_connection((host, int(port)), timeout=5)
    silent.close()
    # The raylet still schedules.
    @ray.remote
    def one():
        return 1

    assert ray.get(one.remote(), timeout=30) == 1
