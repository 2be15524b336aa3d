"""Fault injection with real processes: 3 gcsd members, 4 shards, chains of 3, one master.

A client writes and reads continuously while we kill -9 the head of a shard,
then a middle replica, then a tail (restarting each), and then the chain
master. Afterwards every acknowledged write must read back. The longest
stall any client call saw is printed (and only loosely bounded: other
engineers' tests share these two cores).

The same cluster first takes bad input on every socket it listens on.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from libclient.gcs_client import GcsClient, GcsError, route_key, shard_of
from libclient.protocol import encode_body

ROOT = Path(__file__).resolve().parent.parent
SHARDS, R = 4, 3


def _free_port_pair() -> int:
    """A port p with p and p+1 free (a member publishes on p+1)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65534:
            continue
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


class Cluster:
    """Master + members as processes; everything is stopped by pid in stop()."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports = [_free_port_pair() for _ in range(3)]
        self.master_port = _free_port_pair()
        self.members = [f"tcp://127.0.0.1:{p}" for p in self.ports]
        self.master_address = f"tcp://127.0.0.1:{self.master_port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def _common(self) -> list[str]:
        return ["--shards", str(SHARDS), "--chain-length", str(R), "--members",
                ",".join(self.members), "--heartbeat-s", "0.1", "--dead-s", "0.5"]

    def start(self, name: str) -> None:
        if name == "master":
            args = ["--role", "master", "--port", str(self.master_port)]
        else:
            args = ["--member-id", name[1:], "--master", self.master_address]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        ready_r, ready_w = os.pipe()
        with open(self.base / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "daemons.gcsd", *args, *self._common(),
                 "--data-dir", str(self.base / name), "--ready-fd", str(ready_w)],
                pass_fds=(ready_w,), stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT, env=env)
        os.close(ready_w)
        try:
            with os.fdopen(ready_r, "rb") as f:
                line = f.readline()
            assert line.startswith(b"{"), f"{name} did not start"
        except Exception:
            self.kill(name)
            raise

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def layout(self) -> list[tuple[int, list[int]]]:
        """Each shard's (epoch, chain), taking the newest epoch any member reports."""
        best: list[tuple[int, list[int]]] = [(0, [])] * SHARDS
        for address in self.members:
            with GcsClient(address, timeout=0.5) as c:
                try:
                    reply = c.call("config")
                except GcsError:
                    continue
            for s, epoch, chain in reply["configs"]:
                if epoch > best[s][0]:
                    best[s] = (epoch, chain)
        return best

    def wait_full(self, timeout: float = 30.0) -> list[tuple[int, list[int]]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lay = self.layout()
            if all(len(chain) == R for _e, chain in lay):
                return lay
            time.sleep(0.1)
        raise AssertionError(f"chains did not heal: {self.layout()}")

    def wait_without(self, member: int, shard: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if member not in self.layout()[shard][1]:
                return
            time.sleep(0.05)
        raise AssertionError(f"member {member} never left shard {shard}'s chain")

    def log_lines(self, name: str) -> list[dict]:
        return [json.loads(x) for x in (self.base / f"{name}.log").read_text().splitlines()
                if x.startswith("{")]


class Workload:
    """One client thread writing and reading back continuously."""

    def __init__(self, address: str) -> None:
        self.client = GcsClient(address, timeout=30.0)
        self.acked: dict[bytes, bytes] = {}
        self.longest = 0.0
        self.phase_longest = 0.0
        self.calls = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.rng = random.Random(5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()

    def _timed(self, fn, *args):
        start = time.monotonic()
        try:
            return fn(*args)
        finally:
            took = time.monotonic() - start
            self.longest = max(self.longest, took)
            self.phase_longest = max(self.phase_longest, took)
            self.calls += 1

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                i += 1
                key, value = b"key-%d" % i, b"value-%d" % i
                self._timed(self.client.kv_put, "faults", key, value)
                self.acked[key] = value
                if i % 10 == 0:
                    self._timed(self.client.put_batch, "tasks",
                                [(b"t-%d-%d" % (i, j), {"j": j}) for j in range(20)], True)
                    for j in range(20):
                        self.acked[b"tasks:t-%d-%d" % (i, j)] = {"j": j}
                probe = self.rng.choice(list(k for k in self.acked if not k.startswith(b"t")))
                got = self._timed(self.client.kv_get, "faults", probe)
                if got != self.acked[probe]:
                    self.errors.append(f"read {probe!r} -> {got!r}")
        except Exception as exc:  # reported by the test
            self.errors.append(repr(exc))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("chain"))
    try:
        c.start("master")
        for m in range(3):
            c.start(f"m{m}")
        c.wait_full()
        yield c
    finally:
        c.stop()


def _raw(address: str, frames: list[list[bytes]], probe_rid: int = 99) -> dict[int, dict]:
    """Send raw frames, then a ping; return the replies that came back."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        for f in frames:
            sock.send_multipart(f)
        sock.send(encode_body({"t": "ping", "r": probe_rid}))
        replies: dict[int, dict] = {}
        while probe_rid not in replies:
            assert sock.poll(5000), f"{address} stopped answering"
            reply = msgpack.unpackb(sock.recv(), raw=False)
            replies[reply.get("r")] = reply
        return replies
    finally:
        sock.close()


def test_bad_input_on_every_socket_is_logged_and_survived(cluster):
    member = cluster.members[0]
    chain = {"t": "chain", "s": 0, "src": 1}
    junk = [
        [b"\x00garbage\xff"],
        [encode_body({"t": "kv_put", "r": 1, "ns": "x"})[:-3]],             # truncated
        [encode_body({**chain, "k": "fwd", "e": 10**6, "entries": [], "c": 0})],  # wrong epoch
        [encode_body({**chain, "k": "fwd", "e": 1, "entries": [[1, 2]], "c": 0})],  # bad entry
        [encode_body({**chain, "s": 99, "k": "ack", "e": 1, "a": 0, "c": 0})],   # unknown shard
        [encode_body({**chain, "k": "bogus", "e": 1})],
        [encode_body({"t": "snap", "s": 0, "e": 1, "src": 1, "n": 0, "items": "x"})],
        [encode_body({"t": "get", "r": 2, "table": "kv", "key": b"k", "s": 99})],  # unknown shard
        [encode_body({"t": "get", "r": 3, "table": "kv", "key": b"k", "s": 0, "e": 10**6})],
        [encode_body({"t": "ping", "r": 4}), b"second frame"],
    ]
    replies = _raw(member, junk)
    assert replies[99]["ok"] is True
    assert replies[2]["ok"] is False and "unknown shard" in replies[2]["error"]
    assert replies[3]["ok"] is False and replies[3]["retry"] is True
    master_junk = [
        [b"\xc1"],
        [encode_body({"t": "m_hb", "r": 5, "m": 0, "inc": 1, "shards": "nope"})],
        [encode_body({"t": "m_hb", "r": 6, "m": 77, "inc": 1, "shards": {}})],
        [encode_body({"t": "frobnicate", "r": 7})],
        [encode_body({"t": "m_sus", "r": 8, "m": "zero", "x": 1})],
    ]
    replies = _raw(cluster.master_address, master_junk)
    assert replies[99]["ok"] is True
    assert replies[5]["ok"] is False and replies[7]["ok"] is False
    assert replies[8]["ok"] is False
    # The PUB socket takes no input but subscriptions; a SUB sending junk
    # topics only subscribes to nothing.
    for name in ("m0", "master"):
        assert cluster.procs[name].poll() is None
    events = {x["event"] for x in cluster.log_lines("m0")}
    assert {"bad_request", "bad_chain_message", "chain_stale_epoch", "bad_snapshot"} <= events
    assert "bad_request" in {x["event"] for x in cluster.log_lines("master")}
    with GcsClient(",".join(cluster.members), timeout=10) as c:
        c.kv_put("after-junk", b"k", b"v")
        assert c.kv_get("after-junk", b"k") == b"v"


def test_the_tail_answers_a_write_that_asks_for_it(cluster):
    # §2 of the paper: writes enter at the head and the tail replies. A
    # client whose sockets carry its id as routing id, connected to every
    # member, gets the answer on its socket to the *tail*.
    (_s0, chain), *_ = cluster.wait_full()
    cid = b"c-tail-test"
    ctx = zmq.Context.instance()
    socks = {}
    try:
        for m, address in enumerate(cluster.members):
            sock = socks[m] = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, cid)
            sock.connect(address)
            sock.send(encode_body({"t": "ping", "r": 1000 + m}))
            assert sock.poll(5000) and msgpack.unpackb(sock.recv())["ok"] is True
        head, tail = socks[chain[0]], socks[chain[-1]]
        base = {"t": "put", "table": "kv", "key": b"tail-answers", "value": 1, "s": 0, "c": cid}
        head.send(encode_body({**base, "r": 1, "tr": True}))
        assert tail.poll(5000), "the tail never answered"
        reply = msgpack.unpackb(tail.recv())
        assert reply["r"] == 1 and reply["ok"] is True
        assert not head.poll(300), "the head answered too"
        # Without "tr" the head answers, once the commit is back.
        head.send(encode_body({**base, "r": 2}))
        assert head.poll(5000) and msgpack.unpackb(head.recv())["r"] == 2
        assert not tail.poll(100)
    finally:
        for sock in socks.values():
            sock.close()


def _node_row(cluster: Cluster, node_id: bytes) -> dict:
    with GcsClient(",".join(cluster.members), timeout=10) as c:
        return next(n for n in c.get_nodes() if n["node_id"] == node_id)


def test_heartbeats_follow_a_head_that_moved(cluster):
    # Found by the chaos suite: heartbeats are one-way, so a refused one is
    # dropped unseen. A raylet whose layout was one epoch old had every
    # heartbeat refused as "stale" by the head it was still talking to, and
    # one whose shard's head moved kept talking to the old head; either way
    # its node was declared dead while it lived.
    node_id = os.urandom(16)
    with GcsClient(",".join(cluster.members), timeout=10) as c:
        c.register_node(node_id, {"address": "127.0.0.1:1", "resources": {"CPU": 1.0}})
    s = shard_of(*route_key("heartbeat", {"node_id": node_id}), SHARDS)
    epoch, chain = cluster.wait_full()[s]
    head, tail = chain[0], chain[-1]
    # 1. The shard's epoch moves (its tail dies) while its head stays: a
    #    one-way heartbeat stamped with the old epoch still counts.
    cluster.kill(f"m{tail}")
    cluster.wait_without(tail, s)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.members[head])
    try:
        sock.send(encode_body({"t": "heartbeat", "node_id": node_id, "s": s, "e": epoch,
                               "available": {"CPU": 0.25}, "version": 7}))
        deadline = time.monotonic() + 5
        while _node_row(cluster, node_id).get("available") != {"CPU": 0.25}:
            assert time.monotonic() < deadline, "a one-way heartbeat of the old epoch was lost"
            time.sleep(0.05)
    finally:
        sock.close()
        cluster.start(f"m{tail}")
        cluster.wait_full()
    # 2. The shard's head dies and comes back as a tail: a client that only
    #    sends one-way heartbeats finds the new head by itself.
    epoch, chain = cluster.wait_full()[s]
    with GcsClient(",".join(cluster.members), timeout=10) as c:
        c.heartbeat(node_id, {"CPU": 0.5}, 8)
        old_head = chain[0]
        cluster.kill(f"m{old_head}")
        cluster.wait_without(old_head, s)
        cluster.start(f"m{old_head}")
        cluster.wait_full()
        version = 9
        deadline = time.monotonic() + 10
        while _node_row(cluster, node_id).get("available") != {"CPU": float(version)}:
            assert time.monotonic() < deadline, "one-way heartbeats never reached the new head"
            version += 1
            c.heartbeat(node_id, {"CPU": float(version)}, version)
            time.sleep(0.2)


def test_the_master_pushes_a_new_chain_without_waiting_for_a_heartbeat(tmp_path):
    # Two fake members beat once; member 1 then falls silent. When the
    # master removes it, member 0 hears the new chain unasked (rid 0), not
    # only in the answer to its next heartbeat.
    solo = Cluster(tmp_path)
    ctx = zmq.Context.instance()
    socks = []
    try:
        solo.start("master")
        for m in (0, 1):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(solo.master_address)
            sock.send(encode_body({"t": "m_hb", "r": 7, "m": m, "inc": 1, "shards": {}}))
            assert sock.poll(5000)
            sock.recv()
            socks.append(sock)
        assert socks[0].poll(5000), "no push from the master"
        push = msgpack.unpackb(socks[0].recv(), raw=False, strict_map_key=False)
        assert push["r"] == 0 and push["ok"] is True
        assert all(1 not in chain for _s, _e, chain in push["configs"])
    finally:
        for sock in socks:
            sock.close()
        solo.stop()


def test_kills_lose_no_acknowledged_write(cluster, capsys):
    work = Workload(",".join(cluster.members))
    work.start()
    stalls = {}
    try:
        time.sleep(0.5)
        for what, shard in (("head", 0), ("middle", 1), ("tail", 2)):
            _epoch, chain = cluster.layout()[shard]
            victim = {"head": chain[0], "middle": chain[1], "tail": chain[-1]}[what]
            work.phase_longest = 0.0
            cluster.kill(f"m{victim}")
            cluster.wait_without(victim, shard)
            time.sleep(0.3)
            cluster.start(f"m{victim}")
            cluster.wait_full()
            time.sleep(0.3)
            stalls[what] = work.phase_longest
        work.phase_longest = 0.0
        cluster.kill("master")
        time.sleep(1.0)  # chains keep serving with the master down
        calls = work.calls
        time.sleep(0.5)
        assert work.calls > calls, "writes stopped while the master was down"
        cluster.start("master")
        cluster.wait_full()
        time.sleep(0.5)
        stalls["master"] = work.phase_longest
    finally:
        work.stop()
    assert not work.errors, work.errors[:5]
    assert len(work.acked) > 100
    with GcsClient(",".join(cluster.members), timeout=10) as c:
        for key, value in work.acked.items():
            if key.startswith(b"tasks:"):
                assert c.table_get("tasks", key[len(b"tasks:"):]) == value, key
            else:
                assert c.kv_get("faults", key) == value, key
    with capsys.disabled():
        print(f"\nchain faults: {len(work.acked)} acknowledged writes, {work.calls} calls, "
              f"longest client stall {work.longest * 1000:.0f} ms "
              f"(per phase: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stalls.items())
              + ")")
    assert work.longest < 10.0  # generous: the target (< 1 s) is reported, not asserted
    # Killed members were replaced on their neighbours' word (a lost
    # connection and no heartbeat after it), not only by heartbeat timeout.
    reasons = {x.get("reason") for x in cluster.log_lines("master")
               if x["event"] == "master_reconfigured"}
    assert "connection_lost" in reasons, reasons
