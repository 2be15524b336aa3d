"""Real multi-node clusters on one machine, through ``libclient.cluster_utils``.

Every node has its own launcher, stored, raylet, runtime directory and
ports; they share only the head's gcsd, reached over TCP.
"""

import os
import sys
import time

import cloudpickle
import psutil
import pytest

from libclient.cluster_utils import Cluster

# Workers cannot import this test module: ship its helpers by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_timeout_s": 2.0})
    try:
        c.add_node(num_cpus=2, resources={"accel": 1})
        c.wait_for_nodes()
        c.connect(namespace="multinode")
        yield c
    finally:
        c.shutdown()


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_nodes_register_with_their_own_addresses_and_resources(cluster):
    import libclient as ray

    nodes = {n["NodeID"]: n for n in ray.nodes()}
    mine = {n.node_id for n in cluster.list_all_nodes()}
    assert mine <= set(nodes)
    assert all(nodes[i]["Alive"] for i in mine)
    raylets = {nodes[i]["RayletAddress"] for i in mine}
    assert len(raylets) == len(mine) and all(a.startswith("127.0.0.1:") for a in raylets)
    sockets = {nodes[i]["RayletSocketName"] for i in mine}
    assert len(sockets) == len(mine)  # each node its own runtime directory
    total = ray.cluster_resources()
    assert total["CPU"] == 3 and total["accel"] == 1
    # The driver connected by gcsd address lands on the head node.
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id


def test_nodes_share_no_runtime_directory(cluster):
    """No process of one node holds a file or socket under another node's directory."""
    nodes = cluster.list_all_nodes()
    for node in nodes:
        others = [n.session_dir for n in nodes if n is not node]
        for proc in node.all_processes():
            try:
                paths = [f.path for f in proc.open_files()]
                paths += [c.laddr for c in proc.net_connections(kind="unix") if c.laddr]
                paths += [c.raddr for c in proc.net_connections(kind="unix") if c.raddr]
            except psutil.NoSuchProcess:
                continue
            for path in paths:
                assert not any(str(path).startswith(d) for d in others), (proc, path)


def test_graceful_removal_is_seen_at_once_and_sigkill_within_the_timeout(cluster):
    import libclient as ray

    extra = cluster.add_node(num_cpus=1, resources={"spare": 2})
    _wait(lambda: ray.cluster_resources().get("spare") == 2, what="node to join")
    t0 = time.monotonic()
    cluster.remove_node(extra, allow_graceful=True)
    _wait(lambda: "spare" not in ray.cluster_resources(), timeout=5, what="unregister")
    assert time.monotonic() - t0 < 5

    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    _wait(lambda: ray.cluster_resources().get("doomed") == 1, what="node to join")
    pids = [p.pid for p in doomed.all_processes()]
    assert len(pids) >= 3  # launcher, stored, raylet (+ workers)
    t0 = time.monotonic()
    cluster.remove_node(doomed, allow_graceful=False)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    row = _wait(lambda: next((n for n in ray.nodes() if n["NodeID"] == doomed.node_id
                              and not n["Alive"]), None), timeout=10, what="node death")
    # node_timeout_s=2 on this cluster; the gcsd tick is at most 0.5 s.
    assert time.monotonic() - t0 < 6
    assert "heartbeat" in row["DeathReason"]
    assert "doomed" not in ray.cluster_resources()


def test_a_node_added_from_a_thread_outlives_the_thread(cluster):
    # Found by the chaos suite: PR_SET_PDEATHSIG fires when the *thread*
    # that forked the node's launcher ends, so nodes a helper thread added
    # all left together when it finished.
    import threading

    import libclient as ray

    added = []
    t = threading.Thread(target=lambda: added.append(cluster.add_node(
        num_cpus=1, resources={"threaded": 1})))
    t.start()
    t.join(60)
    node = added[0]
    try:
        _wait(lambda: ray.cluster_resources().get("threaded") == 1, what="node to join")
        time.sleep(1.5)
        assert all(p.is_running() for p in node.all_processes())
        assert ray.cluster_resources().get("threaded") == 1
    finally:
        cluster.remove_node(node)


def test_init_by_gcs_address_without_a_local_raylet_says_why(tmp_path):
    from libclient.api import _local_raylet

    # A gcsd address with nobody behind it: a clear error, not a hang.
    with pytest.raises(Exception) as info:
        _local_raylet("127.0.0.1:1")
    assert "127.0.0.1:1" in str(info.value) or "gcsd" in str(info.value).lower()


def test_remote_raylet_port_survives_garbage_and_strangers(cluster):
    import socket

    import libclient as ray

    node = next(n for n in ray.nodes() if n["NodeID"] == cluster.head_node.node_id)
    host, port = node["RayletAddress"].rsplit(":", 1)
    for payload in (b"\x00" * 3, b"\xff\xff\xff\x7f" + b"x" * 100, b"\x05\x00\x00\x00hello",
                    os.urandom(4096)):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # with cluster keys, TLS refuses the garbage and may close first
            s.settimeout(5)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    silent = socket.create_connection((host, int(port)), timeout=5)
    silent.close()
    # The raylet still schedules.
    @ray.remote
    def one():
        return 1

    assert ray.get(one.remote(), timeout=30) == 1


