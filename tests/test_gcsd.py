"""gcsd as a real process: requests, pub-sub, restart, liveness, bad input, exit codes, logs."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from libclient.gcs_client import GcsClient, GcsError, GcsSubscriber, GcsUnavailableError
from libclient.protocol import encode_body

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 10.0


@dataclass
class Gcsd:
    proc: subprocess.Popen
    address: str
    pubsub: str
    log_path: Path

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()
                if line.startswith("{")]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("NOTIFY_SOCKET", None)
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def gcsd(tmp_path: Path, *args: str, data_dir: Path | None = None) -> Iterator[Gcsd]:
    """Run gcsd until the block ends; yield once it has written its ready line."""
    data = data_dir or tmp_path / "gcs"
    log_path = tmp_path / f"gcsd-{time.monotonic_ns()}.log"
    ready_r, ready_w = os.pipe()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemons.gcsd", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(data), "--ready-fd", str(ready_w), *args],
            pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT, env=_env())
    os.close(ready_w)
    try:
        line = _read_line(ready_r, proc)
        ready = json.loads(line)
        yield Gcsd(proc, ready["address"], ready["pubsub"], log_path)
    finally:
        os.close(ready_r)
        _stop(proc)


def _read_line(fd: int, proc: subprocess.Popen) -> bytes:
    buf = b""
    deadline = time.monotonic() + START_TIMEOUT_S
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("gcsd did not become ready")
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"gcsd exited before ready: {proc.wait(5)}")
            buf += chunk
    return buf.split(b"\n", 1)[0]


def run_to_exit(tmp_path: Path, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run gcsd expecting it to exit by itself (bad setup)."""
    return subprocess.run([sys.executable, "-m", "daemons.gcsd", *args], cwd=ROOT, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Gcsd]:
    tmp = tmp_path_factory.mktemp("gcsd")
    with gcsd(tmp) as g:
        yield g


@pytest.fixture
def client(server) -> Iterator[GcsClient]:
    c = GcsClient(server.address, timeout=5.0)
    yield c
    c.close()


# ---------------------------------------------------------------- requests
def test_kv_ops(client):
    assert client.kv_put("t_kv", b"a", b"1") is True
    assert client.kv_put("t_kv", "a", b"2") is False
    assert client.kv_put("t_kv", b"a", b"3", overwrite=False) is False
    assert client.kv_get("t_kv", b"a") == b"2"
    assert client.kv_exists("t_kv", b"a") and not client.kv_exists("t_kv", b"b")
    client.kv_put("t_kv", b"ab", b"x")
    assert client.kv_keys("t_kv", b"a") == [b"a", b"ab"]
    assert client.kv_del("t_kv", b"a") is True and client.kv_del("t_kv", b"a") is False
    assert client.kv_get("t_kv", b"a") is None


def test_table_ops(client):
    client.table_put("actors", b"a1", {"state": "ALIVE", "n": [1, 2]})
    client.table_put("actors", b"a2", 7)
    client.table_put("objects", b"a3", "elsewhere")
    assert client.table_get("actors", b"a1") == {"state": "ALIVE", "n": [1, 2]}
    assert client.table_scan("actors", b"a") == [(b"a1", {"state": "ALIVE", "n": [1, 2]}),
                                                 (b"a2", 7)]
    assert client.table_delete("actors", b"a1") is True
    assert client.table_get("actors", b"a1") is None
    client.put_batch("tasks", [(b"t%d" % i, {"i": i}) for i in range(50)])
    client.put_batch("tasks", [(b"u1", 1)], wait=True)  # waits, so the one-way batch landed
    assert len(client.table_scan("tasks", b"t")) == 50
    assert client.next_job_id() + 1 == client.next_job_id()


def test_errors_are_raised_as_gcs_error(client):
    with pytest.raises(GcsError, match="unknown table"):
        client.table_put("meta", b"k", 1)
    with pytest.raises(GcsError, match="unknown method"):
        client.call("no_such_method")
    client.ping()


def test_pubsub_delivers_a_put(client):
    sub = GcsSubscriber(client.info()["pubsub"], ["jobs"])
    try:
        # PUB drops messages sent before the subscription reaches it, so
        # write until one arrives (the first usually does within a few ms).
        deadline = time.monotonic() + 5
        msg = None
        while msg is None and time.monotonic() < deadline:
            client.table_put("functions", b"noise", 0)  # another table: filtered out
            client.table_put("jobs", b"job-1", {"state": "RUNNING"})
            msg = sub.recv(0.1)
        assert msg is not None
        assert msg["table"] == "jobs" and msg["op"] == "put" and msg["key"] == b"job-1"
        assert msg["value"] == {"state": "RUNNING"} and isinstance(msg["seq"], int)
        client.table_delete("jobs", b"job-1")
        while msg["op"] != "delete":
            msg = sub.recv(2)
            assert msg is not None
        assert msg["key"] == b"job-1" and msg["value"] is None
    finally:
        sub.close()


