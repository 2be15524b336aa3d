"""A leased worker serves only its lease holder: the grant's token opens the connection.

Security issue 11, with real daemons on a one-CPU node (one worker). A
same-uid process that connects to a worker's socket and sends half a frame,
or nothing, must not hold the worker (it used to: the next task then waited
forever in the listen backlog); one whose first frame is not a hello with
the current lease's token gets nothing decoded, unpickled or run.
"""

import glob
import json
import os
import socket
import time

import cloudpickle
import psutil
import pytest

import libclient as ray
from libclient import api, lease_gate, serialization
from libclient.cluster_utils import Cluster
from libclient.protocol import HEADER, pack


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.connect()
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@ray.remote
def _one():
    return 1


def _worker_sockets():
    run = os.path.dirname(ray.nodes()[0]["RayletSocketName"])
    found = glob.glob(f"{run}/w-*.sock")
    assert found, os.listdir(run)
    return found


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def _closed_within(sock, seconds):
    """True if the worker closes ``sock`` within ``seconds`` (it answers nothing)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(4096) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_silent_or_half_sent_connection_does_not_hold_the_worker(cluster):
    assert ray.get(_one.remote(), timeout=60) == 1
    time.sleep(0.3)  # the idle lease goes back: the worker waits for the next holder
    held = []
    try:
        # No holder comes: the strays are closed at the hello deadline, and logged.
        t0 = time.monotonic()
        strays = [_raw(path) for path in _worker_sockets() for _ in range(2)]
        held += strays
        strays[0].sendall(HEADER.pack(1000) + b"x" * 10)
        for s in strays:
            assert _closed_within(s, lease_gate.HELLO_TIMEOUT_S + 5)
        assert time.monotonic() - t0 > lease_gate.HELLO_TIMEOUT_S - 1
        refused = _logged("holder_refused", cluster)  # once for our pid (two strays)
        assert [r["peer_pid"] for r in refused] == [os.getpid()], refused
        assert "no hello within" in refused[0]["reason"]
        # The next holder comes while strays hold the worker: it is served at once.
        for path in _worker_sockets():
            half = _raw(path)
            half.sendall(HEADER.pack(1000) + b"x" * 10)  # half a frame, then nothing
            silent = _raw(path)
            held += [half, silent]
        time.sleep(0.2)  # the worker has them before the next lease's holder connects
        t0 = time.monotonic()
        assert ray.get(_one.remote(), timeout=30) == 1
        assert time.monotonic() - t0 < 3.0, "the next task waited behind a stray connection"
        for s in held:  # and the strays are cut off (when the holder came, here)
            assert _closed_within(s, lease_gate.HELLO_TIMEOUT_S + 5)
    finally:
        for s in held:
            s.close()


def test_a_tcp_peer_stalled_in_the_tls_handshake_does_not_hold_the_worker(cluster):
    assert ray.get(_one.remote(), timeout=60) == 1
    time.sleep(0.3)
    raylet = psutil.Process(cluster.head_node.daemon_pid("raylet"))
    ports = [(c.laddr.ip, c.laddr.port) for w in raylet.children()
             for c in w.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    assert ports, "the worker listens on TCP for holders on other nodes"
    held = []
    try:
        for addr in ports:  # connect, start no handshake, send nothing
            held.append(socket.create_connection(addr, timeout=5))
        time.sleep(0.2)
        t0 = time.monotonic()
        assert ray.get(_one.remote(), timeout=30) == 1
        assert time.monotonic() - t0 < 3.0, "the next task waited behind a TLS handshake"
        for s in held:
            assert _closed_within(s, lease_gate.HELLO_TIMEOUT_S + 5)
    finally:
        for s in held:
            s.close()


def _logged(event, cluster):
    """The ``event`` lines of every log of the node's session (workers' included)."""
    lines = []
    for path in glob.glob(f"{cluster.head_node.session_dir}/**/*.log", recursive=True):
        with open(path) as f:
            lines += [json.loads(line) for line in f if f'"{event}"' in line]
    return lines


class _MakesDirWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _task_frame(core, tmp_path):
    """A well-formed task whose function creates a file and whose argument
    creates a directory as soon as it is unpickled."""
    ran, unpickled = str(tmp_path / "ran"), str(tmp_path / "unpickled")

    def touch(_arg):
        open(ran, "w").close()

    key = core.export_function(cloudpickle.dumps(touch), "touch")
    args = serialization.serialize(((_MakesDirWhenUnpickled(unpickled),), {})).to_wire()
    msg = {"t": "task", "tid": os.urandom(16), "fn": key, "name": "touch", "args": args,
           "nret": 1, "job": core.job_id}
    return pack(msg), ran, unpickled


@pytest.mark.parametrize("hello", [None, {"t": "hi", "tok": b"\0" * 16}, {"t": "hi"}],
                         ids=["no-hello", "wrong-token", "no-token"])
def test_a_connection_without_the_lease_token_gets_nothing_run(cluster, tmp_path, hello):
    core = api._require()
    frame, ran, unpickled = _task_frame(core, tmp_path)
    assert ray.get(_one.remote(), timeout=60) == 1
    time.sleep(0.3)
    socks = []
    try:
        for path in _worker_sockets():
            s = _raw(path)
            s.sendall((pack(hello) if hello else b"") + frame)
            socks.append(s)
        for s in socks:  # closed at once, or at the hello deadline (a wrong token)
            assert _closed_within(s, lease_gate.HELLO_TIMEOUT_S + 5)
        assert not os.path.exists(unpickled), "the worker unpickled a stranger's payload"
        assert not os.path.exists(ran), "the worker ran a stranger's task"
        assert ray.get(_one.remote(), timeout=30) == 1  # the worker serves its holders still
    finally:
        for s in socks:
            s.close()


def test_judge_hello_accepts_only_the_current_token():
    tok = lease_gate.new_token()
    assert lease_gate.judge_hello({"t": "hi", "tok": tok}, tok) == lease_gate.OK
    assert lease_gate.judge_hello({"t": "hi", "tok": tok}, None) == lease_gate.WAIT
    assert lease_gate.judge_hello({"t": "hi", "tok": lease_gate.new_token()}, tok) == \
        lease_gate.WAIT
    for bad in ({"t": "task", "tok": tok}, {"t": "hi"}, {"t": "hi", "tok": "x" * 16},
                {"t": "hi", "tok": tok[:8]}):
        assert lease_gate.judge_hello(bad, tok) not in (lease_gate.OK, lease_gate.WAIT)
