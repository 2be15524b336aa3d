"""ray.timeline(): a Chrome trace of the job's tasks, from real task events."""

import json
import os
import sys
import time

import cloudpickle

from libclient.util.timeline import chrome_trace

# Workers cannot import this test module: ship its helpers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_trace_rows_per_node_and_worker_with_lanes_for_overlaps():
    n1, n2 = b"a" * 16, b"b" * 16
    rows = {
        b"1" * 16: {"name": "f", "node_id": n1, "worker_pid": 10,
                    "times": {"PENDING_NODE_ASSIGNMENT": 1.0}, "exec": [1.5, 0.0, 1.0]},
        b"2" * 16: {"name": "g", "node_id": n1, "worker_pid": 10,  # overlaps f: lane 2
                    "times": {"PENDING_NODE_ASSIGNMENT": 1.0}, "exec": [2.0, 0.2, 1.0]},
        b"3" * 16: {"name": "h", "node_id": n2, "worker_pid": 20,
                    "times": {"SUBMITTED_TO_WORKER": 5.0}, "exec": [5.1, 0.0, 0.1]},
    }
    events = chrome_trace(rows, {n1: "host-a"})
    procs = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(procs.values()) == ["Node 626262626262", "Node host-a"]
    threads = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert threads == {1000: "worker 10", 1001: "worker 10 (2)", 2000: "worker 20"}
    slices = [e for e in events if e["ph"] == "X"]
    by = {(e["args"]["name"], e["cat"]): e for e in slices}
    assert by[("f", "task::execute")]["tid"] == 1000
    assert by[("g", "task::execute")]["tid"] == 1001
    assert abs(by[("g", "task::fetch_args")]["dur"] - 0.2e6) < 1e-3
    assert by[("f", "task::scheduling")]["ts"] == 1.0e6
    assert by[("f", "task::scheduling")]["dur"] == 0.5e6
    assert ("h", "task::fetch_args") not in by  # no arguments by reference


def work(x):
    time.sleep(0.05)
    return os.getpid()


class Actor:
    def call(self):
        return os.getpid()


def test_timeline_of_this_job(ray, tmp_path):
    work_task = ray.remote(work)
    actor_class = ray.remote(Actor)
    big = ray.put(b"z" * (1 << 20))
    pids = set(ray.get([work_task.remote(big) for _ in range(6)]))
    a = actor_class.remote()
    apid = ray.get(a.call.remote())
    time.sleep(0.5)  # the workers' owners are here; their rows flush at once
    events = ray.timeline()
    slices = [e for e in events if e["ph"] == "X"]
    execs = [e for e in slices if e["cat"] == "task::execute" and e["args"]["name"] == "work"]
    assert len(execs) == 6
    fetches = [e for e in slices if e["cat"] == "task::fetch_args"]
    assert len(fetches) >= 6  # the 1 MiB argument came from the store
    threads = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {f"worker {p}" for p in pids | {apid}} <= threads
    # One row per worker: slices on a row never overlap.
    by_row: dict = {}
    for e in slices:
        by_row.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_row.values():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert start >= end - 1, spans
    assert any(e["args"]["name"] == "Actor.call" for e in slices)
    path = tmp_path / "trace.json"
    assert ray.timeline(str(path)) is None
    assert json.loads(path.read_text()) and all("ph" in e for e in json.loads(path.read_text()))
