"""Helpers shared by the tests/test_ops_*.py modules (this module holds no tests)."""

from __future__ import annotations

import datetime
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("ts", "level", "daemon", "node_id", "pid", "event")
LEVELS = {"debug", "info", "warning", "error", "critical"}


def check_log_line(line: str) -> dict:
    """Assert one log line follows docs/logging.md and return it parsed."""
    event = json.loads(line)
    assert isinstance(event, dict), line
    missing = [k for k in REQUIRED if k not in event]
    assert not missing, f"missing {missing} in {line}"
    assert list(event)[:6] == list(REQUIRED), f"required fields not first: {line}"
    ts = datetime.datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
    assert event["ts"].endswith("Z") and ts.utcoffset() == datetime.timedelta(0), line
    assert event["level"] in LEVELS, line
    assert isinstance(event["pid"], int) and isinstance(event["node_id"], str), line
    return event


def check_log_text(text: str) -> list[dict]:
    """Every non-empty line of ``text`` is a schema-conforming JSON object."""
    return [check_log_line(line) for line in text.splitlines() if line.strip()]


def check_log_dir(path: Path, pattern: str = "*.log") -> list[dict]:
    events = []
    for f in sorted(path.glob(pattern)):
        events += check_log_text(f.read_text())
    return events


def free_port() -> int:
    """A TCP port with port+1 also free (gcsd publishes on port+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65534:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def start_daemon(name: str, args: list[str], log_path: Path, env: dict | None = None,
                 timeout: float = 60.0) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m daemons.<name>`` and wait for its --ready-fd line."""
    r, w = os.pipe()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"daemons.{name}", *args,
                                 "--ready-fd", str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL,
                                stderr=log, cwd=ROOT, env=env)
    os.close(w)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf and time.monotonic() < deadline:
            if select.select([r], [], [], 0.5)[0]:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
    if b"\n" not in buf:
        stop(proc)
        raise AssertionError(f"{name} not ready: {log_path.read_text()[-2000:]}")
    return proc, json.loads(buf)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (for real processes only)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(interval)


def shoal(*args: str, timeout: float = 90.0, env: dict | None = None,
          input: str | None = None) -> subprocess.CompletedProcess:
    """Run the ``shoal`` CLI (as ``python -m libclient.cli``) to completion."""
    return subprocess.run([sys.executable, "-m", "libclient.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, input=input,
                          env=dict(os.environ, **(env or {})))


DRIVER = """
import sys
import libclient as ray
ray.init(address=sys.argv[1])

@ray.remote
def square(x):
    return x * x

print("RESULT", ray.get([square.remote(i) for i in range(4)]))
ray.shutdown()
"""


def run_driver(address: str, tmp: Path) -> subprocess.CompletedProcess:
    script = tmp / "ops_driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, str(script), address], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