def test_pubsub_numbers_each_key_of_a_batch(client):
    # A batch is stored as one op, but subscribers see one change per key,
    # with consecutive per-table numbers, so they can still detect gaps.
    sub = GcsSubscriber(client.info()["pubsub"], ["lineage"])
    try:
        deadline = time.monotonic() + 5
        first = None
        while first is None and time.monotonic() < deadline:
            client.table_put("lineage", b"probe", 0)
            first = sub.recv(0.1)
        assert first is not None
        while sub.recv(0.2) is not None:
            pass  # the other probes
        keys = [b"b%02d" % i for i in range(20)]
        client.put_batch("lineage", [(k, {"i": i}) for i, k in enumerate(keys)], wait=True)
        got = [sub.recv(2) for _ in keys]
        assert all(m is not None for m in got)
        by_shard: dict[int, list[dict]] = {}
        for m in got:
            by_shard.setdefault(m["shard"], []).append(m)
        assert sorted(m["key"] for m in got) == keys
        for msgs in by_shard.values():
            tseqs = [m["tseq"] for m in msgs]
            assert tseqs == list(range(tseqs[0], tseqs[0] + len(tseqs)))
            assert all(m["value"] == {"i": int(m["key"][1:])} for m in msgs)
        assert sub.gaps == 0
    finally:
        sub.close()


def test_malformed_frames_never_kill_the_daemon(server, client):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        bad = [
            [b"\xc1\xc1 not msgpack"],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"r": 1})],                                # no method
            [encode_body({"t": "frobnicate", "r": 2})],              # unknown method
            [encode_body({"t": "kv_put", "r": 3, "ns": 1, "key": b"k", "value": b"v"})],
            [encode_body({"t": "scan", "r": 4, "table": "kv", "prefix": "str"})],
            [encode_body({"t": "put_batch", "r": 5, "table": "tasks", "items": 3})],
            [encode_body({"t": "ping", "r": 6}), b"extra frame"],
            [b""],
            [encode_body({"t": "kv_get", "ns": 1})],                 # one-way and bad
        ]
        for frames in bad:
            sock.send_multipart(frames)
        sock.send(encode_body({"t": "ping", "r": 99}))
        replies = {}
        while 99 not in replies:
            assert sock.poll(5000), "gcsd stopped answering"
            reply = msgpack.unpackb(sock.recv(), raw=False)
            replies[reply["r"]] = reply
        assert replies[99]["ok"] is True
        for rid in (1, 2, 3, 4, 5):
            assert replies[rid]["ok"] is False and replies[rid]["error"]
        # Several frames in one message are several requests, read in order
        # (members bundle chain traffic): the ping is answered, the junk
        # frame after it is logged like any other.
        assert replies[6]["ok"] is True
    finally:
        sock.close()
    client.ping()
    assert server.proc.poll() is None
    warnings = [x for x in server.log_lines() if x["event"] == "bad_request"]
    assert len(warnings) >= len(bad) and all(x["level"] == "warning" for x in warnings)


def test_client_times_out_instead_of_hanging():
    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = GcsClient(f"tcp://127.0.0.1:{port}", timeout=0.3)
    try:
        start = time.monotonic()
        with pytest.raises(GcsUnavailableError):
            c.ping()
        assert time.monotonic() - start < 2
    finally:
        c.close()


# ---------------------------------------------------------------- lifecycle
def test_data_survives_a_restart(tmp_path):
    data = tmp_path / "gcs"
    with gcsd(tmp_path, data_dir=data) as g:
        c = GcsClient(g.address, timeout=5)
        c.kv_put("persist", b"k", b"v")
        c.table_put("lineage", b"obj", {"task": b"t1"})
        job = c.next_job_id()
        c.close()
    with gcsd(tmp_path, data_dir=data) as g:
        c = GcsClient(g.address, timeout=5)
        try:
            assert c.kv_get("persist", b"k") == b"v"
            assert c.table_get("lineage", b"obj") == {"task": b"t1"}
            assert c.next_job_id() == job + 1
        finally:
            c.close()


