"""Object transfer between stored daemons over TCP, with real processes.

Each stored gets its own socket directory and arena; objects go into a source
through a StoreClient and are pulled into another store with
``StoreClient.pull``. Daemons are stopped by pid, and the end of each test
checks that their Unix sockets are gone and their TCP ports closed.
"""

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
from test_ops_support import check_log_text

from libclient.exceptions import ObjectLostError, ObjectStoreFullError
from libclient.protocol import FrameDecoder, pack
from libclient.store_client import StoreClient, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


class Stored:
    """A running stored: its process, Unix socket, transfer address and log."""

    def __init__(self, proc, folder, ready):
        self.proc = proc
        self.folder = folder
        self.ready = ready
        self.sock = ready["socket"] if ready else None
        self.address = ready["transfer_address"] if ready else None

    @property
    def log_path(self):
        return os.path.join(self.folder, "stored.log")

    def log_events(self):
        with open(self.log_path) as f:  # a line still being written has no newline yet
            return [json.loads(line) for line in f if line.startswith("{") and line.endswith("\n")]

    def health(self):
        """stored's health reply (any client may ask), with its transfer counters."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.sock)
            return _roundtrip(s, {"t": "health", "r": 1})

    def transfer(self):
        return self.health()["transfer"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def assert_gone(self):
        """The process has exited and left no socket behind, Unix or TCP."""
        assert self.proc.poll() is not None
        assert not os.path.exists(self.sock)
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect((host, int(port)))


def _spawn(folder, *args):
    os.makedirs(folder, exist_ok=True)
    sock = os.path.join(folder, "stored.sock")
    assert len(sock) < 100, "AF_UNIX path too long"
    r, w = os.pipe()
    with open(os.path.join(folder, "stored.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "daemons.stored", "--config", "none",
                                 "--socket", sock, "--ready-fd", str(w),
                                 "--set", f"stored.spill_dir={os.path.join(folder, 'spill')}",
                                 *args],
                                pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    os.close(w)
    buf = b""
    try:
        deadline = time.monotonic() + 15
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, "stored did not become ready"
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
    return Stored(proc, str(folder), json.loads(buf) if buf else None)


def _roundtrip(s, msg):
    s.sendall(pack(msg))
    return _recv_msg(s, FrameDecoder())


def _recv_exact(s):
    """One reply frame, read exactly (so payload bytes behind it stay in the socket)."""
    (size,) = struct.unpack("<I", s.recv(4, socket.MSG_WAITALL))
    return msgpack.unpackb(s.recv(size, socket.MSG_WAITALL))


def _recv_msg(s, dec):
    while True:
        m = dec.next()
        if m is not None:
            return m
        data = s.recv(65536)
        assert data, "peer closed the connection"
        dec.feed(data)


def _eventually(pred, timeout=10.0):
    """Poll a condition that depends on other processes' progress."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _payload(nbytes, seed):
    return np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)


def _tcp(address):
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    return s


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A (source) and B (puller), shared by the module's tests; peers time out after 2 s."""
    base = tmp_path_factory.mktemp("xfer")
    a = _spawn(base / "a", "--memory", str(384 * MiB), "--transfer-timeout", "2")
    b = _spawn(base / "b", "--memory", str(256 * MiB), "--transfer-timeout", "2")
    try:
        assert a.ready and b.ready
        yield a, b
    finally:
        b.stop()
        a.stop()
    for s in (a, b):
        s.assert_gone()
        with open(s.log_path) as f:
            check_log_text(f.read())  # every line, bad input included, follows docs/logging.md


# ---------------------------------------------------------------- data path


def test_ready_line_and_health_report_the_transfer_address(stores):
    a, b = stores
    assert set(a.ready) == {"socket", "capacity", "transfer_address"}
    host, port = a.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert a.health()["transfer_address"] == a.address != b.address


