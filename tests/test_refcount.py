"""Reference counting across hosts, on a real two-node ``cluster_utils`` cluster.

A borrower on another node keeps an object alive after its owner dropped
every handle; when the last borrower lets go (or dies), the owner frees its
copy and the copy its task left on the other node. Each check looks at the
stores themselves (``contains``), not at the API's answers alone.
"""

import sys
import time

import cloudpickle
import numpy as np
import pytest

from libclient.cluster_utils import Cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MB = 1 << 20


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "node_timeout_s": 2.0,
                                "object_store_memory": 64 * MB})
    try:
        c.add_node(num_cpus=2, resources={"far": 4}, object_store_memory=64 * MB)
        c.wait_for_nodes()
        c.connect(namespace="refcount")
        yield c
    finally:
        c.shutdown()


def _core():
    import libclient.api as api

    return api._core


def _here(oid: bytes) -> bool:
    """Is ``oid`` sealed in the driver's (the head node's) store?"""
    return _core()._store.contains([oid])[0]


def _wait(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _fill_store(n=12):
    """Put (and drop) enough to evict every object nobody holds on the head."""
    import libclient as ray

    for _ in range(n):
        ray.put(np.ones(8 * MB, dtype=np.uint8))


class Holder:
    def __init__(self):
        self.kept = None

    def keep(self, refs):
        self.kept = refs[0]  # borrows it beyond the call
        return True

    def total(self):
        import libclient as ray

        return int(ray.get(self.kept).sum())

    def drop(self):
        self.kept = None
        return True


def _holder():
    import libclient as ray

    return ray.remote(resources={"far": 1})(Holder).remote()


def test_a_borrower_on_another_node_keeps_an_object_alive_until_it_lets_go(cluster):
    import libclient as ray

    holder = _holder()
    ref = ray.put(np.full(2 * MB, 3, dtype=np.uint8))
    oid = ref.binary()
    assert ray.get(holder.keep.remote([ref]), timeout=30)
    del ref  # the owner's last handle
    _fill_store()  # would evict it if only the store's cache held it
    assert _here(oid)
    assert ray.get(holder.total.remote(), timeout=30) == 6 * MB
    assert ray.get(holder.drop.remote(), timeout=30)
    _wait(lambda: not _here(oid), what="the owner to free it after the borrower let go")
    ray.kill(holder)


def test_a_dead_borrower_no_longer_holds_the_object(cluster):
    import libclient as ray

    holder = _holder()
    ref = ray.put(np.full(MB, 1, dtype=np.uint8))
    oid = ref.binary()
    assert ray.get(holder.keep.remote([ref]), timeout=30)
    del ref
    time.sleep(0.5)
    assert _here(oid)
    ray.kill(holder)  # dies holding it: the owner's probe finds it gone
    _wait(lambda: not _here(oid), timeout=20, what="the owner to forget a dead borrower")


def make_inner(n):
    import libclient as ray

    inner = ray.put(np.full(n, 7, dtype=np.uint8))
    return [inner]  # a ref this worker owns, nested in the return value


def test_a_ref_returned_from_another_node_outlives_the_task_that_owns_it(cluster):
    import libclient as ray

    f = ray.remote(resources={"far": 1})(make_inner)
    (inner,) = ray.get(f.remote(2 * MB), timeout=30)
    assert inner.owner_addr != _core().store_address  # owned by the worker there
    time.sleep(0.5)  # the worker's own handle is long gone
    filler = ray.remote(resources={"far": 1})(_fill_store)
    ray.get(filler.remote(), timeout=60)  # evict whatever nobody holds over there
    assert int(ray.get(inner, timeout=30).sum()) == 14 * MB


def make_big(n):
    return np.full(n, 5, dtype=np.uint8)


def test_a_remote_tasks_big_return_is_freed_on_its_node_when_dropped(cluster):
    import libclient as ray

    ref = ray.remote(resources={"far": 1})(make_big).remote(4 * MB)
    oid = ref.binary()

    def there(o):
        import libclient.api as api

        return api._core._store.contains([o])[0]

    probe = ray.remote(resources={"far": 1})(there)
    _wait(lambda: ray.get(probe.remote(oid), timeout=30), what="the return on its node")
    del ref  # never fetched here: its only copy is on the other node
    _wait(lambda: not ray.get(probe.remote(oid), timeout=30),
          what="the copy on the other node to be freed")


def total(a):
    return int(a.sum())


def test_copies_pulled_by_tasks_on_other_nodes_are_freed_with_the_object(cluster):
    import libclient as ray

    ref = ray.put(np.full(4 * MB, 2, dtype=np.uint8))
    oid = ref.binary()
    assert ray.get(ray.remote(resources={"far": 1})(total).remote(ref), timeout=30) == 8 * MB

    def there(o):
        import libclient.api as api

        return api._core._store.contains([o])[0]

    probe = ray.remote(resources={"far": 1})(there)
    assert ray.get(probe.remote(oid), timeout=30)  # pulled there for the task
    del ref
    _wait(lambda: not _here(oid), what="the owner's copy to be freed")
    _wait(lambda: not ray.get(probe.remote(oid), timeout=30),
          what="the copy pulled to the other node to be freed")


def test_wait_fetch_local_brings_remote_objects_to_this_node(cluster):
    import libclient as ray

    big = ray.remote(resources={"far": 1})(make_big)
    ref = big.remote(3 * MB)
    ready, rest = ray.wait([ref], timeout=30)  # fetch_local=True by default
    assert ready == [ref] and rest == []
    assert _here(ref.binary())  # ready means here, as in Ray
    # A borrowed ref owned on the other node: pulled from its owner's node.
    (inner,) = ray.get(ray.remote(resources={"far": 1})(make_inner).remote(MB), timeout=30)
    ready, _ = ray.wait([inner], timeout=30)
    assert ready == [inner] and _here(inner.binary())
    # Several at once: pulled side by side, every value right.
    refs = [big.remote(MB + i) for i in range(4)]
    assert [int(a.sum()) for a in ray.get(refs, timeout=60)] == [5 * (MB + i) for i in range(4)]
    ready, _ = ray.wait(refs, num_returns=4, timeout=30, fetch_local=False)
    assert len(ready) == 4


def slow_big(n):
    time.sleep(60)
    return np.zeros(n, dtype=np.uint8)


class Maker:
    def start(self):
        import libclient as ray

        self.ref = ray.remote(num_cpus=0)(slow_big).remote(MB)  # owned by this actor
        return [self.ref]


def test_a_borrower_sees_owner_died_within_seconds(cluster):
    import libclient as ray
    from libclient.exceptions import OwnerDiedError

    maker = ray.remote(resources={"far": 1})(Maker).remote()
    (ref,) = ray.get(maker.start.remote(), timeout=30)
    ray.kill(maker)  # the owner dies before its object exists
    start = time.monotonic()
    with pytest.raises(OwnerDiedError):
        ray.get(ref, timeout=30)
    assert time.monotonic() - start < 10