# ---------------------------------------------------------------- scheduling
def _node_of():
    import libclient as ray

    return ray.get_runtime_context().get_node_id()


def test_spillback_spreads_work_the_local_node_cannot_hold(cluster):
    import libclient as ray

    @ray.remote(num_cpus=1)
    def hold(t):
        time.sleep(t)
        return _node_of()

    t0 = time.monotonic()
    nodes = ray.get([hold.remote(0.5) for _ in range(6)], timeout=60)
    assert len(set(nodes)) >= 2  # the 1-CPU head spilled to the 2-CPU node
    assert time.monotonic() - t0 < 6 * 0.5


def test_placement_by_resources_affinity_and_spread(cluster):
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    worker = next(iter(cluster.worker_nodes)).node_id
    head = cluster.head_node.node_id

    @ray.remote(num_cpus=0)
    def where():
        return _node_of()

    assert ray.get(where.options(resources={"accel": 1}).remote(), timeout=60) == worker
    pinned = [where.options(scheduling_strategy=Affinity(worker)).remote() for _ in range(5)]
    assert set(ray.get(pinned, timeout=60)) == {worker}
    pinned = [where.options(scheduling_strategy=Affinity(head)).remote() for _ in range(5)]
    assert set(ray.get(pinned, timeout=60)) == {head}
    # A node that does not exist: hard fails at once, soft runs anywhere.
    with pytest.raises(Exception, match="unschedulable|dead|unknown"):
        ray.get(where.options(scheduling_strategy=Affinity("ab" * 16)).remote(), timeout=30)
    soft = where.options(scheduling_strategy=Affinity("ab" * 16, soft=True)).remote()
    assert ray.get(soft, timeout=60) in {head, worker}

    @ray.remote(num_cpus=1)
    def busy():
        time.sleep(0.3)
        return _node_of()

    spread = ray.get([busy.options(scheduling_strategy="SPREAD").remote() for _ in range(3)],
                     timeout=60)
    assert len(set(spread)) == 2


def test_nested_tasks_across_nodes(cluster):
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    worker = next(iter(cluster.worker_nodes)).node_id
    head = cluster.head_node.node_id

    @ray.remote(num_cpus=0)
    def inner(x):
        return x + 1, _node_of()

    @ray.remote(num_cpus=0)
    def outer(x):
        value, ran_on = ray.get(inner.options(scheduling_strategy=Affinity(head)).remote(x))
        return value, ran_on, _node_of()

    value, inner_node, outer_node = ray.get(
        outer.options(scheduling_strategy=Affinity(worker)).remote(41), timeout=60)
    assert (value, inner_node, outer_node) == (42, head, worker)


# ---------------------------------------------------------------- objects
def test_large_objects_in_both_directions(cluster):
    import numpy as np

    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    worker = next(iter(cluster.worker_nodes)).node_id
    there = Affinity(worker)

    @ray.remote(num_cpus=0)
    def make(n, seed):
        return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)

    @ray.remote(num_cpus=0)
    def digest(a):
        return int(a.astype(np.uint64).sum()), a.nbytes, _node_of()

    n = 30_000_000
    local = np.random.default_rng(1).integers(0, 255, n, dtype=np.uint8)
    ref = ray.put(local)  # driver -> worker node
    assert ray.get(digest.options(scheduling_strategy=there).remote(ref), timeout=60) == (
        int(local.astype(np.uint64).sum()), n, worker)
    made = make.options(scheduling_strategy=there).remote(n, 2)  # worker node -> driver
    got = ray.get(made, timeout=60)
    assert np.array_equal(got, np.random.default_rng(2).integers(0, 255, n, dtype=np.uint8))
    # A ref made on the worker node, consumed on the head without a driver get.
    head = cluster.head_node.node_id
    made = make.options(scheduling_strategy=there).remote(n, 3)
    total, size, ran_on = ray.get(
        digest.options(scheduling_strategy=Affinity(head)).remote(made), timeout=60)
    expected = np.random.default_rng(3).integers(0, 255, n, dtype=np.uint8)
    assert (total, size, ran_on) == (int(expected.astype(np.uint64).sum()), n, head)


# ---------------------------------------------------------------- membership + failure
def test_infeasible_work_waits_until_a_node_that_fits_joins(cluster):
    import libclient as ray

    @ray.remote(num_cpus=0, resources={"later": 1})
    def late():
        return _node_of()

    ref = late.remote()
    ready, _ = ray.wait([ref], timeout=1.0)
    assert ready == []
    node = cluster.add_node(num_cpus=1, resources={"later": 1})
    try:
        assert ray.get(ref, timeout=60) == node.node_id
    finally:
        cluster.remove_node(node)