def test_pull_small_empty_and_100mb_objects_byte_for_byte(stores):
    a, b = stores
    big = _payload(100 * 1000 * 1000, seed=1)
    with StoreClient(a.sock, "src") as ca, StoreClient(b.sock, "dst") as cb:
        ca.put(b"small", b"hello, node B")
        ca.put(b"empty", b"")
        ca.put(b"big", big)
        before = a.transfer()["served"]["bytes"]
        assert cb.pull(b"small", [a.address]) == 13
        assert cb.pull(b"empty", [a.address]) == 0
        assert cb.pull(b"big", [a.address], timeout=60) == big.nbytes
        assert a.transfer()["served"]["bytes"] - before == 13 + big.nbytes
        small, empty, got = cb.get([b"small", b"empty", b"big"], timeout=0)
        assert small.to_pybytes() == b"hello, node B" and empty.size == 0
        assert np.array_equal(np.frombuffer(got, dtype=np.uint8), big)
        del small, empty, got
        cb.flush_releases()
        # A pulled copy is an ordinary cached object: unpinned, so LRU may evict it.
        st = cb.stats()
        assert st["pinned_bytes"] == 0 and st["num_objects"] >= 3
        # Already here: answered at once, nothing moves.
        assert cb.pull(b"big", [a.address]) == big.nbytes
        assert a.transfer()["served"]["bytes"] - before == 13 + big.nbytes
        assert cb.delete([b"small", b"empty", b"big"]) == 3
        ca.delete([b"small", b"empty", b"big"])


def test_concurrent_pulls_of_one_object_share_one_transfer(stores):
    a, b = stores
    data = _payload(40 * MiB, seed=2)
    with StoreClient(a.sock) as ca:
        ca.put(b"shared", data)
    served, joined = a.transfer()["served"], b.transfer()["pulls"]["joined"]
    go = threading.Barrier(4)
    results, errors = [], []

    def pull():
        try:
            with StoreClient(b.sock, "puller") as c:
                go.wait()
                results.append(c.pull(b"shared", [a.address], timeout=30))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [data.nbytes] * 4
    after = a.transfer()["served"]
    # One stat and one copy of the bytes left A; the other requests joined
    # the pull (or, if they came after it finished, found the object there).
    assert after["stats"] - served["stats"] == 1
    assert after["bytes"] - served["bytes"] == data.nbytes
    assert b.transfer()["pulls"]["joined"] - joined <= 3
    with StoreClient(b.sock) as cb:
        (buf,) = cb.get([b"shared"], timeout=0)
        assert np.array_equal(np.frombuffer(buf, dtype=np.uint8), data)
        del buf
        cb.flush_releases()
        cb.delete([b"shared"])
    with StoreClient(a.sock) as ca:
        ca.delete([b"shared"])


def test_missing_objects_and_dead_sources_are_lost(stores):
    a, b = stores
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with StoreClient(b.sock) as cb:
        with pytest.raises(ObjectLostError) as info:
            cb.pull(b"nowhere", [a.address, dead])
        assert f"{a.address}: not found" in str(info.value)
        assert f"{dead}: connect failed" in str(info.value)
        with pytest.raises(ObjectLostError, match="no source"):
            cb.pull(b"nowhere", [])
        with pytest.raises(StoreError, match="bad_request"):
            cb.pull(b"nowhere", ["not-an-address"])
        assert cb.contains([b"nowhere"]) == [False]
    assert b.proc.poll() is None


def test_pull_waits_for_room_and_an_object_bigger_than_the_store_is_full(stores, tmp_path):
    a, _ = stores
    small = _spawn(tmp_path / "s", "--memory", str(16 * MiB))
    try:
        with StoreClient(a.sock) as ca, StoreClient(small.sock) as cs:
            ca.put(b"wide", _payload(17 * MiB, seed=3))
            ca.put(b"mid", _payload(8 * MiB, seed=3))
            with pytest.raises(ObjectStoreFullError, match="capacity"):
                cs.pull(b"wide", [a.address])
            assert cs.stats()["used"] == 0
            # A pinned local object leaves 4 MiB: the 8 MiB pull waits for room.
            cs.create(b"hog", 12 * MiB).release()
            cs.seal(b"hog")
            got = []

            def pull():
                with StoreClient(small.sock) as c:
                    got.append(c.pull(b"mid", [a.address], timeout=30))

            t = threading.Thread(target=pull)
            t.start()
            _eventually(lambda: small.transfer()["pulls"]["queued"] == 1)
            t.join(0.2)
            assert t.is_alive() and cs.contains([b"mid"]) == [False]
            cs.release([b"hog"])  # now evictable: room counts it, the pull starts
            cs.flush_releases()
            t.join(30)
            assert got == [8 * MiB]
            assert cs.contains([b"hog", b"mid"]) == [False, True]
            assert cs.stats()["num_evictions"] == 1
            ca.delete([b"wide", b"mid"])
    finally:
        small.stop()
    small.assert_gone()


