"""On one host, only the right users: SO_PEERCRED on every Unix socket, 0700 dirs.

The daemons run as real processes (as root here, like the test); clients
run as other uids (``subprocess`` with ``user=``/``group=``) after the test
has loosened the directory and socket modes: the kernel then lets them
connect, so what refuses them is the daemons' SO_PEERCRED check itself.
"""

import glob
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from libclient.peer_policy import (
    ConnState,
    InputLimits,
    LocalPeerPolicy,
    LogOncePerPeer,
    PeerCred,
    overdue,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_standalone import _start, _stop  # noqa: E402

NOBODY, NOGROUP = 65534, 65534
STRANGER = 23456  # a uid with no account: not the daemons', not root

# A stdlib-only client (any uid can run /usr/bin/python3): ping a Unix socket
# and print what came back: "reply", "closed" or "open" (nothing within 2 s).
_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
body = b"\x82\xa1t\xa4ping\xa1r\x01"
try:
    if sys.argv[2] == "ping":
        s.sendall(len(body).to_bytes(4, "little") + body)
except OSError:  # already closed by the daemon
    print("closed")
    sys.exit(0)
s.settimeout(2)
try:
    data = s.recv(4096)
    print("reply" if data else "closed")
except socket.timeout:
    print("open")
except OSError:
    print("closed")
"""


def _as_user(path, uid, gid, what="ping"):
    out = subprocess.run(["/usr/bin/python3", "-I", "-c", _CLIENT, path, what],
                         user=uid, group=gid, extra_groups=[], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# --------------------------------------------------------------- pure policy
def test_the_policy_admits_owner_root_and_the_group_only():
    p = LocalPeerPolicy(own_uid=999)
    assert p.allows(PeerCred(1, 999, 5)) and p.allows(PeerCred(1, 0, 0))
    assert not p.allows(PeerCred(1, 1000, 999))
    g = LocalPeerPolicy(own_uid=999, group_gid=50, group_uids=frozenset({1001}))
    assert g.allows(PeerCred(1, 1000, 50))  # primary group
    assert g.allows(PeerCred(1, 1001, 7))  # listed member
    assert not g.allows(PeerCred(1, 1002, 7))


def test_log_once_per_peer_logs_1st_10th_100th_and_forgets_old_peers():
    lim = LogOncePerPeer(capacity=3)
    logged = [n for n in range(1, 1001) if lim.should_log("a", "x")]
    assert logged == [1, 10, 100, 1000]
    assert lim.should_log("a", "y") and lim.count("a", "x") == 1000
    for peer in "bcd":
        lim.should_log(peer, "x")
    assert len(lim) == 3 and lim.count("a", "x") == 0  # the oldest went first


def test_limits_cut_silent_strangers_overflowing_and_stalled_peers():
    lim = InputLimits(max_connections=2, max_out_bytes=100, first_message_s=5, stall_s=10,
                      stall_bytes=10)
    assert lim.admit(1) and not lim.admit(2)
    conns = [ConnState("quiet-local", 99, False, 0, 99, False),
             ConnState("quiet-tcp", 6, False, 0, 6, True),
             ConnState("flooded", 1, True, 101, 0, False),
             ConnState("stalled", 20, True, 50, 11, False),
             ConnState("slow-but-moving", 20, True, 50, 1, False)]
    assert [k for k, _ in overdue(lim, conns)] == ["quiet-tcp", "flooded", "stalled"]


# --------------------------------------------------------------- real daemons
@pytest.fixture
def node():
    """gcsd, stored and raylet in a directory other uids can reach into."""
    base = tempfile.mkdtemp(prefix="shoal-local-access-", dir="/tmp")
    os.chmod(base, 0o711)
    run = os.path.join(base, "run")
    procs = []
    from pathlib import Path

    logs = Path(base)
    try:
        gcs_proc, gcs = _start("gcsd", ["--port", "0", "--data-dir", f"{base}/gcs",
                                        "--config", "none"], logs)
        procs.append(gcs_proc)
        store_sock = f"{run}/stored.sock"
        store_proc, _ = _start("stored", ["--socket", store_sock, "--memory", str(64 << 20),
                                          "--config", "none"], logs)
        procs.append(store_proc)
        raylet_proc, _ = _start("raylet", ["--socket", f"{run}/raylet.sock", "--store-socket",
                                           store_sock, "--gcs-address", gcs["address"],
                                           "--num-cpus", "1", "--config", "none"], logs)
        procs.append(raylet_proc)
        yield {"base": base, "run": run, "procs": procs}
    finally:
        for p in reversed(procs):
            _stop(p)
        subprocess.run(["rm", "-rf", base], check=False)


def _worker_sockets(run, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in glob.glob(f"{run}/*.sock")
                 if os.path.basename(p) not in ("raylet.sock", "stored.sock")]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no worker socket in {os.listdir(run)}")


def test_runtime_dirs_and_sockets_are_private(node):
    run = node["run"]
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o700
    for path in [f"{run}/raylet.sock", f"{run}/stored.sock", *_worker_sockets(run)]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(f"{node['base']}/gcs").st_mode) == 0o700


def test_a_local_user_with_another_uid_is_refused_everywhere(node):
    run = node["run"]
    workers = _worker_sockets(run)
    # Loosen every mode: only SO_PEERCRED stands between a stranger and the daemons.
    os.chmod(run, 0o711)
    targets = [f"{run}/raylet.sock", f"{run}/stored.sock", *workers]
    for path in targets:
        os.chmod(path, 0o666)
    for path in (f"{run}/raylet.sock", f"{run}/stored.sock"):
        assert _as_user(path, NOBODY, NOGROUP) == "closed", path
        assert _as_user(path, os.getuid(), os.getgid()) == "reply", path  # the owner
    for path in workers:  # a worker answers no ping; it keeps an admitted holder open
        assert _as_user(path, NOBODY, NOGROUP, "wait") == "closed", path
        assert _as_user(path, os.getuid(), os.getgid(), "wait") == "open", path
    for _ in range(15):  # many attempts: still logged once (then at the 10th)
        assert _as_user(f"{run}/stored.sock", NOBODY, NOGROUP) == "closed"
    time.sleep(0.3)
    for name in ("raylet", "stored"):
        lines = [json.loads(line) for line in open(f"{node['base']}/{name}.log")
                 if '"peer_refused"' in line]
        assert lines and lines[0]["peer_uid"] == NOBODY and lines[0]["peer_pid"] > 0, name
    stored_lines = [json.loads(line) for line in open(f"{node['base']}/stored.log")
                    if '"peer_refused"' in line]
    assert [x["attempts"] for x in stored_lines] == [1, 10]
    for p in node["procs"]:
        assert p.poll() is None  # nobody died of it
    assert _as_user(f"{run}/stored.sock", os.getuid(), os.getgid()) == "reply"


def test_a_configured_group_is_admitted_and_others_are_not(tmp_path):
    base = tempfile.mkdtemp(prefix="shoal-local-group-", dir="/tmp")
    os.chmod(base, 0o711)
    run = os.path.join(base, "run")
    proc = None
    try:
        proc, _ = _start("stored", ["--socket", f"{run}/stored.sock", "--memory", str(64 << 20),
                                    "--config", "none", "--set", "security.allowed_group=nogroup"],
                         tmp_path)
        st = os.stat(run)
        assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == NOGROUP
        sock = os.stat(f"{run}/stored.sock")
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == NOGROUP
        os.chmod(run, 0o751)  # let a non-member reach the socket file too
        os.chmod(f"{run}/stored.sock", 0o666)
        assert _as_user(f"{run}/stored.sock", STRANGER, NOGROUP) == "reply"  # a member
        assert _as_user(f"{run}/stored.sock", STRANGER, STRANGER) == "closed"  # not one
        assert proc.poll() is None
    finally:
        if proc is not None:
            _stop(proc)
        subprocess.run(["rm", "-rf", base], check=False)


def test_a_shared_directory_is_never_chmodded(tmp_path):
    """A socket put straight into /tmp must not make the daemon chmod /tmp."""
    before = stat.S_IMODE(os.stat("/tmp").st_mode)
    name = f"/tmp/shoal-test-{os.getpid()}.sock"
    with pytest.raises(AssertionError, match="shared"):
        _start("stored", ["--socket", name, "--memory", str(64 << 20), "--config", "none"],
               tmp_path)
    assert stat.S_IMODE(os.stat("/tmp").st_mode) == before
    assert not os.path.exists(name)


def test_the_peer_check_costs_microseconds_per_connection(tmp_path):
    """One getsockopt at accept; measured against a bare connect+accept."""
    from libclient import peer_guard

    path = str(tmp_path / "s.sock")
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listen.bind(path)
    listen.listen(64)

    class _Log:
        def warning(self, *_a, **_k):
            pass

    gate = peer_guard.LocalGate(_Log(), "bench")
    n = 2000

    def run(check):
        t = time.perf_counter()
        for _ in range(n):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            s, _ = listen.accept()
            if check:
                assert gate.admit(s) is not None
            s.close()
            c.close()
        return (time.perf_counter() - t) / n

    run(False)
    bare, checked = min(run(False) for _ in range(3)), min(run(True) for _ in range(3))
    listen.close()
    print(f"connect+accept {bare * 1e6:.1f} us, with SO_PEERCRED check {checked * 1e6:.1f} us")
    assert checked - bare < 50e-6
