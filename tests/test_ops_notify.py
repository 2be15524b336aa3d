"""systemd's notify protocol: READY=1 only once serving, WATCHDOG=1 while the loop turns."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_ops_support import ROOT, check_log_text, start_daemon, stop

from daemons import sdnotify
from libclient.cli.health import SERVING, probe_unix

WATCHDOG_USEC = 1_000_000  # keep-alives every 0.5 s


class NotifySocket:
    """A test stand-in for systemd's notification socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.path = path

    def next(self, timeout: float) -> list[str]:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode().split("\n")

    def until(self, state: str, timeout: float) -> tuple[list[list[str]], float]:
        """Datagrams received up to and including the one carrying ``state``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(msg)
            if state in msg:
                return seen, time.monotonic()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(str(tmp_path / "notify.sock"))
    yield n
    n.close()


def _spawn(module, args, notify, tmp_path, name):
    env = dict(os.environ, NOTIFY_SOCKET=notify.path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", module, "--config", "none", *args],
                            stdin=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT)
    log.close()
    return proc


def _ready_then_serving_then_watchdog(proc, notify, socket_path):
    try:
        seen, _ = notify.until("READY=1", 60)
    except TimeoutError:
        raise AssertionError(f"no READY=1 (exit status {proc.poll()})") from None
    # READY=1 promises service: a ping answers right away.
    assert probe_unix("x", socket_path, timeout=5).state == SERVING
    assert f"MAINPID={proc.pid}" in seen[-1]
    assert not any("WATCHDOG=1" in m for m in seen)  # never before READY
    start = time.monotonic()
    pings = 0
    while pings < 3:
        if "WATCHDOG=1" in notify.next(10):
            pings += 1
    assert time.monotonic() - start < 8
    proc.send_signal(signal.SIGTERM)
    notify.until("STOPPING=1", 15)
    assert proc.wait(15) == 0


def test_stored_notifies_ready_and_feeds_the_watchdog(tmp_path, notify):
    sock = str(tmp_path / "run" / "stored.sock")
    proc = _spawn("daemons.stored", ["--socket", sock, "--memory", "4M"], notify, tmp_path,
                  "stored")
    try:
        _ready_then_serving_then_watchdog(proc, notify, sock)
    finally:
        stop(proc)
    events = check_log_text((tmp_path / "stored.log").read_text())
    assert "watchdog_enabled" in {e["event"] for e in events}


def test_raylet_notifies_ready_only_after_registering(tmp_path, notify):
    gcs, ready = start_daemon("gcsd", ["--port", "0", "--data-dir", str(tmp_path / "gcs")],
                              tmp_path / "gcsd.log")
    store_sock = str(tmp_path / "stored.sock")  # a raylet waits for its stored
    store, _ = start_daemon("stored", ["--socket", store_sock, "--memory", "16M",
                                       "--set", f"stored.spill_dir={tmp_path / 'spill'}"],
                            tmp_path / "stored.log")
    sock = str(tmp_path / "run" / "raylet.sock")
    proc = _spawn("daemons.raylet", ["--socket", sock, "--store-socket", store_sock,
                                     "--gcs-address", ready["address"], "--num-cpus", "0"],
                  notify, tmp_path, "raylet")
    try:
        _ready_then_serving_then_watchdog(proc, notify, sock)
    finally:
        stop(proc)
        stop(store)
        stop(gcs)
    check_log_text((tmp_path / "raylet.log").read_text())


def test_raylet_that_cannot_serve_never_says_ready(tmp_path, notify):
    proc = _spawn("daemons.raylet", ["--socket", str(tmp_path / "r.sock"),
                                     "--gcs-address", "tcp://127.0.0.1:9", "--gcs-timeout", "1"],
                  notify, tmp_path, "raylet")
    try:
        assert proc.wait(60) == 2
    finally:
        stop(proc)
    notify.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        notify.sock.recv(4096)


def test_watchdog_stays_silent_while_the_loop_is_wedged(notify):
    sent = []

    class Recorder(sdnotify.Notifier):
        def send(self, *states):
            sent.append(states)
            return True

    class Log:
        def __init__(self):
            self.events = []

        def error(self, event, **kw):
            self.events.append(event)

        info = error

    last = [time.monotonic()]
    log = Log()
    dog = sdnotify.Watchdog(0.05, lambda: last[0], log, Recorder()).start()
    try:
        deadline = time.monotonic() + 10
        while len(sent) < 2 and time.monotonic() < deadline:
            last[0] = time.monotonic()
            time.sleep(0.01)
        assert len(sent) >= 2
        last[0] = time.monotonic() - 3600  # the loop stops turning
        time.sleep(0.2)
        count = len(sent)
        time.sleep(0.3)
        assert len(sent) == count and "watchdog_stalled" in log.events
    finally:
        dog.stop()


def test_watchdog_interval_follows_sd_watchdog_enabled():
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "4000000",
                                       "WATCHDOG_PID": str(os.getpid())}) == 2.0


def test_gcsd_notifies_ready_feeds_the_watchdog_and_says_stopping(tmp_path, notify):
    proc = _spawn("daemons.gcsd", ["--port", "0", "--data-dir", str(tmp_path / "gcs")],
                  notify, tmp_path, "gcsd")
    try:
        seen, _ = notify.until("READY=1", 60)
        assert not any("WATCHDOG=1" in m for m in seen)
        pings = 0
        while pings < 3:
            if "WATCHDOG=1" in notify.next(10):
                pings += 1
        proc.send_signal(signal.SIGTERM)
        notify.until("STOPPING=1", 15)
        assert proc.wait(15) == 0
    finally:
        stop(proc)
    events = check_log_text((tmp_path / "gcsd.log").read_text())
    assert "watchdog_enabled" in {e["event"] for e in events}
