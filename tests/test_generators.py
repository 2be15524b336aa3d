"""Generator tasks and actor methods against real daemons: num_returns=N,
streaming (ObjectRefGenerator) with next / for / async for, errors at the
right item, large items through stored, and a stream from another node."""

import asyncio
import os
import sys
import time

import cloudpickle
import numpy as np
import pytest

from libclient.core.generator_stream import END, ERROR, ITEM, WAIT, GeneratorStream

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------- pure stream
def test_stream_delivers_in_order_then_ends():
    s = GeneratorStream(b"t" * 16, "completion")
    assert s.take() == (WAIT, None) and not s.ready()
    woken = []
    s.add_waiter(lambda: woken.append(1))
    wake = s.on_item(1, "r1")  # out of order: held until 0 comes
    assert len(wake) == 1 and s.take() == (WAIT, None)
    s.on_item(0, "r0")
    assert s.take() == (ITEM, "r0") and s.take() == (ITEM, "r1")
    assert s.take() == (WAIT, None)
    s.on_end(2)
    assert s.ready() and s.take() == (END, None) and s.exhausted()


def test_stream_error_comes_after_the_items_before_it_and_once():
    s = GeneratorStream(b"t" * 16, "completion")
    s.on_item(0, "r0")
    s.on_end(None)
    assert not s.exhausted()
    assert s.take() == (ITEM, "r0")
    assert s.take() == (ERROR, "completion")
    assert s.take() == (END, None) and s.exhausted()


def test_stream_ignores_replays_of_a_retried_task():
    s = GeneratorStream(b"t" * 16, "c")
    s.on_item(0, "a0")
    assert s.take() == (ITEM, "a0")
    assert not s.wants(0)  # the retry yields item 0 again: already delivered
    assert s.wants(1) and not s.wants(-1) and not s.wants("x")
    s.on_item(1, "b1")
    s.on_end(2)
    assert not s.wants(2)
    assert s.take() == (ITEM, "b1") and s.take() == (END, None)


def test_stream_end_with_a_missing_item_ends_rather_than_hangs():
    s = GeneratorStream(b"t" * 16, "c")
    s.on_end(3)
    assert s.take() == (END, None)


# ------------------------------------------------------------- real daemons
def test_num_returns_3_generator_task_from_the_issue(ray):
    # Ray's documentation program, unmodified.
    @ray.remote(num_returns=3)
    def return_multiple_as_generator():
        for i in range(3):  # noqa: UP028
            yield i

    # NOTE: Similar to normal functions, these objects will not be available
    # until the full task is complete and all returns have been generated.
    a, b, c = return_multiple_as_generator.remote()
    assert ray.get([a, b, c]) == [0, 1, 2]


def test_num_returns_n_generator_with_wrong_count_fails_clearly(ray):
    @ray.remote(num_returns=2)
    def three():
        yield from range(3)

    with pytest.raises(ValueError, match="num_returns=2"):
        ray.get(three.remote()[0])


def test_generator_function_streams_by_default(ray):
    @ray.remote
    def gen(n):
        for i in range(n):
            yield i * i

    g = gen.remote(5)
    assert isinstance(g, ray.ObjectRefGenerator)
    assert [ray.get(ref) for ref in g] == [0, 1, 4, 9, 16]
    assert g.is_finished()
    assert ray.get(g.completed()) == 5
    with pytest.raises(StopIteration):
        next(g)


def test_streaming_items_arrive_while_the_task_runs(ray, tmp_path):
    gate = str(tmp_path / "gate")

    @ray.remote(num_returns="streaming")
    def slow(gate):
        yield "first"
        deadline = time.monotonic() + 20
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield "second"

    g = slow.remote(gate)
    first = next(g)  # before the task could finish: it waits for the gate
    assert ray.get(first, timeout=10) == "first"
    assert not g.is_finished()
    with pytest.raises(ray.exceptions.GetTimeoutError):
        g._next_sync(timeout_s=0.2)
    open(gate, "w").close()
    assert ray.get(next(g), timeout=20) == "second"
    with pytest.raises(StopIteration):
        next(g)


