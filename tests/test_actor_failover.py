"""Actors whose node dies restart on another node (within max_restarts).

Real multi-node clusters (``libclient.cluster_utils``): the doomed node's
processes all get SIGKILL, gcsd declares it dead after ``node_timeout_s``
(2 s here), and a surviving raylet takes its actors over.
"""

import os
import subprocess
import sys
import textwrap
import time

import cloudpickle
import pytest

from libclient.cluster_utils import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_timeout_s": 2.0})
    try:
        c.add_node(num_cpus=1, resources={"third": 1})
        c.wait_for_nodes()
        c.connect(namespace="failover")
        yield c
    finally:
        c.shutdown()


def _node_of():
    import libclient as ray

    return ray.get_runtime_context().get_node_id()


def _row(handle):
    from libclient import api

    return api._require().gcs.table_get("actors", handle._actor_id)


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _on(node, **opts):
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=True),
            **opts}


def _counter_class():
    import libclient as ray

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n, _node_of()

        def slow(self, seconds):
            time.sleep(seconds)
            return _node_of()

    return Counter


def test_actor_restarts_on_another_node_and_answers_everyone(cluster):
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    doomed = cluster.add_node(num_cpus=1)
    third = next(n for n in cluster.worker_nodes if n.node_args.get("resources"))
    c = _counter_class().options(**_on(doomed, max_restarts=1)).remote()
    assert ray.get([c.inc.remote() for _ in range(3)], timeout=60)[-1] == (3, doomed.node_id)
    t0 = time.monotonic()
    cluster.remove_node(doomed, allow_graceful=False)
    row = _wait(lambda: (r := _row(c)) and r["state"] == "ALIVE"
                and r["node_id"].hex() != doomed.node_id and r, 30, "the new incarnation")
    took = time.monotonic() - t0
    assert row["num_restarts"] == 1
    # __init__ ran again on a surviving node: the state starts over.
    n, where = ray.get(c.inc.remote(), timeout=30)
    assert (n, where) == (1, row["node_id"].hex()) and where != doomed.node_id

    @ray.remote(num_cpus=0)
    def call(h):
        return ray.get(h.inc.remote(), timeout=30), _node_of()

    seen, caller = ray.get(call.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        third.node_id)).remote(c), timeout=60)
    assert caller == third.node_id and seen == (2, where)
    assert took < 15, took  # node timeout 2 s + a sweep + __init__
    ray.kill(c)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(c.inc.remote(), timeout=30)
    _wait(lambda: _row(c)["state"] == "DEAD", 10, "the killed actor's row")


def test_calls_in_flight_retry_with_max_task_retries_else_fail(cluster):
    import libclient as ray

    doomed = cluster.add_node(num_cpus=1)
    counter = _counter_class()
    retried = counter.options(**_on(doomed, max_restarts=1, max_task_retries=1)).remote()
    failing = counter.options(**_on(doomed, max_restarts=1)).remote()
    assert ray.get([retried.inc.remote(), failing.inc.remote()], timeout=60) == [
        (1, doomed.node_id)] * 2
    in_flight = [retried.slow.remote(5), failing.slow.remote(5)]
    time.sleep(0.5)  # both calls are running on the doomed node
    cluster.remove_node(doomed, allow_graceful=False)
    queued = retried.inc.remote()  # made while the actor restarts
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(in_flight[1], timeout=30)
    assert time.monotonic() - t0 < 10
    where = ray.get(in_flight[0], timeout=40)
    assert where != doomed.node_id
    assert ray.get(queued, timeout=30) == (1, where)
    # The actor without task retries restarted too; only its call was lost.
    assert ray.get(failing.inc.remote(), timeout=30)[0] == 1
    ray.kill(retried)
    ray.kill(failing)


def test_actor_without_restarts_dies_naming_its_node(cluster):
    import libclient as ray

    doomed = cluster.add_node(num_cpus=1)
    p = _counter_class().options(**_on(doomed)).remote()
    assert ray.get(p.inc.remote(), timeout=60) == (1, doomed.node_id)
    cluster.remove_node(doomed, allow_graceful=False)
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.ActorDiedError, match=doomed.node_id):
        ray.get(p.inc.remote(), timeout=30)
    assert time.monotonic() - t0 < 12  # node timeout 2 s here
    # A surviving raylet also wrote its death, for everyone else.
    row = _wait(lambda: (r := _row(p)) and r["state"] == "DEAD" and r, 10, "the DEAD row")
    assert doomed.node_id in row["death_cause"]


