"""supervisord.conf under a real supervisord: start, serve a driver, survive kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest
from test_ops_support import (
    ROOT,
    check_log_text,
    free_port,
    run_driver,
    wait_for,
)

from libclient.cli.health import SERVING, probe_unix


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.access(path, os.X_OK) else (shutil.which(name) or name)


@pytest.fixture
def supervised(tmp_path):
    port = free_port()
    conf = tmp_path / "shoal.toml"
    conf.write_text(f'[node]\nruntime_dir = "{tmp_path}/run"\nstate_dir = "{tmp_path}/state"\n'
                    f'[gcs]\nmembers = ["127.0.0.1:{port}"]\n'
                    f'[gcsd]\nport = {port}\ndata_dir = "{tmp_path}/state/gcs"\n'
                    f'[stored]\nmemory = "64M"\n[raylet]\nnum_cpus = 1\n')
    sup_dir = tmp_path / "sup"
    sup_dir.mkdir()
    env = dict(os.environ, SHOAL_CONFIG=str(conf), SHOAL_SUPERVISOR_DIR=str(sup_dir))
    # supervisord finds gcsd/stored/raylet on PATH: the scripts beside this Python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen([_tool("supervisord"), "-c", str(ROOT / "supervisord.conf")],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path)

    def ctl(*args: str) -> str:
        return subprocess.run([_tool("supervisorctl"), "-c", str(ROOT / "supervisord.conf"),
                               *args], env=env, capture_output=True, text=True,
                              timeout=60).stdout

    try:
        yield {"raylet": str(tmp_path / "run" / "raylet.sock"), "ctl": ctl, "proc": proc,
               "logs": sup_dir, "tmp": tmp_path}
    finally:
        daemons = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)  # supervisord stops the group, then exits
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs(daemons, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"left running: {[p.pid for p in alive]}"


def _raylet_pid(ctl) -> int:
    out = ctl("pid", "shoal:raylet").strip()
    return int(out) if out.isdigit() else 0


def _serving(supervised) -> bool:
    code = supervised["proc"].poll()
    assert code is None, f"supervisord exited with status {code}"
    return probe_unix("raylet", supervised["raylet"]).state == SERVING


def test_supervisord_runs_the_suite_and_restarts_a_killed_raylet(supervised):
    raylet, ctl = supervised["raylet"], supervised["ctl"]
    wait_for(lambda: _serving(supervised), timeout=90, interval=0.3)
    # RUNNING once each has stayed up for its startsecs.
    wait_for(lambda: ctl("status").count("RUNNING") == 3, timeout=60, interval=0.5)
    res = run_driver(raylet, supervised["tmp"])
    assert res.returncode == 0 and "RESULT [0, 1, 4, 9]" in res.stdout, res.stderr[-3000:]

    old = _raylet_pid(ctl)
    workers = psutil.Process(old).children()
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (p := _raylet_pid(ctl)) not in (0, old) and p, timeout=90,
                   interval=0.3)
    wait_for(lambda: _serving(supervised), timeout=90, interval=0.3)
    assert new != old
    _, alive = psutil.wait_procs(workers, timeout=30)  # the old workers died with it
    assert not alive
    res = run_driver(raylet, supervised["tmp"])
    assert res.returncode == 0 and "RESULT [0, 1, 4, 9]" in res.stdout, res.stderr[-3000:]
    events = []  # every line the daemons (and workers) wrote is a JSON log line
    for program in ("gcsd", "stored", "raylet"):
        events += check_log_text((supervised["logs"] / f"{program}.log").read_text())
    started = [e for e in events if e["event"] == "raylet_started"]
    assert len({e["pid"] for e in started}) == 2
