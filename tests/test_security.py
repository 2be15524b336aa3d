"""Authenticated, encrypted links between hosts (libclient/security.py, docs/security.md).

The unit tests drive the pure HMAC handshake and the key checks. The cluster
tests start real nodes (cluster_utils: every node has the cluster's keys)
and attack their TCP ports as a stranger would: no keys, wrong keys,
tampered and replayed TLS records, oversized frames, a connection flood.
"""

from __future__ import annotations

import glob
import os
import socket
import ssl
import subprocess
import sys
import time

import cloudpickle
import numpy as np
import psutil
import pytest
import zmq

import libclient as ray
from libclient import security
from libclient.cluster_utils import Cluster
from libclient.gcs_client import GcsClient
from libclient.protocol import FrameDecoder, pack

cloudpickle.register_pickle_by_value(sys.modules[__name__])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ units
def _run_hmac(client: security.HmacHandshake, server: security.HmacHandshake) -> None:
    out_s, _ = server.feed(client.start())
    out_c, _ = client.feed(out_s)
    server.feed(out_c + b"app")


def test_hmac_handshake_admits_the_secret_and_refuses_others():
    c = security.HmacHandshake(b"k" * 32, server=False)
    s = security.HmacHandshake(b"k" * 32, server=True)
    out_s, _ = s.feed(c.start())
    out_c, rest = c.feed(out_s)
    assert c.done and rest == b""
    _, app = s.feed(out_c + b"app bytes")
    assert s.done and app == b"app bytes"

    c = security.HmacHandshake(b"wrong" * 8, server=False)
    s = security.HmacHandshake(b"k" * 32, server=True)
    out_s, _ = s.feed(c.start())
    c.feed(out_s)
    assert c.failed and not c.done  # the client sees the server does not know its secret

    s = security.HmacHandshake(b"k" * 32, server=True)
    s.feed(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40)
    assert s.failed == "not a Shoal handshake"


def test_hmac_handshake_replayed_is_refused():
    secret = b"s" * 32
    c = security.HmacHandshake(secret, server=False)
    s = security.HmacHandshake(secret, server=True)
    out_s, _ = s.feed(c.start())
    proof, _ = c.feed(out_s)
    assert s.feed(proof)[1] == b"" and s.done
    # An eavesdropper replays the client's half to a new server: a fresh
    # server nonce makes the recorded proof worthless.
    s2 = security.HmacHandshake(secret, server=True)
    s2.feed(c.start())
    s2.feed(proof)
    assert s2.failed and not s2.done


def test_key_files_readable_by_others_are_refused(tmp_path):
    d = security.keygen(str(tmp_path / "keys"))
    assert oct(os.stat(os.path.join(d, "node.key")).st_mode & 0o777) == "0o600"
    security.load(d)
    os.chmod(os.path.join(d, "curve.secret"), 0o640)
    with pytest.raises(security.SecurityError, match="curve.secret.*group or others"):
        security.load(d)


def test_a_daemon_refuses_to_start_with_open_keys(tmp_path):
    d = security.keygen(str(tmp_path / "keys"))
    os.chmod(os.path.join(d, "node.key"), 0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.update(SHOAL_CONFIG="none", SHOAL_SECURITY_KEYS_DIR=d)
    proc = subprocess.run([sys.executable, "-m", "daemons.stored", "--socket",
                           str(tmp_path / "s.sock"), "--memory", "64M"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "node.key" in proc.stderr and "group or others" in proc.stderr


def test_tls_sockets_pass_bytes_both_ways_non_blocking(tmp_path):
    keys = security.load(security.keygen(str(tmp_path / "keys")))
    listen = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listen.getsockname())
    raw, _ = listen.accept()
    raw.setblocking(False)
    server = security.server_wrap(raw, keys)
    with pytest.raises(BlockingIOError):  # nothing yet: like a plain socket
        server.recv(100)
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(c=security.client_wrap(client, keys)))
    t.start()
    deadline = time.monotonic() + 5
    while t.is_alive() and time.monotonic() < deadline:
        try:
            server.recv(100)  # drives the server's half of the handshake
        except BlockingIOError:
            time.sleep(0.001)
    t.join()
    tls = box["c"]
    tls.sendall(b"hello")
    got = b""
    while not got:
        try:
            got = server.recv(100)
        except BlockingIOError:
            time.sleep(0.001)
    assert got == b"hello"
    assert server.sendmsg([b"a", memoryview(b"bc")]) == 3
    got = b""
    while len(got) < 3:  # one TLS record per receive
        got += tls.recv(10)
    assert got == b"abc"
    assert server.version() == "TLSv1.3"
    assert server.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256",
                                  "TLS_CHACHA20_POLY1305_SHA256")
    for s in (tls, server, listen):
        s.close()