def test_detached_named_actor_survives_its_node(cluster):
    import libclient as ray

    doomed = cluster.add_node(num_cpus=1)
    d = _counter_class().options(**_on(doomed, name="failover-detached", lifetime="detached",
                                       max_restarts=2)).remote()
    assert ray.get(d.inc.remote(), timeout=60) == (1, doomed.node_id)
    cluster.remove_node(doomed, allow_graceful=False)
    _wait(lambda: _row(d)["state"] == "ALIVE" and _row(d)["node_id"].hex() != doomed.node_id,
          30, "the detached actor's new incarnation")
    found = ray.get_actor("failover-detached")
    n, where = ray.get(found.inc.remote(), timeout=30)
    assert n == 1 and where != doomed.node_id
    assert ray.get(d.inc.remote(), timeout=30) == (2, where)
    ray.kill(found)
    _wait(lambda: _row(d)["state"] == "DEAD", 10, "the killed actor's row")
    with pytest.raises(ValueError):
        ray.get_actor("failover-detached")


_CREATOR = textwrap.dedent("""
    import sys, time
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as A
    ray.init(address=sys.argv[1], namespace="failover-owner")

    @ray.remote(num_cpus=0)
    class Pinger:
        def ping(self):
            return ray.get_runtime_context().get_node_id()

    p = Pinger.options(max_restarts=1, max_task_retries=-1,
                       scheduling_strategy=A(sys.argv[2], soft=True)).remote()
    print(ray.get(p.ping.remote(), timeout=60), p._actor_id.hex(), flush=True)
    sys.stdin.readline()  # the node dies meanwhile
    print(ray.get(p.ping.remote(), timeout=60), flush=True)
    sys.stdin.readline()
""")


def test_creator_still_owns_its_actor_after_the_move(cluster, tmp_path):
    """A non-detached actor taken over by another raylet still ends with its creator."""
    doomed = cluster.add_node(num_cpus=1)
    script = tmp_path / "creator.py"
    script.write_text(_CREATOR)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, str(script), cluster.address, doomed.node_id],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        where, actor_hex = proc.stdout.readline().split()
        assert where == doomed.node_id
        cluster.remove_node(doomed, allow_graceful=False)
        proc.stdin.write("\n")
        proc.stdin.flush()
        moved = proc.stdout.readline().strip()
        assert moved and moved != doomed.node_id
        from libclient import api

        gcs = api._require().gcs
        assert gcs.table_get("actors", bytes.fromhex(actor_hex))["state"] == "ALIVE"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
        row = _wait(lambda: (r := gcs.table_get("actors", bytes.fromhex(actor_hex)))
                    and r["state"] == "DEAD" and r, 15, "the actor to end with its creator")
        assert "owner" in row["death_cause"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_node_dies_while_the_actor_is_being_created(cluster):
    """The creator was waiting on the dead node's raylet: it follows the row instead."""
    import libclient as ray

    doomed = cluster.add_node(num_cpus=1)

    @ray.remote(num_cpus=0)
    class Slow:
        def __init__(self, path):
            if _node_of() == open(path).read():
                time.sleep(30)  # on the doomed node: still in __init__ when it dies

        def where(self):
            return _node_of()

    marker = f"/tmp/shoal-failover-{os.getpid()}"
    with open(marker, "w") as f:
        f.write(doomed.node_id)
    try:
        s = Slow.options(**_on(doomed, max_restarts=1)).remote(marker)
        _wait(lambda: (r := _row(s)) and r["node_id"].hex() == doomed.node_id, 30,
              "the actor to be placed on the doomed node")
        time.sleep(0.5)
        cluster.remove_node(doomed, allow_graceful=False)
        assert ray.get(s.where.remote(), timeout=30) != doomed.node_id
        assert _row(s)["num_restarts"] == 1
        ray.kill(s)
    finally:
        os.unlink(marker)


def test_actor_that_fits_nowhere_waits_for_a_node_that_fits(cluster):
    import libclient as ray

    doomed = cluster.add_node(num_cpus=1, resources={"rare": 1})
    c = _counter_class().options(resources={"rare": 1}, max_restarts=1,
                                 max_task_retries=-1).remote()
    assert ray.get(c.inc.remote(), timeout=60) == (1, doomed.node_id)
    cluster.remove_node(doomed, allow_graceful=False)
    # No live node has "rare": the actor is parked, RESTARTING on no node.
    _wait(lambda: (r := _row(c))["state"] == "RESTARTING" and r["node_id"] == b"", 20,
          "the actor to be parked")
    pending = c.inc.remote()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        ray.get(pending, timeout=1)
    fits = cluster.add_node(num_cpus=1, resources={"rare": 2})
    assert ray.get(pending, timeout=30) == (1, fits.node_id)
    assert _row(c)["num_restarts"] == 1
    # A parked actor can be killed too (no raylet manages it while parked).
    other = _counter_class().options(resources={"rare": 1}, max_restarts=1).remote()
    assert ray.get(other.inc.remote(), timeout=30) == (1, fits.node_id)
    cluster.remove_node(fits, allow_graceful=False)
    _wait(lambda: _row(other)["state"] == "RESTARTING" and _row(other)["node_id"] == b"", 20,
          "the second actor to be parked")
    ray.kill(other)
    _wait(lambda: _row(other)["state"] == "DEAD", 10, "the parked actor's death")
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(other.inc.remote(), timeout=10)
    ray.kill(c)