# ---------------------------------------------------------------- failover


def _kill_mid_transfer(victim, puller, client, oid, sources, size):
    """Start a pull, freeze the victim once chunks flow, check it is mid-way, kill it.

    Returns the pull's outcome (size or exception). Freezing first makes
    "mid-transfer" certain: after SIGSTOP at most the socket buffers drain.
    """
    outcome = []

    def run():
        try:
            outcome.append(client.pull(oid, sources, timeout=60))
        except Exception as exc:  # the caller checks which
            outcome.append(exc)

    before = puller.transfer()["pulls"]["bytes"]
    t = threading.Thread(target=run)
    t.start()
    _eventually(lambda: puller.transfer()["pulls"]["bytes"] > before or outcome)
    victim.proc.send_signal(signal.SIGSTOP)
    time.sleep(0.05)  # let the puller drain what is already in flight
    moved = puller.transfer()["pulls"]["bytes"] - before
    assert 0 < moved < size and not outcome, "the pull was not caught mid-transfer"
    victim.proc.kill()
    victim.proc.wait()
    os.unlink(victim.sock)  # SIGKILL leaves the socket file; its TCP port closes with it
    t.join(60)
    assert not t.is_alive()
    return outcome[0], moved


def test_source_killed_mid_transfer_fails_over_and_reuses_landed_chunks(stores, tmp_path):
    _, b = stores
    size = 200 * MiB
    data = _payload(size, seed=4)
    first = _spawn(tmp_path / "a1", "--memory", str(size + MiB))
    second = _spawn(tmp_path / "a2", "--memory", str(size + MiB))
    try:
        for src in (first, second):
            with StoreClient(src.sock) as c:
                c.put(b"moving", data)
        failovers = b.transfer()["pulls"]["failovers"]
        with StoreClient(b.sock) as cb:
            got, moved = _kill_mid_transfer(first, b, cb, b"moving",
                                            [first.address, second.address], size)
            assert got == size
            assert b.transfer()["pulls"]["failovers"] == failovers + 1
            # Chunks that landed from the first source were not fetched again.
            assert second.transfer()["served"]["bytes"] <= size - moved + 8 * MiB
            (buf,) = cb.get([b"moving"], timeout=0)
            assert np.array_equal(np.frombuffer(buf, dtype=np.uint8), data)
            del buf
            cb.flush_releases()
            cb.delete([b"moving"])
        drops = [e for e in b.log_events() if e["event"] == "pull_source_dropped"]
        assert drops and drops[-1]["peer"] == first.address
    finally:
        second.stop()
        first.stop()
    for src in (first, second):
        src.assert_gone()


def test_only_source_killed_mid_transfer_is_lost_and_nothing_half_written_shows(stores,
                                                                                tmp_path):
    _, b = stores
    size = 200 * MiB
    only = _spawn(tmp_path / "a3", "--memory", str(size + MiB))
    try:
        with StoreClient(only.sock) as c:
            c.put(b"doomed", _payload(size, seed=5))
        with StoreClient(b.sock) as cb:
            used = cb.stats()["used"]
            got, _ = _kill_mid_transfer(only, b, cb, b"doomed", [only.address], size)
            assert isinstance(got, ObjectLostError), got
            assert cb.contains([b"doomed"]) == [False]
            assert cb.get([b"doomed"], timeout=0) == [None]
            st = cb.stats()
            assert st["used"] == used and st["pinned_bytes"] == 0  # partial copy aborted
    finally:
        only.stop()
    only.assert_gone()


# ---------------------------------------------------------------- bad input, source side


def _read_until_closed(s):
    """Replies until the daemon closes the connection."""
    dec, out = FrameDecoder(), []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            return out
        if not data:
            return out
        dec.feed(data)
        out.extend(dec.drain())


def _warnings_since(store, n):
    return [e for e in store.log_events()[n:] if e["level"] == "warning"]


