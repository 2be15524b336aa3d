"""libclient.util.state against a real two-node cluster (cluster_utils), and its
pure parts (row merging, filters, summaries) without one.

The driver is connected to the head; the tasks and actors here run on the
other node, so every answer has crossed TCP: the worker's reply to the
owner, the owner's rows to gcsd, the state API's reads of gcsd.
"""

import os
import sys
import time

import cloudpickle
import pytest

from libclient.cluster_utils import Cluster
from libclient.core import task_events
from libclient.util import state, state_rows

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------- pure parts
def test_owner_row_and_running_row_merge():
    tid = os.urandom(16)
    owner = {"name": "f", "state": "SUBMITTED_TO_WORKER", "job": 1,
             "times": {"PENDING_ARGS_AVAIL": 1.0, "SUBMITTED_TO_WORKER": 2.0}}
    running = {"state": "RUNNING", "name": "f", "job": 1, "worker_pid": 42,
               "worker_id": b"w" * 8, "node_id": b"n" * 16, "start": 3.0}
    merged = task_events.merge_rows([(tid, owner), (tid + b"R", running)])
    assert merged[tid]["state"] == "RUNNING" and merged[tid]["worker_pid"] == 42
    assert merged[tid]["times"]["RUNNING"] == 3.0
    # The owner's terminal state wins over a RUNNING row written earlier.
    done = {**owner, "state": "FINISHED"}
    assert task_events.merge_rows([(tid, done), (tid + b"R", running)])[tid]["state"] == \
        "FINISHED"
    # A RUNNING row alone (the owner's batch not there yet) still lists the task.
    assert task_events.merge_rows([(tid + b"R", running)])[tid]["state"] == "RUNNING"


def test_running_row_only_after_a_while_and_once():
    tid = os.urandom(16)
    info = (tid, {"name": "f", "job": 3}, 100.0, None)
    assert task_events.running_row(info, None, 100.1, 1, b"w", b"n") is None  # too young
    key, row = task_events.running_row(info, None, 101.0, 1, b"w", b"n")
    assert key == tid + b"R" and row["state"] == "RUNNING" and row["job"] == 3
    assert task_events.running_row(info, tid, 102.0, 1, b"w", b"n") is None  # said already
    assert task_events.running_row(None, None, 102.0, 1, b"w", b"n") is None


def test_phases_of_a_finished_row():
    row = {"times": {"PENDING_NODE_ASSIGNMENT": 10.0}, "exec": [10.5, 0.1, 0.6]}
    assert task_events.phases(row) == [("scheduling", 10.0, 10.5),
                                       ("fetch_args", 10.5, 10.6),
                                       ("execute", 10.6, 11.1)]
    assert task_events.phases({"times": {}}) == []


def test_filters_and_limit():
    rows = [state_rows.StateRow({"state": s, "name": n}) for s, n in
            [("ALIVE", "a"), ("DEAD", "b"), ("ALIVE", "c")]]
    cols = ["state", "name"]
    alive = state_rows.apply(rows, state_rows.check_filters([("state", "=", "alive")]), None,
                             cols)
    assert [r.name for r in alive] == ["a", "c"]  # attribute access, case-insensitive state
    assert [r["name"] for r in state_rows.apply(
        rows, state_rows.check_filters([("state", "!=", "ALIVE")]), None, cols)] == ["b"]
    assert len(state_rows.apply(rows, [], 2, cols)) == 2
    with pytest.raises(state_rows.RayStateApiException, match="filterable"):
        state_rows.apply(rows, [("nope", "=", 1)], None, cols)
    with pytest.raises(state_rows.RayStateApiException, match="predicate"):
        state_rows.check_filters([("state", ">", 1)])


