"""Daemons started on their own (as systemd would), drivers that connect to them.

gcsd, stored and raylet run as separate processes started here; drivers
connect with ``init(address=...)`` and must leave them running.
"""

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(name, args, tmp_path):
    r, w = os.pipe()
    log = open(tmp_path / f"{name}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", f"daemons.{name}", *args, "--ready-fd", str(w)],
                            pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    log.close()
    os.close(w)
    buf = b""
    deadline = time.monotonic() + 30
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
        proc.kill()
        proc.wait()
        raise AssertionError(f"{name} not ready: {(tmp_path / f'{name}.log').read_text()[-2000:]}")
    return proc, json.loads(buf)


def _stop(proc, timeout=10):
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.fixture
def node(tmp_path, request):
    extra = getattr(request, "param", [])
    run = tmp_path / "run"
    procs = []
    try:
        gcs_proc, gcs = _start("gcsd", ["--port", "0", "--data-dir", str(tmp_path / "gcs")], tmp_path)
        procs.append(gcs_proc)
        store_sock = str(run / "stored.sock")
        store_proc, _ = _start("stored", ["--socket", store_sock, "--memory", str(256 << 20)],
                               tmp_path)
        procs.append(store_proc)
        raylet_sock = str(run / "raylet.sock")
        raylet_proc, ready = _start("raylet", ["--socket", raylet_sock, "--store-socket", store_sock,
                                               "--gcs-address", gcs["address"], "--num-cpus", "2",
                                               "--resources", '{"accel": 1}', *extra], tmp_path)
        procs.append(raylet_proc)
        yield {"raylet": raylet_sock, "gcs": gcs["address"], "procs": procs, "tmp": tmp_path,
               "node_id": ready["node_id"]}
    finally:
        for p in reversed(procs):
            _stop(p)


DRIVER = """
import os, sys
import libclient as ray
info = ray.init(address=sys.argv[1] if len(sys.argv) > 1 else None)
assert info["session_dir"] is None

@ray.remote(resources={"accel": 1})
def f(x):
    return x * 3

print("RESULT", ray.get([f.remote(i) for i in range(5)]), ray.cluster_resources()["accel"])
ray.shutdown()
"""


def _driver(tmp_path, argv=(), env=None):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


def test_driver_connects_by_address_and_leaves_daemons_running(node):
    for attempt in range(2):  # a second driver reuses the same daemons
        res = _driver(node["tmp"], [node["raylet"]])
        assert res.returncode == 0, res.stderr[-3000:]
        assert "RESULT [0, 3, 6, 9, 12] 1" in res.stdout, attempt
    assert all(p.poll() is None for p in node["procs"])


def test_driver_connects_through_environment(node):
    res = _driver(node["tmp"], env={"SHOAL_ADDRESS": node["raylet"]})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RESULT" in res.stdout
    res = _driver(node["tmp"], ["auto"], env={"SHOAL_ADDRESS": node["raylet"]})
    assert res.returncode == 0, res.stderr[-3000:]


