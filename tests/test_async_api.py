"""Awaitable refs against real daemons: ``await ref``, ``asyncio.gather``,
``ref.future()``, in async actors and asyncio drivers; async actor methods that
await other actors run concurrently and never block the actor's loop."""

import asyncio
import concurrent.futures
import sys
import time

import cloudpickle
import pytest

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_async_actor_awaiting_another_actor_from_the_issue(ray):
    # Ray's documentation program ("use asyncio to run actor methods
    # concurrently"), unmodified but for the sleep that lets it run.
    @ray.remote
    class TaskStore:
        def get_next_task(self):
            return "task"

    @ray.remote
    class AsyncTaskExecutor:
        def __init__(self, task_store):
            self.task_store = task_store
            self.num_executed_tasks = 0

        async def run(self):
            while True:
                # Here we use await instead of ray.get() to
                # wait for the next task and it will yield
                # the control while waiting.
                task = await task_store.get_next_task.remote()
                self._execute_task(task)

        def _execute_task(self, task):
            # Executing the task
            self.num_executed_tasks = self.num_executed_tasks + 1

        def get_num_executed_tasks(self):
            return self.num_executed_tasks

    task_store = TaskStore.remote()
    async_task_executor = AsyncTaskExecutor.remote(task_store)
    async_task_executor.run.remote()
    time.sleep(2)
    # We are able to run get_num_executed_tasks while run method is running.
    num_executed_tasks = ray.get(async_task_executor.get_num_executed_tasks.remote(), timeout=10)
    assert num_executed_tasks > 10
    time.sleep(0.3)
    later = ray.get(async_task_executor.get_num_executed_tasks.remote(), timeout=10)
    assert later > num_executed_tasks  # the loop keeps advancing
    ray.kill(async_task_executor)
    ray.kill(task_store)


def test_awaiting_calls_overlap_in_an_async_actor(ray):
    @ray.remote
    class Slow:
        async def work(self, x):
            await asyncio.sleep(0.5)
            return x

    @ray.remote
    class Relay:
        def __init__(self, slow):
            self.slow = slow

        async def one(self, x):
            return await self.slow.work.remote(x) + 1

        async def gather(self, n):
            return await asyncio.gather(*[self.slow.work.remote(i) for i in range(n)])

    slow = Slow.remote()
    relay = Relay.remote(slow)
    ray.get(relay.one.remote(0))  # both actors are up
    start = time.monotonic()
    assert ray.get([relay.one.remote(i) for i in range(6)], timeout=20) == [1, 2, 3, 4, 5, 6]
    assert time.monotonic() - start < 2.0  # 6 x 0.5 s would be 3 s one at a time
    start = time.monotonic()
    assert ray.get(relay.gather.remote(8), timeout=20) == list(range(8))
    assert time.monotonic() - start < 2.0


def test_await_does_not_block_the_actor_loop(ray):
    @ray.remote
    def slow_task():
        time.sleep(1.0)
        return "slow"

    @ray.remote
    class Waiter:
        async def wait_slow(self):
            return await slow_task.remote()

        async def ping(self):
            return "pong"

    w = Waiter.remote()
    assert ray.get(w.ping.remote()) == "pong"
    pending = w.wait_slow.remote()
    time.sleep(0.1)
    start = time.monotonic()
    assert ray.get(w.ping.remote(), timeout=5) == "pong"
    assert time.monotonic() - start < 0.5  # answered while wait_slow awaits
    assert ray.get(pending, timeout=10) == "slow"


def test_awaiting_a_failed_ref_raises_the_tasks_error(ray):
    @ray.remote(max_retries=0)
    def bad():
        raise KeyError("missing")

    @ray.remote
    class Catcher:
        async def catch(self):
            try:
                await bad.remote()
            except KeyError as exc:
                return f"caught {exc.args[0]}"
            return "not raised"

    assert ray.get(Catcher.remote().catch.remote(), timeout=20) == "caught missing"

    async def driver():
        with pytest.raises(KeyError):
            await bad.remote()

    asyncio.run(driver())


def test_await_and_gather_in_an_asyncio_driver(ray):
    @ray.remote
    def square(x):
        time.sleep(0.05)
        return x * x

    async def main():
        one = await square.remote(3)
        many = await asyncio.gather(*[square.remote(i) for i in range(10)])
        put = await ray.put("stored")  # a ready ref: no wait at all
        fut = square.remote(5).as_future()
        return one, many, put, await fut

    one, many, put, five = asyncio.run(main())
    assert one == 9 and many == [i * i for i in range(10)] and put == "stored" and five == 25


def test_await_a_borrowed_ref_in_an_actor(ray):
    @ray.remote
    def later():
        time.sleep(0.3)
        return "borrowed value"

    @ray.remote
    class Holder:
        async def read(self, boxed):
            return await boxed[0]  # owned by the driver: awaited through a thread

    ref = later.remote()
    assert ray.get(Holder.remote().read.remote([ref]), timeout=20) == "borrowed value"


def test_ref_future(ray):
    @ray.remote
    def add(a, b):
        time.sleep(0.1)
        return a + b

    @ray.remote(max_retries=0)
    def bad():
        raise ValueError("nope")

    futs = [add.remote(i, 1).future() for i in range(5)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futs)
    assert [f.result(timeout=20) for f in futs] == [1, 2, 3, 4, 5]
    done, _ = concurrent.futures.wait([add.remote(1, 1).future(), ray.put(7).future()],
                                      timeout=20)
    assert sorted(f.result() for f in done) == [2, 7]
    with pytest.raises(ValueError, match="nope"):
        bad.remote().future().result(timeout=20)
