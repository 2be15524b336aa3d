"""Streaming generators and awaitable refs across two nodes (cluster_utils:
each node its own daemons, nodes talk only over TCP)."""

import asyncio
import os
import sys
import time

import cloudpickle
import numpy as np
import pytest

from libclient.cluster_utils import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        c.add_node(num_cpus=2, resources={"far": 2})
        c.wait_for_nodes()
        c.connect(namespace="generators-multinode")
        yield c
    finally:
        c.shutdown()


def test_streaming_generator_task_on_another_node(cluster, tmp_path):
    import libclient as ray

    here = ray.get_runtime_context().get_node_id()

    @ray.remote(resources={"far": 1})
    def produce(n, gate):
        yield ray.get_runtime_context().get_node_id()
        for i in range(n):
            yield np.full(200_000, i, dtype=np.int64)  # 1.6 MB: stays in that node's store
        deadline = time.monotonic() + 20
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield "after the gate"
        raise ValueError("the end")

    gate = str(tmp_path / "gate")  # the test's own signal, not a node's file
    try:
        g = produce.remote(3, gate)
        where = ray.get(next(g), timeout=30)
        assert where != here  # it ran on the other node
        arrays = [ray.get(next(g), timeout=30) for _ in range(3)]  # pulled here over TCP
        assert [int(a[0]) for a in arrays] == [0, 1, 2] and all(len(a) == 200_000
                                                                 for a in arrays)
        assert not g.is_finished()  # the task still waits for the gate
        open(gate, "w").close()
        assert ray.get(next(g), timeout=30) == "after the gate"
        with pytest.raises(ValueError, match="the end"):
            ray.get(next(g), timeout=30)
        with pytest.raises(StopIteration):
            next(g)
    finally:
        open(gate, "a").close()  # never leave the task waiting


def test_actor_generator_and_await_across_nodes(cluster):
    import libclient as ray

    @ray.remote(resources={"far": 1})
    class FarSource:
        def node(self):
            return ray.get_runtime_context().get_node_id()

        async def stream(self, n):
            for i in range(n):
                await asyncio.sleep(0.01)
                yield np.full(150_000, i, dtype=np.int64)

    a = FarSource.remote()
    assert ray.get(a.node.remote(), timeout=30) != ray.get_runtime_context().get_node_id()

    async def consume():
        out = []
        async for ref in a.stream.remote(3):
            out.append(int((await ref)[0]))  # a value held on the other node
        return out

    assert asyncio.run(consume()) == [0, 1, 2]
    ray.kill(a)