def test_killed_driver_does_not_hurt_the_node(node):
    script = node["tmp"] / "hang.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import libclient as ray
        ray.init(address=sys.argv[1])
        @ray.remote
        def forever():
            time.sleep(600)
        refs = [forever.remote() for _ in range(2)]
        time.sleep(0.5)
        print("STARTED", flush=True)
        time.sleep(600)
    """))
    proc = subprocess.Popen([sys.executable, str(script), node["raylet"]], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().startswith("STARTED")
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # The killed driver's workers are reclaimed; a new driver gets both CPUs.
    res = _driver(node["tmp"], [node["raylet"]])
    assert res.returncode == 0, res.stderr[-3000:]


def test_raylet_logs_json_and_stops_cleanly_on_sigterm(node):
    raylet = node["procs"][2]
    log = node["tmp"] / "raylet.log"
    deadline = time.monotonic() + 30
    while log.read_text().count("worker_registered") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [c.pid for c in psutil.Process(raylet.pid).children()]
    assert len(workers) == 2  # one prestarted worker per CPU
    raylet.send_signal(signal.SIGTERM)
    assert raylet.wait(15) == 0
    assert not os.path.exists(node["raylet"])
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
              for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in workers)
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{")]
    events = {e["event"] for e in lines}
    assert {"raylet_started", "raylet_stopped", "worker_registered"} <= events
    for e in lines:
        assert {"ts", "level", "daemon", "node_id", "pid", "event"} <= set(e)
        assert e["daemon"] == "raylet" and e["node_id"] == node["node_id"]


def test_raylet_refuses_a_socket_in_use(node):
    res = subprocess.run([sys.executable, "-m", "daemons.raylet", "--socket", node["raylet"],
                          "--store-socket", "x", "--gcs-address", node["gcs"]],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 2
    assert "already in use" in res.stderr


def test_raylet_exits_when_gcsd_is_unreachable(tmp_path):
    res = subprocess.run([sys.executable, "-m", "daemons.raylet", "--socket",
                          str(tmp_path / "r.sock"), "--store-socket", "x",
                          "--gcs-address", "tcp://127.0.0.1:9", "--num-cpus", "1",
                          "--gcs-timeout", "1"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2
    assert "gcsd" in res.stderr
    assert not os.path.exists(tmp_path / "r.sock")


def test_shoal_status_cli(node):
    res = subprocess.run([sys.executable, "-m", "libclient.cli", "status", "--json", "--address",
                          node["raylet"]], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    status = json.loads(res.stdout)
    assert status["cluster_resources"]["CPU"] == 2
    assert status["nodes"][0]["NodeID"] == node["node_id"]
    res = subprocess.run([sys.executable, "-m", "libclient.cli", "status", "--json", "--address",
                          str(node["tmp"] / "nope.sock")], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert res.returncode == 1 and "cannot reach" in res.stderr


@pytest.mark.parametrize("node", [["--worker-python", "/bin/false"]], indirect=True)
def test_workers_that_cannot_start_fail_tasks_instead_of_hanging(node):
    script = node["tmp"] / "broken.py"
    script.write_text(textwrap.dedent("""
        import sys
        import libclient as ray
        from libclient.exceptions import RaySystemError
        ray.init(address=sys.argv[1])
        @ray.remote
        def f():
            return 1
        try:
            ray.get(f.remote(), timeout=60)
        except RaySystemError as e:
            print("FAILED CLEARLY", e)
        ray.shutdown()
    """))
    res = subprocess.run([sys.executable, str(script), node["raylet"]], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "FAILED CLEARLY" in res.stdout and "worker_start_failed" in res.stdout
    assert node["procs"][2].poll() is None  # the raylet itself keeps running


def test_driver_fails_clearly_when_the_raylet_dies(node):
    script = node["tmp"] / "victim.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        import libclient as ray
        from libclient.exceptions import RaySystemError, WorkerCrashedError, ActorDiedError
        ray.init(address=sys.argv[1])

        @ray.remote
        def sleepy():
            time.sleep(600)

        @ray.remote
        class A:
            def ping(self):
                return "pong"

        a = A.remote()
        assert ray.get(a.ping.remote()) == "pong"
        ref = sleepy.remote()
        time.sleep(0.5)
        print("WAITING", flush=True)
        for what, call in (("task", lambda: ref), ("actor", a.ping.remote)):
            try:
                ray.get(call(), timeout=60)  # the actor call goes out after the raylet died
            except (RaySystemError, WorkerCrashedError, ActorDiedError) as e:
                print("CLEAR", what, type(e).__name__, flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script), node["raylet"]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("WAITING")
        node["procs"][2].kill()  # SIGKILL the raylet; its workers die with it
        out, err = proc.communicate(timeout=90)
        assert "CLEAR task" in out, err[-3000:]
        assert "CLEAR actor" in out, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