def test_one_tls_recv_returns_every_record_already_here(tmp_path):
    """Many small frames sent one SSL_write each arrive as many records; one
    recv must hand over all of them (a plain socket's recv would), on a
    blocking and a non-blocking socket, and never block for more."""
    keys = security.load(security.keygen(str(tmp_path / "keys")))
    listen = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listen.getsockname())
    raw, _ = listen.accept()
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(s=security.accept_tls(raw, keys)))
    t.start()
    tls = security.client_wrap(client, keys)
    t.join()
    server = box["s"]
    for blocking in (True, False):
        frames = [b"frame-%03d;" % i for i in range(50)]
        for f in frames:
            tls.sendall(f)  # one record each
        time.sleep(0.2)  # all of them are in the server's socket buffer
        server.setblocking(blocking)
        assert server.recv(1 << 16) == b"".join(frames)  # one recv, all 50 records
        if blocking:
            server.settimeout(0.2)
            with pytest.raises(TimeoutError):  # the blocking mode came back intact
                server.recv(100)
            server.settimeout(None)
    # A record cut short is left for the next recv, not waited for.
    tls.sendall(b"whole")
    time.sleep(0.1)
    server.setblocking(True)
    assert server.recv(100) == b"whole"
    for s in (tls, server, listen):
        s.close()


def test_a_second_connection_to_the_same_peer_resumes_its_tls_session(tmp_path):
    """A new lease on a worker we had before skips the certificate handshake;
    a ticket from other key material (another context) is never offered."""
    directory = security.keygen(str(tmp_path / "keys"))
    keys = security.load(directory)
    listen = socket.create_server(("127.0.0.1", 0))
    import threading

    def serve(n):
        for _ in range(n):
            raw, _ = listen.accept()
            tls = security.accept_tls(raw, keys)
            tls.sendall(b"x")
            tls.recv(1)
            tls.close()

    t = threading.Thread(target=serve, args=(3,), daemon=True)
    t.start()
    reused = []
    for k in (keys, keys, security.load(directory)):
        tls = security.client_wrap(socket.create_connection(listen.getsockname()), k)
        assert tls.recv(1) == b"x"  # the server's tickets come with its data
        reused.append(tls.session_reused)
        tls.sendall(b"y")
        security.remember_session(tls)
        tls.close()
    t.join(10)
    assert reused == [False, True, False]
    listen.close()


def _serve_once(keys: security.ClusterKeys, bulk: bool = False):
    """A listening socket and a thread that accepts one client, echoes one message."""
    import threading

    listen = socket.create_server(("127.0.0.1", 0))
    result = {}

    def run():
        raw, _ = listen.accept()
        try:
            if bulk:
                sock = security.server_wrap(raw, keys, bulk=True)
            else:
                sock = security.accept_tls(raw, keys)
            sock.settimeout(5)
            data = sock.recv(100)
            sock.sendall(data)
            result["ok"] = data
        except OSError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=run)
    t.start()
    return listen, t, result


