"""The ``shoal`` CLI against real daemons it starts itself (shoal start --dir)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from test_ops_support import ROOT, check_log_dir, check_log_text, run_driver, shoal, wait_for

_NODE = ["--set", "gcsd.port=0", "--set", "raylet.num_cpus=1", "--set", "stored.memory=64M"]


def _pids(run_dir):
    return [int((run_dir / f"{d}.pid").read_text()) for d in ("gcsd", "stored", "raylet")
            if (run_dir / f"{d}.pid").exists()]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A background head node started and stopped with the CLI."""
    base = tmp_path_factory.mktemp("cli")
    d = ["--dir", str(base)]
    res = shoal("start", "--head", *d, *_NODE)
    assert res.returncode == 0, res.stderr
    pids = _pids(base / "run")
    try:
        assert "is serving" in res.stdout
        yield {"dir": d, "base": base, "raylet": str(base / "run" / "raylet.sock"),
               "start": res}
    finally:
        res = shoal("stop", *d)
        assert res.returncode == 0, res.stderr
        _, alive = psutil.wait_procs([psutil.Process(p) for p in pids
                                      if psutil.pid_exists(p)], timeout=20)
        for p in alive:
            p.kill()
        assert not alive
        assert not list((base / "run").glob("*.pid"))
        check_log_dir(base / "logs")
        assert all(not f.read_text() for f in (base / "logs").glob("*.stderr"))


def test_status_table_and_json(cluster):
    res = run_driver(cluster["raylet"], cluster["base"])
    assert res.returncode == 0 and "RESULT" in res.stdout, res.stderr[-2000:]
    res = shoal("status", *cluster["dir"])
    assert res.returncode == 0, res.stderr
    for text in ("Daemons (this host)", "serving", "Nodes (1 alive", "CPU", "Tasks",
                 "gcsd: 4 shards over 1 member(s)", "shard 3 "):
        assert text in res.stdout, (text, res.stdout)
    status = json.loads(shoal("status", "--json", *cluster["dir"]).stdout)
    assert status["cluster_resources"]["CPU"] == 1
    assert [d["state"] for d in status["daemons"]] == ["serving"] * 3
    assert sum(status["tasks"].values()) >= 4 or status["tasks"] == {}
    node = status["nodes"][0]
    assert node["Alive"] and status["workers"][node["NodeID"]] >= 1
    # The gcs address works as --address too.
    assert shoal("status", "--json", "--address", status["gcs_address"],
                 *cluster["dir"]).returncode == 0


def test_health_and_unreachable_cluster(cluster, tmp_path):
    res = shoal("health", "--json", *cluster["dir"])
    assert res.returncode == 0 and len(json.loads(res.stdout)) == 3
    res = shoal("status", "--dir", str(tmp_path))
    assert res.returncode == 1 and "cannot reach a raylet" in res.stderr
    res = shoal("health", "--dir", str(tmp_path), "--set", "gcs.members=127.0.0.1:9")
    assert res.returncode == 1 and "down" in res.stdout


def test_kv_get_put_list(cluster):
    d = cluster["dir"]
    assert shoal("kv", "put", *d, "color", "blue").returncode == 0
    assert shoal("kv", "put", *d, "-n", "other", "blob", "-", input="from stdin").returncode == 0
    assert shoal("kv", "get", *d, "color").stdout == "blue"
    assert shoal("kv", "get", *d, "-n", "other", "blob").stdout == "from stdin"
    assert "color" in shoal("kv", "list", *d).stdout.split()
    res = shoal("kv", "get", *d, "missing")
    assert res.returncode == 1 and "no key 'missing'" in res.stderr
    res = shoal("kv", "put", *d, "--no-overwrite", "color", "red")
    assert res.returncode == 1 and "exists" in res.stderr


def test_logs_merge_and_filter(cluster):
    d = cluster["dir"]
    lines = shoal("logs", "--json", *d).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert {"gcsd", "stored", "raylet"} <= {e["daemon"] for e in events}
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    only = [json.loads(x) for x in shoal("logs", "--json", "--daemon", "stored", *d)
            .stdout.splitlines()]
    assert only and {e["daemon"] for e in only} == {"stored"}
    node = next(e["node_id"] for e in events if e["daemon"] == "raylet")
    by_node = [json.loads(x) for x in shoal("logs", "--json", "--node", node[:6], *d)
               .stdout.splitlines()]
    assert by_node and {e["node_id"] for e in by_node} == {node}
    assert shoal("logs", "--level", "error", *d).stdout.strip() == ""
    text = shoal("logs", *d).stdout
    assert "raylet_started" in text and "INFO" in text


def test_logs_filter_by_task_and_stdin():
    lines = [json.dumps({"ts": f"2026-01-01T00:00:0{i}Z", "level": "info", "daemon": "raylet",
                         "node_id": "ab", "pid": 1, "event": "e", "task_id": t})
             for i, t in enumerate(["aa11", "bb22", "aa33"])]
    res = shoal("logs", "--config", "none", "--task", "aa", "--json", "-",
                input="\n".join(lines + ["not json"]) + "\n")
    assert [json.loads(x)["task_id"] for x in res.stdout.splitlines()] == ["aa11", "aa33"]


def test_logs_follow_sees_new_lines(cluster):
    proc = subprocess.Popen([sys.executable, "-m", "libclient.cli", "logs", "-f", "--json",
                             "--daemon", "raylet", *cluster["dir"]], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        res = run_driver(cluster["raylet"], cluster["base"])  # makes raylet log lines
        assert res.returncode == 0
        seen = []
        wait_for(lambda: seen.append(json.loads(proc.stdout.readline())) or
                 sum(e["event"] == "client_closed" for e in seen) >= 2, timeout=60)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def test_start_twice_is_refused(cluster):
    res = shoal("start", "--head", *cluster["dir"], *_NODE)
    assert res.returncode == 1 and "already runs here" in res.stderr


def test_foreground_start_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "libclient.cli", "start", "--head",
                             "--foreground", "--dir", str(tmp_path), *_NODE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        if "is serving" not in line:
            proc.wait(30)
            raise AssertionError(f"status {proc.returncode}: {proc.stderr.read()[-3000:]}")
        pids = _pids(tmp_path / "run")
        assert len(pids) == 3
        assert shoal("health", "--dir", str(tmp_path)).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(psutil.pid_exists(p) for p in pids)
        assert not list((tmp_path / "run").iterdir())
        check_log_text(proc.stderr.read())  # foreground: the daemons' JSON on stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_usage_and_config_errors_exit_2(tmp_path):
    res = shoal("start", "--dir", str(tmp_path))
    assert res.returncode == 2 and "--head" in res.stderr
    res = shoal("status", "--config", "none", "--set", "stored.memory=lots")
    assert res.returncode == 2 and "[stored] memory must be a byte count" in res.stderr
    res = shoal("config", "--config", "none", "--json", "--set", "raylet.num_cpus=3")
    assert res.returncode == 0 and json.loads(res.stdout)["raylet"]["num_cpus"] == 3
    assert os.path.exists(ROOT / "libclient" / "cli" / "__main__.py")