def test_streaming_error_at_the_right_item(ray):
    class Boom(Exception):
        pass

    @ray.remote(max_retries=0)
    def fails_at_2():
        yield 0
        yield 1
        raise Boom("at item 2")

    g = fails_at_2.remote()
    assert ray.get(next(g)) == 0
    assert ray.get(next(g)) == 1
    err_ref = next(g)
    with pytest.raises(Boom, match="at item 2") as info:
        ray.get(err_ref)
    assert isinstance(info.value, ray.exceptions.RayTaskError)
    with pytest.raises(StopIteration):
        next(g)
    assert g.is_finished()


def test_streaming_large_items_and_refs_inside_items(ray):
    @ray.remote
    def big(n):
        for i in range(n):
            yield np.full(300_000, i, dtype=np.int64)  # 2.4 MB: through stored
        yield {"inner": ray.put("nested value")}

    values = [ray.get(r) for r in big.remote(3)]
    assert [int(v[0]) for v in values[:3]] == [0, 1, 2]
    assert all(v.shape == (300_000,) for v in values[:3])
    assert ray.get(values[3]["inner"]) == "nested value"


def test_streaming_returns_a_non_generator_fails_clearly(ray):
    @ray.remote(num_returns="streaming")
    def not_gen():
        return 5

    g = not_gen.remote()
    with pytest.raises(TypeError, match="not a generator"):
        ray.get(next(g))


def test_async_for_over_a_streaming_task_in_an_asyncio_driver(ray):
    @ray.remote
    def gen(n):
        yield from range(n)

    async def main():
        out = []
        async for ref in gen.remote(4):
            out.append(await ref)
        return out

    assert asyncio.run(main()) == [0, 1, 2, 3]


def test_dropping_a_generator_midway_is_harmless(ray):
    @ray.remote
    def gen(n):
        yield from range(n)

    g = gen.remote(50)
    assert ray.get(next(g)) == 0
    del g
    assert ray.get([ray.put(1)]) == [1]  # the driver goes on


def test_generator_methods_on_actors_both_forms(ray):
    @ray.remote
    class Source:
        def __init__(self):
            self.base = 100

        def stream(self, n):
            for i in range(n):
                yield self.base + i

        @ray.method(num_returns=2)
        def pair(self):
            yield "a"
            yield "b"

        def fails(self):
            yield 1
            raise KeyError("k")

    s = Source.remote()
    assert [ray.get(r) for r in s.stream.remote(3)] == [100, 101, 102]
    assert ray.get(s.pair.remote()) == ["a", "b"]
    g = s.fails.remote()
    assert ray.get(next(g)) == 1
    with pytest.raises(KeyError):
        ray.get(next(g))
    # .options(num_returns=...) on a call
    assert ray.get(s.stream.options(num_returns=2).remote(2)) == [100, 101]


def test_async_generator_methods_on_async_actors(ray):
    @ray.remote
    class AsyncSource:
        async def stream(self, n):
            for i in range(n):
                await asyncio.sleep(0.01)
                yield i

        async def other(self):
            return "still serving"

    a = AsyncSource.remote()
    g = a.stream.remote(5)
    assert ray.get(a.other.remote()) == "still serving"
    assert [ray.get(r) for r in g] == [0, 1, 2, 3, 4]

    async def consume():
        return [await r async for r in a.stream.remote(3)]

    assert asyncio.run(consume()) == [0, 1, 2]


def test_cancel_a_streaming_task_midway(ray):
    @ray.remote(max_retries=0)
    def endless():
        i = 0
        while True:
            yield i
            i += 1
            time.sleep(0.01)

    g = endless.remote()
    assert ray.get(next(g), timeout=20) == 0
    ray.cancel(g)
    refs = []
    with pytest.raises(ray.exceptions.TaskCancelledError):
        for ref in g:  # the items yielded before the cancel, then the cancellation
            refs.append(ref)
            ray.get(ref, timeout=20)
    assert g.is_finished()