@pytest.mark.parametrize("payload, why", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "protocol error"),  # garbage
    (struct.pack("<I", 0xFFFFFFF0) + b"abc", "exceeds limit"),  # huge length prefix
    (struct.pack("<I", 3) + b"\xc1\xc1\xc1", "undecodable"),      # not msgpack
])
def test_unframeable_bytes_get_an_error_and_a_closed_connection(stores, payload, why):
    a, _ = stores
    n, peers = len(a.log_events()), a.transfer()["served"]["peers"]
    with _tcp(a.address) as s:
        s.sendall(payload)
        replies = _read_until_closed(s)
    assert replies and replies[0]["error"] == "protocol" and replies[0]["r"] is None
    # Logged once per peer host and kind of fault (peer_policy.LogOncePerPeer):
    # an earlier connection of this module may have logged this kind already.
    _eventually(lambda: any(e["event"] == "transfer_peer_closed" and why in e.get("reason", "")
                            and e["level"] == "warning" for e in a.log_events()))
    assert len(_warnings_since(a, n)) <= 1
    assert a.proc.poll() is None
    assert a.transfer()["served"]["peers"] == peers  # B's link to A stays; the bad one is gone


def test_truncated_frame_then_close_is_one_log_line(stores):
    a, _ = stores
    n = len(a.log_events())
    with _tcp(a.address) as s:
        s.sendall(struct.pack("<I", 100) + b"\x85" * 10)
    _eventually(lambda: _warnings_since(a, n))
    (line,) = _warnings_since(a, n)
    assert line["event"] == "transfer_peer_closed" and line["reason"] == "eof"
    assert a.proc.poll() is None


def test_framed_bad_requests_get_error_replies_and_the_connection_survives(stores):
    a, _ = stores
    with StoreClient(a.sock) as ca:
        ca.put(b"here", b"0123456789")
    with _tcp(a.address) as s:
        for msg, code in [
            ({"t": "stat", "r": 1, "oid": b"unknown"}, "not_found"),
            ({"t": "read", "r": 2, "oid": b"unknown", "off": 0, "len": 5}, "not_found"),
            ({"t": "read", "r": 3, "oid": b"here", "off": 8, "len": 5}, "bad_request"),
            ({"t": "fetch", "r": 4, "oid": b"here"}, "bad_request"),
            ({"t": "stat", "r": 5, "oid": "text"}, "bad_request"),
        ]:
            s.sendall(pack(msg))
            reply = _recv_exact(s)
            assert (reply["t"], reply["r"], reply["error"]) == ("error", msg["r"], code)
        s.sendall(pack({"t": "stat", "r": 6, "oid": b"here"}))
        assert _recv_exact(s) == {"t": "stat", "r": 6, "size": 10}
        s.sendall(pack({"t": "read", "r": 7, "oid": b"here", "off": 2, "len": 3}))
        assert _recv_exact(s) == {"t": "data", "r": 7, "len": 3}
        assert s.recv(3, socket.MSG_WAITALL) == b"234"
    _eventually(lambda: a.health()["stats"]["pinned_bytes"] == 0)
    with StoreClient(a.sock) as ca:
        assert ca.delete([b"here"]) == 1


def test_silent_stranger_is_disconnected_after_the_timeout(stores):
    a, _ = stores
    n = len(a.log_events())
    with _tcp(a.address) as s:
        s.settimeout(10)
        t = time.monotonic()
        assert s.recv(10) == b""  # a 2 s timeout in this module's A
        assert 1.5 < time.monotonic() - t < 8
    _eventually(lambda: _warnings_since(a, n))  # the line follows the close
    (line,) = _warnings_since(a, n)
    assert line["event"] == "transfer_peer_closed" and "no whole message" in line["reason"]


def test_puller_that_vanishes_mid_transfer_leaves_no_pins(stores):
    a, _ = stores
    with StoreClient(a.sock) as ca:
        ca.put(b"large", _payload(48 * MiB, seed=6))
        ca.flush_releases()  # the creation pin
        assert a.health()["stats"]["pinned_bytes"] == 0
        n = len(a.log_events())
        s = _tcp(a.address)
        # Ask for everything, read a little, vanish.
        s.sendall(b"".join(pack({"t": "read", "r": i, "oid": b"large", "off": i * 16 * MiB,
                                 "len": 16 * MiB}) for i in range(3)))
        s.recv(1000)
        _eventually(lambda: a.health()["stats"]["pinned_bytes"] > 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        s.close()
        _eventually(lambda: a.health()["stats"]["pinned_bytes"] == 0)
        _eventually(lambda: _warnings_since(a, n))
        (line,) = _warnings_since(a, n)
        assert line["event"] == "transfer_peer_closed" and line["pins_dropped"] >= 1
        (buf,) = ca.get([b"large"], timeout=0)  # intact, still served
        assert buf.size == 48 * MiB
        del buf
        ca.flush_releases()
        ca.delete([b"large"])
    assert a.proc.poll() is None


# ---------------------------------------------------------------- bad input, puller side


class _FakeSource:
    """A TCP peer that answers a puller with scripted bytes: a broken or hostile source.

    Each step answers one request; a ``None`` step reads on and never answers
    until the puller hangs up. After the last step the connection closes.
    """

    def __init__(self, script):
        self.listen = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listen.getsockname()[1]}"
        self.script = script
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listen.accept()
        with conn:
            dec = FrameDecoder()
            for step in self.script:
                if step is None:
                    while conn.recv(65536):
                        pass
                    return
                while True:  # wait for the next request
                    msg = dec.next()
                    if msg is not None:
                        break
                    data = conn.recv(65536)
                    if not data:
                        return
                    dec.feed(data)
                conn.sendall(step(msg))

    def close(self):
        self.thread.join(10)
        self.listen.close()


