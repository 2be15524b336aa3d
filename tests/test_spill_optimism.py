"""A spill the client never follows must not leave a queued lease waiting forever.

When a raylet spills a lease it subtracts the demand from the target node
in its view at once (optimism) and puts the node's last real snapshot back
after ``optimism_timeout`` (3 s). A node whose free resources do not change
sends no new snapshot, so only that expiry makes it look free again. The
port fuzzer found the expiry applied only when something else made the
raylet run a scheduling pass: its lease requests were spilled and dropped,
the workload's next lease queued on the full head node behind the guess,
and with the fuzzer gone nothing woke the raylet (a workload ``get`` timed
out after 60 s). Real 2-node cluster, a raw client in the fuzzer's place.
"""

import socket
import time

import pytest

import libclient as ray
from libclient.cluster_utils import Cluster
from libclient.protocol import FrameDecoder, pack


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        c.connect()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _ask(sock: socket.socket, dec: FrameDecoder, msg: dict) -> dict:
    sock.sendall(pack(msg))
    while True:
        reply = dec.next()
        if reply is not None:
            return reply
        data = sock.recv(65536)
        assert data, "raylet closed the connection"
        dec.feed(data)


@pytest.mark.timeout(120)
def test_a_dropped_spill_does_not_stall_the_next_lease(cluster):
    @ray.remote(num_cpus=1)
    def one():
        return 1

    head = next(n for n in ray.nodes() if n["NodeID"] == cluster.head_node.node_id)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(head["RayletSocketName"])
    dec = FrameDecoder()
    try:
        # Hold the head's only CPU, then ask again: spilled to the other
        # node, which now looks full to the head. Never follow the spill.
        deadline = time.monotonic() + 20
        while not (held := _ask(sock, dec, {"t": "lease", "r": 1, "res": {"CPU": 1.0}}))["ok"]:
            assert time.monotonic() < deadline, held  # the head still busy starting up
            time.sleep(0.2)
        spilled = _ask(sock, dec, {"t": "lease", "r": 2, "res": {"CPU": 1.0}})
        assert spilled.get("error") == "spill", spilled
        # The other node is idle: the task must run there once the guess expires.
        assert ray.get(one.remote(), timeout=20) == 1
    finally:
        sock.close()
