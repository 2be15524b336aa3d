"""ray.util.ActorPool, ray.util.queue.Queue and get_node_ip_address on real daemons."""

import asyncio
import sys
import time

import cloudpickle
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_names_resolve_like_rays(ray):
    import libclient.util
    from libclient.util import ActorPool, get_node_ip_address
    from libclient.util.queue import Empty, Full, Queue

    assert ray.util.ActorPool is ActorPool
    assert ray.util.queue.Queue is Queue and ray.util.queue.Empty is Empty
    assert ray.util.get_node_ip_address is get_node_ip_address
    import queue as stdlib_queue

    assert issubclass(Empty, stdlib_queue.Empty) and issubclass(Full, stdlib_queue.Full)
    assert libclient.util.get_node_ip_address() == "127.0.0.1"


def _make_actor(ray):
    @ray.remote
    class Sleeper:
        def work(self, x):
            delay, value = x
            time.sleep(delay)
            return value

    return Sleeper


def test_actor_pool_map_is_ordered_and_map_unordered_by_completion(ray):
    from libclient.util import ActorPool

    Sleeper = _make_actor(ray)
    pool = ActorPool([Sleeper.remote(), Sleeper.remote()])
    work = [(0.3, "slow"), (0.0, "fast"), (0.0, "fast2")]
    assert list(pool.map(lambda a, v: a.work.remote(v), work)) == ["slow", "fast", "fast2"]
    out = list(pool.map_unordered(lambda a, v: a.work.remote(v), work))
    assert sorted(out) == ["fast", "fast2", "slow"] and out[0] != "slow"


def test_actor_pool_submit_get_next_and_timeouts(ray):
    from libclient.util import ActorPool

    Sleeper = _make_actor(ray)
    a1, a2 = Sleeper.remote(), Sleeper.remote()
    pool = ActorPool([a1, a2])
    assert not pool.has_next()
    with pytest.raises(StopIteration):
        pool.get_next()
    submit = pool.submit
    submit(lambda a, v: a.work.remote(v), (2.5, 1))
    submit(lambda a, v: a.work.remote(v), (0.0, 2))
    submit(lambda a, v: a.work.remote(v), (0.0, 3))  # waits for a free actor
    assert not pool.has_free() and pool.pop_idle() is None
    with pytest.raises(TimeoutError):
        pool.get_next(timeout=0.05)  # the first is still running: nothing is taken
    # Ignored on timeout: the slow result is dropped and its actor freed.
    with pytest.raises(TimeoutError, match="ignored"):
        pool.get_next(timeout=0.05, ignore_if_timedout=True)
    assert pool.get_next(timeout=10) == 2
    assert pool.get_next_unordered(timeout=10) == 3
    assert not pool.has_next()
    submit(lambda a, v: a.work.remote(v), (1.0, 4))
    with pytest.raises(TimeoutError):
        pool.get_next_unordered(timeout=0.05)
    assert pool.get_next_unordered(timeout=10) == 4
    # Once a later result was taken unordered, the ordered view is gone (Ray's rule).
    submit(lambda a, v: a.work.remote(v), (0.5, 5))
    submit(lambda a, v: a.work.remote(v), (0.0, 6))
    assert pool.get_next_unordered(timeout=10) == 6
    with pytest.raises(ValueError, match="get_next_unordered"):
        pool.get_next()
    assert pool.get_next_unordered(timeout=10) == 5
    with pytest.raises(StopIteration):
        pool.get_next_unordered()


def test_actor_pool_push_and_pop_idle(ray):
    from libclient.util import ActorPool

    Sleeper = _make_actor(ray)
    a1, a2 = Sleeper.remote(), Sleeper.remote()
    pool = ActorPool([a1])
    with pytest.raises(ValueError, match="already belongs"):
        pool.push(a1)
    pool.push(a2)
    popped = pool.pop_idle()
    assert popped in (a1, a2)
    assert pool.has_free()
    pool.submit(lambda a, v: a.work.remote(v), (0.0, "x"))
    assert pool.pop_idle() is None
    pool.push(popped)
    assert pool.get_next() == "x"


def test_queue_put_get_and_nowait(ray):
    from libclient.util.queue import Empty, Full, Queue

    q = Queue(maxsize=2)
    try:
        assert q.empty() and not q.full() and q.size() == 0 and len(q) == 0
        q.put(1)
        q.put_nowait(2)
        assert q.full() and q.qsize() == 2
        with pytest.raises(Full):
            q.put_nowait(3)
        with pytest.raises(Full):
            q.put(3, timeout=0.1)
        assert q.get() == 1 and q.get_nowait() == 2
        with pytest.raises(Empty):
            q.get_nowait()
        t0 = time.monotonic()
        with pytest.raises(Empty):
            q.get(timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 5
        with pytest.raises(ValueError):
            q.get(timeout=-1)
        with pytest.raises(Full, match="Cannot add 3 items"):
            q.put_nowait_batch([1, 2, 3])
        q.put_nowait_batch(["a", "b"])
        with pytest.raises(Empty, match="Cannot get 3 items"):
            q.get_nowait_batch(3)
        assert q.get_nowait_batch(2) == ["a", "b"]
        with pytest.raises(TypeError):
            q.put_nowait_batch(5)
        with pytest.raises(ValueError):
            q.get_nowait_batch(-1)
    finally:
        q.shutdown()
    assert q.actor is None
    q.shutdown()  # again: nothing to do


def test_queue_blocking_get_is_fed_by_a_task_and_async_variants(ray):
    from libclient.util.queue import Empty, Queue

    q = Queue()

    @ray.remote
    def producer(queue, n):
        time.sleep(0.2)
        for i in range(n):
            queue.put(i)
        return n

    @ray.remote
    def consumer(queue):
        return [queue.get(timeout=10) for _ in range(3)]

    got = consumer.remote(q)
    produced = producer.remote(q, 3)
    assert ray.get(got, timeout=30) == [0, 1, 2]
    assert ray.get(produced, timeout=30) == 3

    async def main():
        await q.put_async("x")
        await q.put_async("y", block=False)
        first = await q.get_async()
        second = await q.get_async(block=False)
        with pytest.raises(Empty):
            await q.get_async(timeout=0.1)
        return first, second

    assert asyncio.run(main()) == ("x", "y")
    q.shutdown()


def test_get_node_ip_address_in_a_task(ray):
    @ray.remote
    def where():
        import libclient

        return libclient.util.get_node_ip_address()

    assert ray.get(where.remote(), timeout=30) == "127.0.0.1"