@pytest.mark.parametrize("name, script, reason", [
    ("garbage", [lambda m: b"\x00\x00\x10\x00garbage"], "protocol error"),
    ("wrong id", [lambda m: pack({"t": "stat", "r": m["r"] + 1, "size": 5})],
     "does not match"),
    ("short data", [lambda m: pack({"t": "stat", "r": m["r"], "size": 3 * MiB}),
                    lambda m: pack({"t": "data", "r": m["r"], "len": m["len"]})
                    + b"x" * (m["len"] // 2)],
     "connection closed by the source"),
    ("wrong length", [lambda m: pack({"t": "stat", "r": m["r"], "size": 100}),
                      lambda m: pack({"t": "data", "r": m["r"], "len": 99}) + b"x" * 99],
     "for a read of 100"),
    ("silent", [None], "no progress for 2 s"),  # accepts, reads, never answers
])
def test_a_broken_source_makes_the_pull_lost_and_leaves_no_trace(stores, name, script,
                                                                  reason):
    _, b = stores
    fake = _FakeSource(script)
    try:
        with StoreClient(b.sock) as cb:
            used = cb.stats()["used"]
            with pytest.raises(ObjectLostError, match=reason):
                cb.pull(b"from-fake", [fake.address], timeout=30)
            assert cb.contains([b"from-fake"]) == [False]
            assert cb.stats()["used"] == used
    finally:
        fake.close()
    assert b.proc.poll() is None


# ---------------------------------------------------------------- config


def test_transfer_address_comes_from_config_and_bad_values_exit_2(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = _spawn(tmp_path / "c", "--memory", "1M", "--set",
               f"stored.transfer_address=127.0.0.1:{port}")
    try:
        assert s.ready["transfer_address"] == f"127.0.0.1:{port}"
        # The port is taken now: a second store on it fails fast.
        taken = _spawn(tmp_path / "d", "--memory", "1M", "--transfer-address",
                       f"127.0.0.1:{port}")
        assert taken.proc.wait(10) == 2 and taken.ready is None
        assert "cannot listen for transfers" in open(taken.log_path).read()
        assert not os.path.exists(os.path.join(taken.folder, "stored.sock"))
    finally:
        s.stop()
    s.assert_gone()
    bad = _spawn(tmp_path / "e", "--memory", "1M", "--transfer-address", "nowhere")
    assert bad.proc.wait(10) == 2
    assert "transfer_address must be host:port" in open(bad.log_path).read()


def test_pull_of_an_object_being_written_here_waits_for_its_seal(stores):
    a, b = stores
    with StoreClient(a.sock) as ca, StoreClient(b.sock, "writer") as writer:
        ca.put(b"busy", b"from A")
        stats = a.transfer()["served"]["stats"]
        view = writer.create(b"busy", 7)  # a local writer got there first
        got = []

        def pull():
            with StoreClient(b.sock) as c:
                got.append(c.pull(b"busy", [a.address], timeout=30))

        t = threading.Thread(target=pull)
        t.start()
        t.join(0.3)
        assert t.is_alive() and not got
        view[:] = b"local!!"
        del view
        writer.seal(b"busy")
        t.join(10)
        assert got == [7]  # the local object, not A's
        assert a.transfer()["served"]["stats"] == stats
        assert writer.get([b"busy"], timeout=0)[0].to_pybytes() == b"local!!"
        writer.release([b"busy"])
        writer.delete([b"busy"])
        ca.delete([b"busy"])
