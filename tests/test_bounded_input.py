"""Bounded input on every port: oversized frames and connection floods, real daemons.

The flood test starts its daemons with ``[security] max_connections = 64``,
so a flood past the cap is cheap to make.
"""

import glob
import json
import os
import socket
import struct
import subprocess
import sys
import time

import msgpack
import numpy as np
import psutil
import pytest
import zmq

import libclient as ray
from libclient import security
from libclient.cluster_utils import Cluster
from libclient.gcs_client import GcsClient, GcsUnavailableError
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


# ---------------------------------------------------------------- unread output

STALL_S = 2.0  # [security] stall_s of the stalled_store fixture


def _json_lines(path, event):
    out = []
    for line in open(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def _until(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def _push(sock, data, quiet_s=0.5):
    """Send as much of ``data`` as the peer takes; stop once it takes nothing for
    ``quiet_s`` (it stopped reading us). Returns the bytes sent."""
    sock.setblocking(False)
    sent, idle_since = 0, time.monotonic()
    view = memoryview(data)
    while sent < len(data) and time.monotonic() - idle_since < quiet_s:
        try:
            n = sock.send(view[sent:sent + (1 << 20)])
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        idle_since = time.monotonic()
    return sent


@pytest.fixture
def stalled_store(tmp_path, monkeypatch, request):
    """stored alone with ``[security] stall_s = 2`` (its transfer timeout stays 30 s);
    its transfer port speaks plain TCP, or the bulk link with ``param = "keys"``."""
    from test_standalone import _start, _stop

    keys = None
    if getattr(request, "param", "plain") == "keys":
        security.keygen(str(tmp_path / "keys"))
        monkeypatch.setenv(security.KEYS_ENV, str(tmp_path / "keys"))
        keys = security.load(str(tmp_path / "keys"))
    else:  # the module's cluster may have put its keys in our environment
        monkeypatch.delenv(security.KEYS_ENV, raising=False)
    proc, ready = _start("stored", ["--socket", str(tmp_path / "run" / "stored.sock"),
                                    "--memory", str(96 << 20), "--transfer-timeout", "30",
                                    "--set", f"security.stall_s={STALL_S}",
                                    "--config", "none"], tmp_path)
    try:
        yield {"proc": proc, "socket": ready["socket"], "transfer": ready["transfer_address"],
               "log": tmp_path / "stored.log", "keys": keys}
    finally:
        _stop(proc)


def test_a_local_client_that_never_reads_its_replies_is_cut_off(stalled_store):
    """Gets pipelined without reading: past 4 MiB unread for stall_s, the client
    is cut off and its pins dropped; a normal client is served throughout, and
    two such clients of one uid make one log line."""
    from libclient.store_client import StoreClient

    sock_path = stalled_store["socket"]
    with StoreClient(sock_path, name="normal") as normal:
        normal.put(b"obj", b"x" * 4096)
        normal.flush_releases()
        # Each get names the object 100,000 times: ~0.5 MB of reply, 100,000 pins;
        # stored stops reading a client with 4 MiB unread, so not all are read.
        get = b"".join(pack({"t": "get", "r": r, "oids": [b"obj"] * 100_000, "timeout_ms": 0})
                       for r in range(1, 25))
        hogs = [_unix(sock_path), _unix(sock_path)]
        try:
            t0 = time.monotonic()
            for h in hogs:
                _push(h, get)
            assert normal.stats()["pinned_bytes"] > 0  # the hogs' gets pinned it
            # The normal client keeps working while the hogs stall.
            normal.put(b"during", b"y" * 1000)
            (buf,) = normal.get([b"during"], timeout=5)
            assert bytes(buf) == b"y" * 1000
            del buf
            cut = lambda: len(_json_lines(stalled_store["log"], "client_disconnected")) >= 2  # noqa: E731
            assert _until(cut, 15), "the stalled clients were not cut off"
            took = time.monotonic() - t0
            assert took < STALL_S + 6, took  # stall_s, the 1 s sweep, and the pushes' 0.5 s each
            lines = [e for e in _json_lines(stalled_store["log"], "client_disconnected")
                     if e["reason"].startswith("cut off")]
            assert len(lines) == 2 and "queued bytes" in lines[0]["reason"], lines
            logged = _json_lines(stalled_store["log"], "peer_cut_off")
            assert len(logged) == 1, logged  # once per peer (uid), not per connection
            assert logged[0]["peer_pid"] == os.getpid() and logged[0]["peer_uid"] == os.getuid()
            assert _until(lambda: normal.stats()["pinned_bytes"] == 0, 5)
            for h in hogs:
                assert _closed(h, 5)
        finally:
            for h in hogs:
                h.close()
        (buf,) = normal.get([b"obj"], timeout=5)
        assert len(buf) == 4096
    assert stalled_store["proc"].poll() is None


def _read_req(r, oid, off, length):
    return pack({"t": "read", "r": r, "oid": oid, "off": off, "len": length})


def _data_replies(got, count):
    """The payloads of ``count`` data replies in ``got``; None while incomplete."""
    body, at = bytearray(), 0
    for _ in range(count):
        if len(got) < at + 4:
            return None
        (n,) = struct.unpack_from("<I", got, at)
        if len(got) < at + 4 + n:
            return None
        length = msgpack.unpackb(bytes(got[at + 4:at + 4 + n]))["len"]
        at += 4 + n
        if len(got) < at + length:
            return None
        body += got[at:at + length]
        at += length
    return bytes(body)


@pytest.mark.parametrize("stalled_store", ["plain", "keys"], indirect=True)
def test_a_transfer_peer_that_stops_reading_is_cut_a_slow_one_is_not(stalled_store):
    """Two raw pullers ask for the same 24 MiB in 4 MiB chunks (the pullers'
    chunk): one never reads and is cut off after stall_s, one reads slowly but
    steadily for several stall periods and gets every byte right. With keys
    the chunks travel as 4 MiB records, which the slow reader takes off the
    wire (raw) in 64 KiB pieces, ~2.6 s a record: a record taken in part
    still counts as reading."""
    from libclient.store_client import StoreClient

    size, chunk = 24 << 20, 4 << 20
    payload = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    reqs = b"".join(_read_req(i + 1, b"big", off, chunk)
                    for i, off in enumerate(range(0, size, chunk)))
    host, port = _hp(stalled_store["transfer"])
    with StoreClient(stalled_store["socket"]) as normal:
        normal.put(b"big", payload)
        normal.flush_releases()
        keys = stalled_store["keys"]
        if keys is None:
            stuck = socket.create_connection((host, port), timeout=5)
            slow = socket.create_connection((host, port), timeout=5)
        else:
            stuck = security.connect((host, port), 5.0, keys, bulk=True)
            slow = security.connect((host, port), 5.0, keys, bulk=True)
        try:
            stuck.sendall(reqs)
            slow.sendall(reqs)
            wire = slow if keys is None else slow._sock  # the bulk link's TCP socket
            got, t0 = bytearray(), time.monotonic()
            while time.monotonic() - t0 < 3 * STALL_S + 1:  # ~1.6 MiB/s
                data = wire.recv(64 << 10)
                assert data, "the slow reader was cut off"
                got += data
                time.sleep(0.04)
            assert len(got) < size, "read it all: not slow"
            assert _closed(stuck if keys is None else stuck._sock, 10), \
                "the reader that stopped was not cut off"
            closed = [e for e in _json_lines(stalled_store["log"], "transfer_peer_closed")
                      if "cut off" in e.get("reason", "")]
            assert len(closed) == 1 and "queued bytes" in closed[0]["reason"], closed
            assert closed[0]["peer"].startswith("127.0.0.1:")
            if keys is None:  # (with keys the raw bytes are sealed records)
                slow.settimeout(10)
                while (body := _data_replies(got, size // chunk)) is None:  # the rest, fast
                    data = slow.recv(4 << 20)
                    assert data
                    got += data
                assert body == payload
            (buf,) = normal.get([b"big"], timeout=5)  # still served locally
            assert len(buf) == size
            del buf
        finally:
            stuck.close()
            slow.close()
    assert stalled_store["proc"].poll() is None


# ---------------------------------------------------------------- gcsd's message cap


def test_gcsd_max_message_is_configurable(tmp_path, monkeypatch):
    """``[gcsd] max_message = 8M``: a 6 MiB request is served, a 9 MiB one drops
    the sender's connection unread, and gcsd serves on."""
    from test_standalone import _start, _stop

    monkeypatch.setenv("SHOAL_GCSD_MAX_MESSAGE", "8M")
    proc, ready = _start("gcsd", ["--port", "0", "--data-dir", str(tmp_path / "gcs"),
                                  "--config", "none"], tmp_path)
    try:
        (started,) = _json_lines(tmp_path / "gcsd.log", "gcsd_started")
        assert started["max_message"] == 8 << 20
        with GcsClient(ready["address"], timeout=10) as gcs:
            assert gcs.kv_put("t", b"six", b"6" * (6 << 20))
            assert len(gcs.kv_get("t", b"six")) == 6 << 20
        with GcsClient(ready["address"], timeout=3) as gcs:
            with pytest.raises(GcsUnavailableError):
                gcs.kv_put("t", b"nine", b"9" * (9 << 20))
        with GcsClient(ready["address"], timeout=10) as gcs:
            gcs.ping()
            assert gcs.kv_get("t", b"nine") is None
            assert gcs.kv_get("t", b"six") == b"6" * (6 << 20)
        assert proc.poll() is None
    finally:
        _stop(proc)


@pytest.mark.parametrize("daemon, env, key", [
    ("gcsd", {"SHOAL_GCSD_MAX_MESSAGE": "1K"}, "[gcsd] max_message"),
    ("gcsd", {"SHOAL_GCSD_MAX_MESSAGE": "lots"}, "[gcsd] max_message"),
    ("gcsd", {"SHOAL_GCSD_MAX_MESSAGE": "5G"}, "[gcsd] max_message"),
    ("stored", {"SHOAL_SECURITY_STALL_S": "0"}, "[security] stall_s"),
    ("stored", {"SHOAL_SECURITY_STALL_BYTES": "-1"}, "[security] stall_bytes"),
])
def test_bad_limits_stop_the_daemon_at_start_naming_the_key(tmp_path, daemon, env, key):
    from test_standalone import ROOT

    args = (["--port", "0", "--data-dir", str(tmp_path / "gcs")] if daemon == "gcsd" else
            ["--socket", str(tmp_path / "run" / "stored.sock"), "--memory", str(16 << 20)])
    done = subprocess.run([sys.executable, "-m", f"daemons.{daemon}", *args, "--config", "none"],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert key in done.stderr and next(iter(env)) in done.stderr, done.stderr[-2000:]
