"""Lineage reconstruction on a real multi-node cluster: lose a node, get the
objects anyway (or the right error, by Ray's names).

Tasks are pinned to worker nodes with a custom resource; killing a node
(``remove_node(allow_graceful=False)``) loses every object it held. The
owner (the driver) rebuilds what it can from the specs it kept.
"""

import sys
import time

import cloudpickle
import numpy as np
import pytest

from libclient.cluster_utils import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1 << 20


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_timeout_s": 3.0,
                                                      "object_store_memory": 128 * MB})
    try:
        c.connect(namespace="reconstruction")
        yield c
    finally:
        c.shutdown()


def _node(c):
    n = c.add_node(num_cpus=1, resources={"w": 1}, object_store_memory=128 * MB)
    c.wait_for_nodes()
    return n


def _kill(c, node):
    c.remove_node(node, allow_graceful=False)


def make(n, fill):
    import libclient as ray

    return ray.get_runtime_context().get_node_id(), np.full(n, fill, dtype=np.uint8)


def add_one(pair):
    import libclient as ray

    _node_id, arr = pair
    return ray.get_runtime_context().get_node_id(), arr + 1


def test_a_lost_return_is_rebuilt_on_a_live_node(cluster):
    import libclient as ray

    first = _node(cluster)
    ref = ray.remote(resources={"w": 1}, max_retries=2)(make).remote(4 * MB, 9)
    ray.wait([ref], fetch_local=False, timeout=30)
    second = _node(cluster)
    _kill(cluster, first)  # the only copy goes with it
    node, arr = ray.get(ref, timeout=60)
    assert node == second.node_id  # made again, on the node still alive
    assert arr.shape == (4 * MB,) and int(arr[0]) == 9 and int(arr[-1]) == 9


def test_a_chain_is_rebuilt_from_its_start(cluster):
    import libclient as ray

    first = _node(cluster)
    a = ray.remote(resources={"w": 1})(make).remote(2 * MB, 1)
    b = ray.remote(resources={"w": 1})(add_one).remote(a)
    ray.wait([b], fetch_local=False, timeout=30)
    del a  # only b's lineage names it now: its value is freed
    time.sleep(0.3)
    _node(cluster)
    _kill(cluster, first)
    _node_id, arr = ray.get(b, timeout=60)  # rebuilds a, then b
    assert int(arr[0]) == 2 and int(arr.sum()) == 2 * 2 * MB


def consume(pair):
    return int(pair[1].sum())


def test_a_task_whose_argument_was_lost_runs_after_the_argument_is_rebuilt(cluster):
    import libclient as ray

    first = _node(cluster)
    a = ray.remote(resources={"w": 1})(make).remote(2 * MB, 3)
    ray.wait([a], fetch_local=False, timeout=30)
    _node(cluster)
    _kill(cluster, first)
    total = ray.get(ray.remote(resources={"w": 1})(consume).remote(a), timeout=60)
    assert total == 3 * 2 * MB


def test_a_task_with_max_retries_0_is_not_rebuilt(cluster):
    import libclient as ray
    from libclient.exceptions import (
        ObjectLostError,
        ObjectReconstructionFailedMaxAttemptsExceededError,
    )

    first = _node(cluster)
    ref = ray.remote(resources={"w": 1}, max_retries=0)(make).remote(MB, 1)
    ray.wait([ref], fetch_local=False, timeout=30)
    _node(cluster)
    _kill(cluster, first)
    with pytest.raises(ObjectLostError) as info:
        ray.get(ref, timeout=30)
    assert not isinstance(info.value, ObjectReconstructionFailedMaxAttemptsExceededError)


class Runs:
    """Counts runs of a task, by name (on the head node)."""

    def __init__(self):
        self.n = {}

    def hit(self, key):
        self.n[key] = self.n.get(key, 0) + 1
        return self.n[key]


def crash_first_time(n, counter):
    import os

    import libclient as ray

    if ray.get(counter.hit.remote("f")) == 1:
        os._exit(1)  # the first run dies: its one retry is spent
    return make(n, 4)


def test_retries_spent_on_crashes_leave_none_for_rebuilding(cluster):
    import libclient as ray
    from libclient.exceptions import ObjectReconstructionFailedMaxAttemptsExceededError

    counter = ray.remote(num_cpus=0)(Runs).remote()
    first = _node(cluster)
    ref = ray.remote(resources={"w": 1}, max_retries=1)(crash_first_time).remote(MB, counter)
    ray.wait([ref], fetch_local=False, timeout=60)
    _node(cluster)
    _kill(cluster, first)
    with pytest.raises(ObjectReconstructionFailedMaxAttemptsExceededError):
        ray.get(ref, timeout=30)