def test_a_node_dies_and_its_tasks_retry_elsewhere(cluster, tmp_path):
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    doomed = cluster.add_node(num_cpus=1)
    marker = tmp_path / "started"

    @ray.remote(num_cpus=1, max_retries=2)
    def slow(path):
        me = _node_of()
        with open(path, "a") as f:
            f.write(me + "\n")
        time.sleep(2.0)
        return me

    ref = slow.options(scheduling_strategy=Affinity(doomed.node_id, soft=True)).remote(
        str(marker))
    _wait(lambda: marker.exists() and doomed.node_id in marker.read_text(), timeout=30,
          what="the task to start on the doomed node")
    cluster.remove_node(doomed, allow_graceful=False)
    survivor = ray.get(ref, timeout=60)
    assert survivor != doomed.node_id
    assert survivor in {n.node_id for n in cluster.list_all_nodes()}


# ---------------------------------------------------------------- actors
def test_actors_on_another_node_called_from_every_node(cluster):
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    worker = next(iter(cluster.worker_nodes)).node_id
    head = cluster.head_node.node_id

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1
            return self.n, _node_of()

    c = Counter.options(scheduling_strategy=Affinity(worker)).remote()
    assert ray.get([c.inc.remote() for _ in range(50)], timeout=60)[-1] == (50, worker)
    by_resource = Counter.options(resources={"accel": 1}).remote()
    assert ray.get(by_resource.inc.remote(), timeout=60) == (1, worker)

    @ray.remote(num_cpus=0)
    def call(h, k):
        return [ray.get(h.inc.remote())[0] for _ in range(k)]

    # Callers on both nodes; each caller's calls stay in order.
    from_head = call.options(scheduling_strategy=Affinity(head)).remote(c, 20)
    from_worker = call.options(scheduling_strategy=Affinity(worker)).remote(c, 20)
    for seq in ray.get([from_head, from_worker], timeout=60):
        assert seq == sorted(seq) and len(seq) == 20
    assert ray.get(c.inc.remote(), timeout=30)[0] == 91
    named = Counter.options(name="remote-named", scheduling_strategy=Affinity(worker)).remote()
    assert ray.get(ray.get_actor("remote-named").inc.remote(), timeout=30) == (1, worker)
    ray.kill(c)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(c.inc.remote(), timeout=30)
    ray.kill(named)
    ray.kill(by_resource)


def test_actor_on_a_dead_node_fails_instead_of_hanging(cluster):
    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    doomed = cluster.add_node(num_cpus=1)

    @ray.remote(num_cpus=0)
    class Pinger:
        def ping(self):
            return _node_of()

    p = Pinger.options(scheduling_strategy=Affinity(doomed.node_id)).remote()
    assert ray.get(p.ping.remote(), timeout=60) == doomed.node_id
    cluster.remove_node(doomed, allow_graceful=False)
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError, match="node"):
        ray.get(p.ping.remote(), timeout=30)
    assert time.monotonic() - t0 < 15  # node timeout 2 s here


def test_refs_nested_in_values_are_read_on_other_nodes(cluster):
    import numpy as np

    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    worker = next(iter(cluster.worker_nodes)).node_id
    head = cluster.head_node.node_id

    @ray.remote(num_cpus=0)
    def make(n):
        return np.full(n, 7, dtype=np.uint8)

    @ray.remote(num_cpus=0)
    def total(refs):
        return sum(int(a.sum()) for a in ray.get(refs)), _node_of()

    put_ref = ray.put(np.full(2_000_000, 3, dtype=np.uint8))  # owned by the driver
    made = make.options(scheduling_strategy=Affinity(worker)).remote(1_000_000)  # lives there
    out = ray.get(total.options(scheduling_strategy=Affinity(worker)).remote([put_ref, made]),
                  timeout=60)
    assert out == (6_000_000 + 7_000_000, worker)
    out = ray.get(total.options(scheduling_strategy=Affinity(head)).remote([put_ref, made]),
                  timeout=60)
    assert out == (6_000_000 + 7_000_000, head)


def test_a_task_goes_to_the_node_holding_its_big_argument(cluster):
    import numpy as np

    import libclient as ray
    from libclient.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

    worker = next(iter(cluster.worker_nodes)).node_id

    @ray.remote(num_cpus=0)
    def make(n):
        return np.ones(n, dtype=np.uint8)

    @ray.remote(num_cpus=1)
    def use(a):
        return a.nbytes, _node_of()

    big = make.options(scheduling_strategy=Affinity(worker)).remote(20_000_000)
    ray.wait([big])
    # The head (1 CPU, idle) would take it by default; 20 MB on the worker node wins.
    for _ in range(3):
        assert ray.get(use.remote(big), timeout=60) == (20_000_000, worker)


def test_shutdown_removes_the_runtime_dirs_of_killed_nodes():
    """A node SIGKILLed whole (its launcher too) cannot clean up after itself:
    the cluster that started it removes its sockets and logs at shutdown."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        node = c.add_node(num_cpus=1)
        dirs = [c.head_node.session_dir, node.session_dir]
        c.remove_node(node, allow_graceful=False)
        assert os.path.exists(node.session_dir)  # left behind by the kill
    finally:
        c.shutdown()
    assert [d for d in dirs if os.path.exists(d)] == []