def test_a_node_certificate_issued_by_the_same_ca_is_accepted(tmp_path):
    old = security.load(security.keygen(str(tmp_path / "old")))
    rotated = security.load(security.keygen(str(tmp_path / "new"), ca_dir=old.directory))
    assert not os.path.exists(rotated.path("ca.key"))  # a node's directory needs no CA key
    other = security.load(security.keygen(str(tmp_path / "other")))
    listen, t, result = _serve_once(old)
    with security.connect(listen.getsockname(), 5.0, rotated) as sock:
        sock.sendall(b"ping")
        assert sock.recv(100) == b"ping"
    t.join()
    assert result["ok"] == b"ping"
    listen.close()
    listen, t, result = _serve_once(old)
    with pytest.raises(security.AuthError):
        security.connect(listen.getsockname(), 5.0, other)
    t.join()
    assert "TLS handshake from 127.0.0.1" in result["error"]
    listen.close()


def test_the_hmac_mode_authenticates_then_passes_plain_bytes(tmp_path):
    keys = security.load(security.keygen(str(tmp_path / "k")), encrypt_bulk=False)
    listen, t, result = _serve_once(keys, bulk=True)
    with security.connect(listen.getsockname(), 5.0, keys, bulk=True) as sock:
        sock.sendall(b"chunk")
        assert sock.recv(100) == b"chunk"
    t.join()
    assert result["ok"] == b"chunk"
    listen.close()
    other = security.load(security.keygen(str(tmp_path / "o")), encrypt_bulk=False)
    listen, t, result = _serve_once(keys, bulk=True)
    with pytest.raises(security.AuthError):
        security.connect(listen.getsockname(), 5.0, other, bulk=True)
    t.join()
    assert "error" in result
    listen.close()


def test_the_embedded_cluster_keeps_its_keys_private():
    info = ray.init(num_cpus=1)
    try:
        keys = os.path.join(info["session_dir"], "keys")
        assert os.stat(keys).st_mode & 0o777 == 0o700
        for name in os.listdir(keys):
            assert os.stat(os.path.join(keys, name)).st_mode & 0o077 == 0, name
        assert ray.get(_sum.remote(2), timeout=60) == 2
    finally:
        ray.shutdown()


# --------------------------------------------------------------- clusters
@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        c.add_node(num_cpus=2)
        c.connect()
        yield c
    finally:
        c.shutdown()


def _nodes(c: Cluster) -> list[dict]:
    with GcsClient(c.head_node.address, timeout=10) as gcs:
        return [n for n in gcs.get_nodes() if n.get("state") == "ALIVE"]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _worker_raylet(c: Cluster) -> tuple[str, int]:
    node = next(n for n in _nodes(c) if n["resources"].get("CPU", 0) > 0)
    return _host_port(node["raylet_address"])