def test_summary_counts_by_function_and_state():
    rows = [state_rows.StateRow({"func_or_class_name": n, "type": t, "state": s})
            for n, t, s in [("f", "NORMAL_TASK", "FINISHED"), ("f", "NORMAL_TASK", "FAILED"),
                            ("A.m", "ACTOR_TASK", "FINISHED")]]
    out = state_rows.summarize(rows)["cluster"]
    assert out["summary"]["f"]["state_counts"] == {"FINISHED": 1, "FAILED": 1}
    assert out["total_tasks"] == 3 and out["total_actor_tasks"] == 1


# ------------------------------------------------------------- real cluster
# Module-level, so their task names are plain (as Ray's for top-level functions).
def where_am_i(x):
    return os.getpid()


def raise_value_error():
    raise ValueError("no")


def sleep_long():
    time.sleep(3)
    return 1


class Counter:
    def pid(self):
        return os.getpid()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.add_node(num_cpus=2, resources={"other": 4})
        c.wait_for_nodes()
        c.connect(namespace="state")
        yield c
    finally:
        c.shutdown()


def _other(cluster):
    return [n for n in cluster.list_all_nodes() if not n.head][0]


def _wait(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _pids_of(node):
    return {p.pid for p in node.all_processes()}


def test_list_nodes(cluster):
    nodes = state.list_nodes()
    ids = {n.node_id for n in cluster.list_all_nodes()}
    assert {n["node_id"] for n in nodes} == ids
    head = [n for n in nodes if n["is_head_node"]]
    assert len(head) == 1 and head[0]["node_id"] == cluster.head_node.node_id
    assert all(n["state"] == "ALIVE" and n["node_ip"] == "127.0.0.1" for n in nodes)
    other = _other(cluster)
    assert state.list_nodes(filters=[("node_id", "=", other.node_id)])[0][
        "resources_total"]["other"] == 4
    assert len(state.list_nodes(limit=1)) == 1
    assert state.get_node(other.node_id)["start_time_ms"] > 0  # detail columns
    # From anywhere gcsd is reachable: by address, not through the driver's client.
    assert {n["node_id"] for n in state.list_nodes(address=cluster.address)} == ids


def test_list_tasks_on_another_node(cluster):
    import libclient as ray

    where = ray.remote(resources={"other": 1})(where_am_i)
    boom = ray.remote(resources={"other": 1})(raise_value_error)
    big = ray.put(b"x" * (2 << 20))  # passed by reference: fetched before the run
    pid = ray.get(where.remote(big))
    with pytest.raises(ValueError):
        ray.get(boom.remote())
    other = _other(cluster)
    assert pid in _pids_of(other)
    job = ray.get_runtime_context().get_job_id()

    def rows():
        got = state.list_tasks(filters=[("job_id", "=", job)], detail=True, limit=1000)
        by = {t["name"]: t for t in got}
        done = by.get("where_am_i", {}).get("state") == "FINISHED"
        return by if done and "raise_value_error" in by else None

    by = _wait(rows, what="task rows")
    t = by["where_am_i"]
    assert t["node_id"] == other.node_id and t["worker_pid"] == pid
    assert t["func_or_class_name"] == "where_am_i" and t["type"] == "NORMAL_TASK"
    assert t["job_id"] == job and len(t["task_id"]) == 32
    states = [e["state"] for e in t["events"]]
    assert states[0] == "PENDING_ARGS_AVAIL" and states[-1] == "FINISHED"
    assert "SUBMITTED_TO_WORKER" in states
    phases = [e["event_name"] for e in t["profiling_data"]["events"]]
    assert phases == ["scheduling", "fetch_args", "execute"]
    assert t["creation_time_ms"] <= t["start_time_ms"] <= t["end_time_ms"]
    assert by["raise_value_error"]["state"] == "FAILED"
    failed = state.list_tasks(filters=[("state", "=", "FAILED"), ("job_id", "=", job)])
    assert [x["name"] for x in failed] == ["raise_value_error"]
    rest = state.list_tasks(filters=[("name", "!=", "where_am_i"), ("job_id", "=", job)])
    assert "where_am_i" not in {x["name"] for x in rest}
    assert state.get_task(t["task_id"])["name"] == "where_am_i"
    summary = state.summarize_tasks()["cluster"]["summary"]
    assert summary["where_am_i"]["state_counts"]["FINISHED"] >= 1
    assert summary["raise_value_error"]["state_counts"]["FAILED"] >= 1
    with pytest.raises(state.RayStateApiException):
        state.list_tasks(filters=[("no_such_column", "=", 1)])


def test_a_long_task_shows_running(cluster):
    import libclient as ray

    ref = ray.remote(resources={"other": 1})(sleep_long).remote()
    running = _wait(lambda: [t for t in state.list_tasks(filters=[("state", "=", "RUNNING")])
                             if t["name"] == "sleep_long"], timeout=2.8, what="RUNNING row")
    assert running[0]["node_id"] == _other(cluster).node_id
    assert ray.get(ref) == 1
    _wait(lambda: [t for t in state.list_tasks(filters=[("name", "=", "sleep_long")])
                   if t["state"] == "FINISHED"], what="FINISHED after RUNNING")


def test_list_actors_and_get_actor(cluster):
    import libclient as ray

    c = ray.remote(resources={"other": 1})(Counter).options(name="state_counter").remote()
    pid = ray.get(c.pid.remote())
    rows = _wait(lambda: [a for a in state.list_actors(filters=[("name", "=", "state_counter")])
                          if a["state"] == "ALIVE"], what="ALIVE actor")
    a = rows[0]
    assert a["class_name"] == "Counter" and a["pid"] == pid
    assert a["node_id"] == _other(cluster).node_id
    assert a["job_id"] == ray.get_runtime_context().get_job_id()
    one = state.get_actor(a["actor_id"])
    assert one["actor_id"] == a["actor_id"] and one["num_restarts"] == 0
    assert one["is_detached"] is False
    calls = _wait(lambda: [t for t in state.list_tasks(filters=[("actor_id", "=",
                                                                 a["actor_id"])])
                           if t["type"] == "ACTOR_TASK" and t["state"] == "FINISHED"],
                  what="actor task row")
    assert calls[0]["worker_pid"] == pid and calls[0]["name"] == "Counter.pid"
    ray.kill(c)
    _wait(lambda: state.get_actor(a["actor_id"])["state"] == "DEAD", what="DEAD actor")
    alive = {x["actor_id"] for x in state.list_actors(filters=[("state", "!=", "DEAD")])}
    assert a["actor_id"] not in alive
    assert state.get_actor("00" * 16) is None


def test_list_objects_in_stores(cluster):
    import libclient as ray

    ref = ray.put(b"y" * (3 << 20))
    oid = ref.hex()
    found = _wait(lambda: [o for o in state.list_objects(limit=10_000)
                           if o["object_id"] == oid], what="object row")
    o = found[0]
    assert o["object_size"] >= 3 << 20 and o["pid"] == os.getpid()
    assert o["ip"] == "127.0.0.1"
    del ref


def test_list_placement_groups_and_jobs(cluster):
    import libclient as ray
    from libclient.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"other": 1}], strategy="PACK", name="state_pg")
    assert pg.wait(10)
    rows = _wait(lambda: [g for g in state.list_placement_groups(
        filters=[("name", "=", "state_pg")], detail=True) if g["state"] == "CREATED"],
        what="CREATED placement group")
    assert rows[0]["placement_group_id"] == pg.id.hex()
    assert rows[0]["bundles"][0]["node_id"] == _other(cluster).node_id
    remove_placement_group(pg)
    _wait(lambda: [g for g in state.list_placement_groups(filters=[("name", "=", "state_pg")])
                   if g["state"] == "REMOVED"] or not state.list_placement_groups(
                       filters=[("name", "=", "state_pg")]), what="removed group")
    jobs = state.list_jobs(filters=[("job_id", "=", ray.get_runtime_context().get_job_id())])
    assert jobs and jobs[0]["driver_pid"] == os.getpid() and jobs[0]["status"] == "RUNNING"