def test_silent_node_is_marked_dead(tmp_path):
    with gcsd(tmp_path, "--node-timeout-s", "0.3") as g:
        c = GcsClient(g.address, timeout=5)
        sub = c.subscribe(["nodes"])
        try:
            a, b = b"\xaa" * 8, b"\xbb" * 8
            c.register_node(a, {"node_id": a, "resources": {"CPU": 4.0}})
            c.register_node(b, {"node_id": b, "resources": {"CPU": 1.0}})
            c.heartbeat(a, {"CPU": 3.0})
            states = {n["node_id"]: n for n in c.get_nodes()}
            assert states[a]["state"] == "ALIVE" and states[a]["available"] == {"CPU": 3.0}
            # Keep b alive with heartbeats while a falls silent.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                c.heartbeat(b, {"CPU": 1.0})
                msg = sub.recv(0.1)
                if msg and msg["key"] == a and msg["value"]["state"] == "DEAD":
                    break
            else:
                pytest.fail("node a was never declared DEAD")
            states = {n["node_id"]: n["state"] for n in c.get_nodes()}
            assert states == {a: "DEAD", b: "ALIVE"}
            c.unregister_node(b)
            assert {n["node_id"]: n["state"] for n in c.get_nodes()}[b] == "DEAD"
        finally:
            sub.close()
            c.close()
        events = [x["event"] for x in g.log_lines()]
        assert events.count("node_registered") == 2 and events.count("node_dead") == 2


def test_sigterm_exits_zero_quickly_and_logs_are_json(tmp_path):
    with gcsd(tmp_path) as g:
        GcsClient(g.address, timeout=5).close()
        start = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(5) == 0
        assert time.monotonic() - start < 2
    lines = g.log_lines()
    assert [x["event"] for x in lines][0] == "gcsd_started"
    assert lines[-1]["event"] == "gcsd_stopped"
    for line in lines:
        for key in ("ts", "level", "daemon", "node_id", "pid", "event"):
            assert key in line, (key, line)
        assert line["daemon"] == "gcsd" and line["pid"] == g.proc.pid
    assert lines[0]["address"] == g.address and lines[0]["pubsub"] == g.pubsub
    text = g.log_path.read_text().strip().splitlines()
    assert all(t.startswith("{") for t in text), "every stderr line is a JSON object"


@pytest.mark.parametrize("config, message", [
    ("[gcsd\nport = ", "not valid TOML"),
    ("[gcsd]\nport = 'eighty'\n", "port must be"),
    ("[gcsd]\nnode_timeout_s = -1\n", "node_timeout_s must be"),
    ("[gcsd]\nbogus = 1\n", "unknown [gcsd] config keys"),
])
def test_bad_config_exits_2(tmp_path, config, message):
    conf = tmp_path / "shoal.toml"
    conf.write_text(config)
    res = run_to_exit(tmp_path, "--config", str(conf), "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2
    assert "error: " in res.stderr and message in res.stderr


def test_config_file_sets_values_and_flags_win(tmp_path):
    conf = tmp_path / "shoal.toml"
    conf.write_text(f"[gcsd]\nport = 1\ndata_dir = '{tmp_path / 'from-config'}'\n"
                    f"node_timeout_s = 3\n")
    with gcsd(tmp_path, "--config", str(conf)) as g:  # --port 0 and --data-dir win
        lines = g.log_lines()
    assert lines[0]["node_timeout_s"] == 3.0
    assert lines[0]["data_dir"] == str(tmp_path / "gcs")


def test_missing_data_dir_and_unusable_data_dir_exit_2(tmp_path):
    res = run_to_exit(tmp_path, "--port", "0")
    assert res.returncode == 2 and "--data-dir" in res.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = run_to_exit(tmp_path, "--port", "0", "--data-dir", str(blocker / "gcs"))
    assert res.returncode == 2 and "not usable" in res.stderr


def test_port_in_use_exits_2(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = run_to_exit(tmp_path, "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2 and "cannot bind" in res.stderr


def test_second_gcsd_on_the_same_data_dir_exits_2(tmp_path):
    with gcsd(tmp_path):
        res = run_to_exit(tmp_path, "--port", "0", "--data-dir", str(tmp_path / "gcs"))
    assert res.returncode == 2 and "in use by another gcsd" in res.stderr


def test_an_idle_gcsd_sleeps(server, client):
    # A loop that polls with a zero timeout burns a whole core while
    # looking idle; on a 2-core host that halves what workers get.
    client.ping()
    proc = psutil.Process(server.proc.pid)
    before = proc.cpu_times()
    time.sleep(1.0)
    after = proc.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.3, f"idle gcsd used {used:.2f} s of CPU in 1 s"