def _refused(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True if the peer closes (or resets) the connection without answering."""
    sock.settimeout(timeout)
    try:
        return sock.recv(4096) == b""
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def _raylet_pid(c: Cluster, node: dict) -> int:
    return node["pid"]


@ray.remote(num_cpus=1)
def _sum(x):
    return int(np.asarray(x).sum())


@ray.remote(num_cpus=1)
def _make(n):
    return np.ones(n, dtype=np.uint8)


@ray.remote(num_cpus=1)
class _Counter:
    def __init__(self):
        self.n = 0

    def add(self, k):
        self.n += k
        return self.n


def test_a_cluster_with_keys_runs_tasks_actors_and_transfers(cluster):
    assert os.environ[security.KEYS_ENV] == cluster.keys_dir
    big = ray.put(np.ones(8_000_000, dtype=np.uint8))  # on the head, pulled by the worker node
    assert ray.get(_sum.remote(big), timeout=60) == 8_000_000
    assert int(ray.get(_make.remote(6_000_000), timeout=60).sum()) == 6_000_000
    counter = _Counter.remote()
    assert [ray.get(counter.add.remote(1), timeout=60) for _ in range(3)] == [1, 2, 3]
    assert sorted(ray.get([_sum.remote(i) for i in range(20)], timeout=60)) == list(range(20))


def test_a_client_without_keys_is_refused_everywhere(cluster):
    node = next(n for n in _nodes(cluster) if n["resources"].get("CPU", 0) > 0)
    for address in (node["raylet_address"], node["store_address"]):
        with socket.create_connection(_host_port(address), timeout=5) as sock:
            sock.sendall(pack({"t": "ping", "r": 1}))
            assert _refused(sock), address
    # gcsd speaks only CURVE: a plain ZeroMQ client gets no answer.
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(cluster.head_node.address)
        s.send(b"\x81\xa1t\xa8get_node")
        assert not s.poll(2000)
        s.close()
    finally:
        ctx.term()


def test_a_client_with_the_wrong_keys_is_refused(cluster, tmp_path):
    wrong = security.load(security.keygen(str(tmp_path / "wrong")))
    host, port = _worker_raylet(cluster)
    # Verifying the server against our (wrong) CA already fails on our side...
    with pytest.raises(security.AuthError):
        security.connect((host, port), 5.0, wrong)
    # ...and a client that skips that check is refused by the server for its
    # certificate (TLS 1.3: the server checks it after the client finished).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(wrong.path("node.crt"), wrong.path("node.key"))
    with socket.create_connection((host, port), timeout=5) as raw:
        tls = ctx.wrap_socket(raw)
        try:
            tls.sendall(pack({"t": "ping", "r": 1}))
        except OSError:
            pass
        assert _refused(tls)
    # gcsd: a client that knows the server's public key but holds another
    # CURVE key is refused by the ZAP handler, which logs its address.
    ctx2 = zmq.Context()
    try:
        s = ctx2.socket(zmq.DEALER)
        s.linger = 0
        s.curve_secretkey, s.curve_publickey = wrong.curve_secret, wrong.curve_public
        s.curve_serverkey = security.load(cluster.keys_dir).curve_public
        s.connect(cluster.head_node.address)
        s.send(b"\x82\xa1t\xa8get_node\xa1r\x01")
        assert not s.poll(2000)
        s.close()
    finally:
        ctx2.term()
    log = os.path.join(cluster.head_node.session_dir, "logs", "gcsd.log")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(log) as f:
            text = f.read()
        if '"auth_failed"' in text:
            break
        time.sleep(0.1)
    assert '"auth_failed"' in text and '"peer": "127.0.0.1"' in text


class _RawTls:
    """A TLS client over MemoryBIO, so the test can see, alter and resend records."""

    def __init__(self, keys: security.ClusterKeys, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.alert = ""
        self.obj = keys.client_context().wrap_bio(self.inc, self.out)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                self.inc.write(self.sock.recv(65536))
        self.sock.sendall(self.out.read())

    def record(self, msg: dict) -> bytes:
        self.obj.write(pack(msg))
        return self.out.read()

    def reply(self) -> dict | None:
        dec = FrameDecoder()
        self.sock.settimeout(10)
        while True:
            try:
                dec.feed(self.obj.read(65536))
                msg = dec.next()
                if msg is not None:
                    return msg
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:  # the server's alert: it refused the record
                self.alert = exc.reason
                return None
            try:
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self.inc.write(data)


def test_tampered_and_replayed_records_are_refused(cluster):
    keys = security.current()
    address = _worker_raylet(cluster)
    good = _RawTls(keys, address)
    record = good.record({"t": "ping", "r": 7})
    good.sock.sendall(record)
    assert good.reply()["r"] == 7
    good.sock.sendall(record)  # the same record again: its sequence number is spent
    assert good.reply() is None
    assert good.alert in ("", "SSLV3_ALERT_BAD_RECORD_MAC")
    good.sock.close()

    bad = _RawTls(keys, address)
    record = bytearray(bad.record({"t": "ping", "r": 8}))
    record[-3] ^= 0x01  # one bit of the ciphertext (or tag)
    bad.sock.sendall(bytes(record))
    assert bad.reply() is None
    assert bad.alert in ("", "SSLV3_ALERT_BAD_RECORD_MAC")
    bad.sock.close()
    # The raylet still serves members.
    assert ray.get(_sum.remote(5), timeout=60) == 5


def test_an_oversized_frame_is_refused_before_allocation(cluster):
    node = next(n for n in _nodes(cluster) if n["resources"].get("CPU", 0) > 0)
    proc = psutil.Process(node["pid"])
    rss = proc.memory_info().rss
    sock = security.connect(_host_port(node["raylet_address"]), 5.0)
    sock.sendall((3 << 30).to_bytes(4, "little") + b"\x00" * 1024)  # claims 3 GiB
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):  # an error frame, then the end of the connection
        data += chunk
    dec = FrameDecoder()
    dec.feed(data)
    assert "exceeds limit" in dec.next()["error"]
    sock.close()
    assert proc.is_running() and proc.memory_info().rss < rss + (64 << 20)


def test_a_connection_flood_does_not_take_a_daemon_down(cluster):
    node = next(n for n in _nodes(cluster) if n["resources"].get("CPU", 0) > 0)
    raylet = psutil.Process(node["pid"])
    targets = [_host_port(node["raylet_address"]), _host_port(node["store_address"])]
    socks = []
    try:
        for i in range(300):
            s = socket.create_connection(targets[i % 2], timeout=5)
            if i % 3 == 0:
                s.sendall(os.urandom(512))  # garbage where a ClientHello should be
            elif i % 3 == 1:
                s.sendall(b"\x16\x03\x01\x02\x00")  # a handshake that never finishes
            socks.append(s)
        # While the strangers hang on, members are served.
        assert ray.get(_sum.remote(ray.put(np.ones(2_000_000, dtype=np.uint8))),
                       timeout=60) == 2_000_000
    finally:
        for s in socks:
            s.close()
    assert raylet.is_running()
    assert ray.get(_sum.remote(3), timeout=60) == 3


def _half_client_hello() -> bytes:
    """The first half of a real TLS ClientHello (a handshake that never ends)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    return hello[: len(hello) // 2]


def test_strangers_stalled_in_the_tls_handshake_do_not_hold_an_actor(cluster):
    """An actor's TLS handshakes run in its selector: silent TCP peers (no
    keys needed) cost its callers nothing, and are closed at the deadline."""
    counter = _Counter.remote()
    assert ray.get(counter.add.remote(1), timeout=60) == 1
    from libclient import api
    rec = api._require()._actors.actors[counter._actor_id]
    addr = _host_port(rec.address)
    held = []
    try:
        for _ in range(3):
            held.append(socket.create_connection(addr, timeout=5))
        held.append(socket.create_connection(addr, timeout=5))
        held[-1].sendall(_half_client_hello())
        time.sleep(0.2)  # the actor has accepted them all
        t0 = time.monotonic()
        assert ray.get(counter.add.remote(1), timeout=60) == 2
        took = time.monotonic() - t0
        assert took < 1.0, f"the call waited {took:.1f} s behind strangers' handshakes"
        for s in held:  # closed at the handshake deadline
            assert _refused(s, security.HANDSHAKE_TIMEOUT_S + 5)
        assert time.monotonic() - t0 < security.HANDSHAKE_TIMEOUT_S + 3
        assert ray.get(counter.add.remote(1), timeout=60) == 3
        logged = [line for node in cluster.list_all_nodes()
                  for path in glob.glob(f"{node.session_dir}/**/*.log", recursive=True)
                  for line in open(path) if '"auth_failed"' in line and "no TLS handshake" in line]
        assert len(logged) == 1, logged  # once for our host (four strays)
    finally:
        for s in held:
            s.close()
