"""``ray.util.queue``: a FIFO queue shared by tasks and actors, held by an actor.

The queue lives in an async actor (``_QueueActor``) around an
``asyncio.Queue``, so a blocked ``get`` or ``put`` waits inside the actor
without holding it: other callers' puts and gets go on meanwhile (async
actors run up to 1000 calls at once). ``Queue`` objects are plain values
(the actor handle and maxsize), so they can be passed to tasks and actors.
Timeouts are enforced in the actor; ``Empty`` and ``Full`` are raised to
the caller as themselves (subclasses of the standard ``queue`` module's).
"""

from __future__ import annotations

import asyncio
import queue as _stdlib_queue
from collections.abc import Iterable
from typing import Any

from libclient import api


class Empty(_stdlib_queue.Empty):
    """``get`` found nothing (non-blocking) or nothing came within the timeout."""


class Full(_stdlib_queue.Full):
    """``put`` found no room (non-blocking) or none freed within the timeout."""


class _QueueActor:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.queue: asyncio.Queue = asyncio.Queue(maxsize)

    def qsize(self) -> int:
        return self.queue.qsize()

    def empty(self) -> bool:
        return self.queue.empty()

    def full(self) -> bool:
        return self.queue.full()

    async def put(self, item: Any, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self.queue.put(item), timeout)
        except TimeoutError:
            raise Full from None

    async def get(self, timeout: float | None = None) -> Any:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise Empty from None

    async def put_nowait(self, item: Any) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            raise Full from None

    async def put_nowait_batch(self, items: list) -> None:
        if self.maxsize > 0 and len(items) + self.qsize() > self.maxsize:
            raise Full(f"Cannot add {len(items)} items to queue of size {self.qsize()} and "
                       f"maxsize {self.maxsize}.")
        for item in items:
            self.queue.put_nowait(item)

    async def get_nowait(self) -> Any:
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            raise Empty from None

    async def get_nowait_batch(self, num_items: int) -> list:
        if num_items > self.qsize():
            raise Empty(f"Cannot get {num_items} items from queue of size {self.qsize()}.")
        return [self.queue.get_nowait() for _ in range(num_items)]


def _plain(exc: BaseException) -> BaseException:
    """The Empty/Full inside a task error, as the caller should see it."""
    cause = getattr(exc, "cause", None)
    return type(cause)(*cause.args) if isinstance(cause, (Empty, Full)) else exc


def _call(ref: Any) -> Any:
    try:
        return api.get(ref)
    except (Empty, Full) as exc:
        raise _plain(exc) from None


async def _call_async(ref: Any) -> Any:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, api.get, ref)
    except (Empty, Full) as exc:
        raise _plain(exc) from None


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError("'timeout' must be a non-negative number")


class Queue:
    """A first-in first-out queue shared across tasks and actors (Ray's interface).

    Args:
        maxsize: at most this many items; 0 means unbounded.
        actor_options: options for the queue's actor (``num_cpus``, ``name``, ...).
    """

    def __init__(self, maxsize: int = 0, actor_options: dict | None = None) -> None:
        if not isinstance(maxsize, int) or isinstance(maxsize, bool):
            raise TypeError("maxsize must be an int")
        self.maxsize = maxsize
        opts = {"num_cpus": 0, **(actor_options or {})}
        self.actor: Any = api.remote(**opts)(_QueueActor).remote(maxsize)

    def __len__(self) -> int:
        return self.size()

    def size(self) -> int:
        return _call(self.actor.qsize.remote())

    def qsize(self) -> int:
        return self.size()

    def empty(self) -> bool:
        return _call(self.actor.empty.remote())

    def full(self) -> bool:
        return _call(self.actor.full.remote())

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Add ``item``, waiting for room if ``block`` (up to ``timeout`` s).

        Raises:
            Full: no room (at once, or within ``timeout``).
        """
        if not block:
            _call(self.actor.put_nowait.remote(item))
            return
        _check_timeout(timeout)
        _call(self.actor.put.remote(item, timeout))

    async def put_async(self, item: Any, block: bool = True,
                        timeout: float | None = None) -> None:
        """``put`` for asyncio code: awaits instead of blocking the thread."""
        if not block:
            await _call_async(self.actor.put_nowait.remote(item))
            return
        _check_timeout(timeout)
        await _call_async(self.actor.put.remote(item, timeout))

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Take the next item, waiting for one if ``block`` (up to ``timeout`` s).

        Raises:
            Empty: nothing came (at once, or within ``timeout``).
        """
        if not block:
            return _call(self.actor.get_nowait.remote())
        _check_timeout(timeout)
        return _call(self.actor.get.remote(timeout))

    async def get_async(self, block: bool = True, timeout: float | None = None) -> Any:
        """``get`` for asyncio code: awaits instead of blocking the thread."""
        if not block:
            return await _call_async(self.actor.get_nowait.remote())
        _check_timeout(timeout)
        return await _call_async(self.actor.get.remote(timeout))

    def put_nowait(self, item: Any) -> None:
        self.put(item, block=False)

    def put_nowait_batch(self, items: Iterable) -> None:
        """Add all of ``items`` at once, or none (Full) if they do not fit."""
        if not isinstance(items, Iterable):
            raise TypeError("Argument 'items' must be an Iterable")
        _call(self.actor.put_nowait_batch.remote(list(items)))

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def get_nowait_batch(self, num_items: int) -> list:
        """Take exactly ``num_items`` items at once, or none (Empty) if fewer are there."""
        if not isinstance(num_items, int) or isinstance(num_items, bool):
            raise TypeError("Argument 'num_items' must be an int")
        if num_items < 0:
            raise ValueError("'num_items' must be nonnegative")
        return _call(self.actor.get_nowait_batch.remote(num_items))

    def shutdown(self, force: bool = False, grace_period_s: int = 5) -> None:
        """End the queue's actor (items still in it are lost). Idempotent."""
        if self.actor is not None:
            from libclient.actor import kill

            kill(self.actor, no_restart=True)
        self.actor = None
