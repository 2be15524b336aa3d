"""ObjectRefGenerator: what a streaming generator task returns (Ray 2's name).

Iterating it (``for``, ``next``, ``async for``) yields one ObjectRef per value
the task yields, as soon as the task has yielded it, in order. If the task
raises, the items it yielded first come out, then one ref whose ``get``
raises the task's error, then the iteration stops. How the items travel is
in ``libclient/core/generators.py``; the bookkeeping is the pure
``GeneratorStream``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from libclient.core import generator_stream as gs
from libclient.object_ref import ObjectRef


class ObjectRefGenerator:
    """The refs of a streaming generator task's items, in the order yielded."""

    def __init__(self, core: Any, stream: gs.GeneratorStream) -> None:
        self._core = core
        self._stream = stream

    # ------------------------------------------------------------- sync
    def __iter__(self) -> ObjectRefGenerator:
        return self

    def __next__(self) -> ObjectRef:
        return self._next_sync()

    def _next_sync(self, timeout_s: float | None = None) -> ObjectRef:
        """The next item's ref, waiting up to ``timeout_s`` (GetTimeoutError past it)."""
        kind, ref = self._core.stream_next(self._stream, timeout_s)
        if kind == gs.END:
            raise StopIteration
        return ref

    # ------------------------------------------------------------ async
    def __aiter__(self) -> ObjectRefGenerator:
        return self

    async def __anext__(self) -> ObjectRef:
        return await self._next_async()

    async def _next_async(self, timeout_s: float | None = None) -> ObjectRef:
        """The next item's ref without blocking the event loop."""
        core, stream = self._core, self._stream
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            kind, ref = core.stream_take(stream)
            if kind != gs.WAIT:
                break
            woken = loop.create_future()
            if core.stream_notify(stream, _waker(loop, woken)):
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await asyncio.wait_for(woken, remaining)
                except TimeoutError:
                    from libclient.exceptions import GetTimeoutError

                    raise GetTimeoutError("timed out waiting for the generator's next item") \
                        from None
        if kind == gs.END:
            raise StopAsyncIteration
        return ref

    # ------------------------------------------------------------ state
    def completed(self) -> ObjectRef:
        """A ref that is ready when the task has finished (its get raises the
        task's error if it failed; else it holds the number of items)."""
        return self._stream.completion

    def is_finished(self) -> bool:
        """Has the task finished and has every item been taken?"""
        return self._core.stream_exhausted(self._stream)

    def __repr__(self) -> str:
        return f"ObjectRefGenerator({self._stream.tid.hex()})"

    def __reduce__(self) -> Any:
        raise TypeError("an ObjectRefGenerator cannot be passed to other tasks or pickled; "
                        "pass the ObjectRefs it yields instead")


def _waker(loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> Any:
    """A callable any thread may call to settle ``fut`` on its loop."""
    return lambda: loop.call_soon_threadsafe(_settle, fut)


def _settle(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
