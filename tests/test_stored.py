"""stored as a real process: protocol, zero-copy, eviction, crashes, lifecycle.

Each test starts its own stored (``python -m daemons.stored``) with its socket
under tmp_path, waits for the ready line on a pipe, and stops it by pid.
"""

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import numpy as np
import pytest

from libclient.exceptions import ObjectStoreFullError
from libclient.protocol import FrameDecoder, pack
from libclient.store_client import StoreClient, StoreError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


class Stored:
    """A running stored process and where it listens."""

    def __init__(self, proc, sock, ready, log_path):
        self.proc = proc
        self.sock = sock
        self.ready = ready
        self.log_path = log_path

    def log_events(self):
        with open(self.log_path) as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _spawn(tmp_path, *args, sock=None, ready_timeout=10.0):
    sock = sock or str(tmp_path / "stored.sock")
    assert len(sock) < 100, "AF_UNIX path too long"
    log_path = str(tmp_path / f"stored-{time.monotonic_ns()}.log")
    r, w = os.pipe()
    with open(log_path, "wb") as log:
        spill = ["--set", f"stored.spill_dir={tmp_path / 'spill'}"]
        proc = subprocess.Popen([sys.executable, "-m", "daemons.stored", "--socket", sock,
                                 "--ready-fd", str(w), *spill, *args],
                                pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    os.close(w)
    buf = b""
    try:
        deadline = time.monotonic() + ready_timeout
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
    ready = json.loads(buf) if buf else None
    return Stored(proc, sock, ready, log_path)


@pytest.fixture(scope="module", autouse=True)
def no_new_dev_shm():
    before = set(os.listdir("/dev/shm"))
    yield
    assert set(os.listdir("/dev/shm")) - before == set()


@pytest.fixture
def stored(tmp_path):
    s = _spawn(tmp_path, "--memory", str(512 * MiB))
    assert s.ready == {"socket": s.sock, "capacity": 512 * MiB,
                       "transfer_address": s.ready["transfer_address"]}
    assert s.ready["transfer_address"].startswith("127.0.0.1:")  # the default, port 0
    yield s
    s.stop()


def _eventually(pred, timeout=5.0):
    """Poll an condition that depends on another process's progress."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


# ---------------------------------------------------------------- data path


def test_put_get_200mb_round_trip_is_zero_copy(stored):
    data = np.random.default_rng(0).integers(0, 1 << 62, size=25 * MiB, dtype=np.int64)
    with StoreClient(stored.sock, "writer") as w, StoreClient(stored.sock, "reader") as r:
        w.put(b"big", data)
        (buf,) = r.get([b"big"], timeout=0)
        assert buf.size == data.nbytes
        # The buffer points into the reader's arena mapping: nothing was copied.
        assert r.arena_address <= buf.address < r.arena_address + r.arena_size
        t = time.perf_counter()
        arr = np.frombuffer(memoryview(buf), dtype=np.int64)
        assert time.perf_counter() - t < 0.01
        assert np.array_equal(arr, data)
        assert not arr.flags.writeable
        # A second get maps the same bytes again.
        (buf2,) = r.get([b"big"], timeout=0)
        assert buf2.address == buf.address
        assert r.stats()["pinned_bytes"] >= data.nbytes


def test_create_returns_writable_view_and_seal_publishes(stored):
    with StoreClient(stored.sock) as c:
        view = c.create(b"o", 10)
        view[:] = b"0123456789"
        del view
        assert c.contains([b"o", b"other"]) == [False, False]
        c.seal(b"o")
        assert c.contains([b"o"]) == [True]
        (buf,) = c.get([b"o"], timeout=0)
        assert buf.to_pybytes() == b"0123456789"
        with pytest.raises(StoreError, match="exists"):
            c.create(b"o", 5)
        c.put(b"empty", b"")
        assert c.get([b"empty"], timeout=0)[0].size == 0


def test_get_waits_for_a_later_seal_from_another_client(stored):
    with StoreClient(stored.sock, "producer") as p, StoreClient(stored.sock, "consumer") as c:
        view = p.create(b"late", 4)
        got = []
        t = threading.Thread(target=lambda: got.append(c.get([b"late"], timeout=None)))
        t.start()
        t.join(0.2)
        assert t.is_alive(), "get returned before the object was sealed"
        view[:] = b"done"
        del view
        p.seal(b"late")
        t.join(5)
        assert not t.is_alive()
        assert got[0][0].to_pybytes() == b"done"


def test_get_timeout_returns_none(stored):
    with StoreClient(stored.sock) as c:
        c.put(b"here", b"x")
        t = time.monotonic()
        assert c.get([b"here", b"missing"], timeout=0)[1] is None
        res = c.get([b"here", b"missing"], timeout=0.15)
        elapsed = time.monotonic() - t
        assert res[0].to_pybytes() == b"x" and res[1] is None
        assert 0.14 <= elapsed < 2.0
        # The client is still in sync after a timed-out get.
        assert c.contains([b"here"]) == [True]


def test_pins_follow_buffer_lifetime(stored):
    with StoreClient(stored.sock) as c:
        c.put(b"p", b"a" * 1000)
        assert c.stats()["pinned_bytes"] == 0
        (buf,) = c.get([b"p"], timeout=0)
        arr = np.frombuffer(memoryview(buf), dtype=np.uint8)
        del buf
        assert c.stats()["pinned_bytes"] == 1024
        assert c.delete([b"p"]) == 0  # pinned: refused
        del arr  # last view gone: the release is queued
        c.flush_releases()
        assert c.stats()["pinned_bytes"] == 0
        assert c.delete([b"p"]) == 1
        assert c.stats()["num_objects"] == 0
        # Explicit release drops the creation pin.
        c.create(b"q", 1).release()
        c.seal(b"q")
        assert c.stats()["pinned_bytes"] == 64
        c.release([b"q"])
        assert c.stats()["pinned_bytes"] == 0


def test_full_store_evicts_lru_then_refuses_when_pinned(tmp_path):
    s = _spawn(tmp_path, "--memory", str(8 * MiB))
    try:
        with StoreClient(s.sock) as c:
            for name in (b"o1", b"o2", b"o3", b"o4"):
                c.create(name, 2 * MiB).release()
                c.seal(name)
            for name in (b"o3", b"o1", b"o2", b"o4"):  # o3 becomes least recently used
                c.release([name])
            c.put(b"new", np.zeros(2 * MiB, dtype=np.uint8))
            assert c.contains([b"o1", b"o2", b"o3", b"o4", b"new"]) == [True, True, False,
                                                                       True, True]
            held = c.get([b"o1", b"o2", b"o4", b"new"], timeout=0)
            with pytest.raises(ObjectStoreFullError, match="needs 1048576 bytes"):
                c.create(b"more", 1 * MiB)
            st = c.stats()
            assert st["num_evictions"] == 1 and st["pinned_bytes"] == 8 * MiB
            b1, b2, b4, bnew = held
            del held
            del b2, b1, bnew, b4  # release order: o2 is now least recently used
            c.create(b"more", 1 * MiB)
            assert c.contains([b"o1", b"o2", b"o4", b"new"]) == [True, False, True, True]
    finally:
        s.stop()


# ---------------------------------------------------------------- failures

_DYING_CLIENT = textwrap.dedent("""
    import os, sys
    from libclient.store_client import StoreClient
    c = StoreClient(sys.argv[1], "doomed")
    c.create(b"unsealed", 1 << 20)
    held = c.get([b"shared"], timeout=0)
    c._conn.sock.sendall(b"\\x40\\x00\\x00\\x00\\x85")   # half of a frame, then die
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_client_killed_mid_request_releases_everything(stored):
    with StoreClient(stored.sock) as c:
        c.put(b"shared", b"s" * 100)
        child = subprocess.Popen([sys.executable, "-c", _DYING_CLIENT, stored.sock],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        assert child.stdout.readline() == b"ready\n"
        st = c.stats()
        assert st["pinned_bytes"] == 128 + MiB and st["num_objects"] == 2
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
        _eventually(lambda: c.stats()["pinned_bytes"] == 0)
        assert c.stats()["num_objects"] == 1
        assert c.contains([b"unsealed"]) == [False]
        c.create(b"unsealed", 10)  # the id is free again
    assert stored.proc.poll() is None


def _raw(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _read_replies(s):
    """All replies until the daemon closes the connection."""
    dec = FrameDecoder()
    out = []
    while True:
        data = s.recv(65536)
        if not data:
            return out
        dec.feed(data)
        out.extend(dec.drain())


def _roundtrip(s, msg):
    s.sendall(pack(msg))
    dec = FrameDecoder()
    while True:
        data = s.recv(65536)
        assert data, "stored closed the connection"
        dec.feed(data)
        m = dec.next()
        if m is not None:
            return m


@pytest.mark.parametrize("payload", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                        # garbage
    struct.pack("<I", 0xFFFFFFF0) + b"abc",                      # huge length prefix
    struct.pack("<I", 4) + msgpack.packb([1, 2, 3]),             # body is not a map
    struct.pack("<I", 3) + b"\xc1\xc1\xc1",                      # not msgpack
])
def test_unframeable_input_closes_only_that_connection(stored, payload):
    with StoreClient(stored.sock) as good:
        good.put(b"k", b"v")
        bad = _raw(stored.sock)
        bad.sendall(payload)
        replies = _read_replies(bad)  # daemon closes it (maybe after an error reply)
        bad.close()
        assert all(r["ok"] is False for r in replies)
        assert good.get([b"k"], timeout=0)[0].to_pybytes() == b"v"
    assert stored.proc.poll() is None
    assert any(e["event"] == "protocol_error" for e in stored.log_events())


def test_bad_requests_get_error_replies_and_connection_survives(stored):
    s = _raw(stored.sock)
    bad = [
        {"t": "bogus", "r": 1},
        {"t": "create", "r": 2, "oid": "not-bytes", "size": 10},
        {"t": "create", "r": 3, "oid": b"x", "size": "big"},
        {"t": "get", "r": 4, "oids": [1, 2], "timeout_ms": 0},
        {"t": "get", "r": 5, "oids": [b"x"], "timeout_ms": None},
        {"t": "seal", "r": 6},
    ]
    for msg in bad:
        reply = _roundtrip(s, msg)
        assert reply["r"] == msg["r"] and reply["ok"] is False
        assert reply["error"] == "bad_request"
    s.sendall(pack({"t": "release", "oids": "nope"}))  # no reply expected, no crash
    assert _roundtrip(s, {"t": "stats", "r": 7})["ok"] is True
    # A frame cut off by a disconnect is simply dropped.
    s.sendall(struct.pack("<I", 100) + b"\x85" * 10)
    s.close()
    with StoreClient(stored.sock) as c:
        c.put(b"after", b"1")
        assert c.contains([b"after"]) == [True]
    assert stored.proc.poll() is None


def test_socket_in_use_exits_2(stored, tmp_path):
    second = _spawn(tmp_path, "--memory", str(MiB), sock=stored.sock)
    assert second.proc.wait(10) == 2
    with open(second.log_path) as f:
        assert "already in use" in f.read()
    assert second.ready is None
    with StoreClient(stored.sock) as c:  # the first one still serves
        c.put(b"x", b"y")


@pytest.mark.parametrize("config, flags, message", [
    ("[stored\nmemory=", [], "not valid TOML"),
    ("[stored]\nmemory = -5\n", [], "memory must be > 0"),
    ("[stored]\nmemroy = 5\n", [], "unknown [stored] config keys"),
    ("", ["--memory", "0"], "memory must be > 0"),
    ("", ["--memory", "lots"], "byte count"),
])
def test_bad_config_exits_2(tmp_path, config, flags, message):
    cfg = tmp_path / "shoal.toml"
    cfg.write_text(config)
    s = _spawn(tmp_path, "--config", str(cfg), *flags)
    assert s.proc.wait(10) == 2
    with open(s.log_path) as f:
        assert message in f.read()
    assert not os.path.exists(s.sock)


def test_config_file_sets_memory_and_flags_override(tmp_path):
    cfg = tmp_path / "shoal.toml"
    cfg.write_text('session_dir = "/x"\n[stored]\nmemory = "4M"\nprefault = 1048576\n')
    s = _spawn(tmp_path, "--config", str(cfg))
    try:
        assert s.ready["capacity"] == 4 * MiB
        _eventually(lambda: any(e["event"] == "prefault_done" for e in s.log_events()))
    finally:
        s.stop()
    s = _spawn(tmp_path, "--config", str(cfg), "--memory", "2M")
    try:
        assert s.ready["capacity"] == 2 * MiB
    finally:
        s.stop()


def test_sigterm_exits_0_removes_socket_and_fails_waiting_gets(stored):
    c = StoreClient(stored.sock)
    errors = []

    def wait_forever():
        try:
            c.get([b"never"], timeout=None)
        except ConnectionError as exc:
            errors.append(exc)

    t = threading.Thread(target=wait_forever)
    t.start()
    t.join(0.1)
    assert t.is_alive()
    # The arena is an anonymous memfd, visible only among the process's fds.
    fds = os.listdir(f"/proc/{stored.proc.pid}/fd")
    assert any("memfd:shoal-store" in os.readlink(f"/proc/{stored.proc.pid}/fd/{fd}")
               for fd in fds if os.path.exists(f"/proc/{stored.proc.pid}/fd/{fd}"))
    stored.proc.send_signal(signal.SIGTERM)
    assert stored.proc.wait(10) == 0
    assert not os.path.exists(stored.sock)
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    with pytest.raises(ConnectionError):
        c.stats()
    c.close()
    events = [e["event"] for e in stored.log_events()]
    assert events[0] == "stored_started" and events[-1] == "stored_stopped"
