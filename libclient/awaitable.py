"""Awaiting ObjectRefs: ``await ref``, ``asyncio.gather(*refs)``, ``ref.future()``.

An owned ref that is not ready yet gets a ready-watch in its entry (see
``libclient/core/generators.py``): the thread that completes the value (the
I/O thread, usually) calls it, and it only hands a wake-up to the awaiting
event loop, which then reads the value. Nothing blocks the loop while the
value is pending, so an async actor keeps running its other calls. A value
that must first be pulled from another node, or a ref this process only
borrows (its owner is elsewhere), is read by a helper thread instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

from libclient import api
from libclient.object_ref import ObjectRef


async def await_ref(ref: ObjectRef) -> Any:
    """The value of ``ref``, awaited without blocking the running event loop."""
    core = api._require()
    if not core.value_is_here(ref):
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        registered = core.on_ready(ref, lambda: loop.call_soon_threadsafe(_settle, woken))
        if registered:
            await woken
        if registered is None or not core.value_is_here(ref):
            return await _in_thread(lambda: core.get([ref], None)[0])
    return core.get([ref], None)[0]


def ref_future(ref: ObjectRef) -> concurrent.futures.Future:
    """A concurrent.futures.Future that gets ``ref``'s value (or its error)."""
    core = api._require()
    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()

    def resolve() -> None:
        try:
            value = core.get([ref], None)[0]
        except BaseException as exc:  # the task's error, re-raised by result()
            fut.set_exception(exc)
        else:
            fut.set_result(value)

    if core.value_is_here(ref):
        resolve()
        return fut
    registered = core.on_ready(ref, lambda: _Resolver.submit(resolve))
    if registered is None:  # borrowed: wait in a thread of its own
        threading.Thread(target=resolve, name="shoal-ref-future", daemon=True).start()
    elif not registered:
        _Resolver.submit(resolve)
    return fut


def _settle(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _in_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run a blocking read in a thread of its own (never a bounded pool: the
    values awaited may depend on one another)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run() -> None:
        try:
            value = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(_fail, fut, exc)
        else:
            loop.call_soon_threadsafe(_succeed, fut, value)

    threading.Thread(target=run, name="shoal-await", daemon=True).start()
    return fut


def _succeed(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class _Resolver:
    """One thread that reads values that are ready, for futures: the ready-watch
    runs under the core's lock and must not read them itself."""

    _queue: queue.SimpleQueue = queue.SimpleQueue()
    _thread: threading.Thread | None = None
    _lock = threading.Lock()

    @classmethod
    def submit(cls, fn: Callable[[], None]) -> None:
        cls._queue.put(fn)
        if cls._thread is None:
            with cls._lock:
                if cls._thread is None:
                    cls._thread = threading.Thread(target=cls._run, name="shoal-futures",
                                                   daemon=True)
                    cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        while True:
            cls._queue.get()()
