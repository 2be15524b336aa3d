"""``ray.util.ActorPool``: run work over a fixed set of actors, one call per idle actor.

Semantics follow Ray's: ``submit`` hands a value to an idle actor (or queues
it until one frees up); ``get_next`` returns results in submission order,
``get_next_unordered`` in completion order; an actor is idle again once its
result has been taken. With ``timeout`` a result that is not ready raises
``TimeoutError``; with ``ignore_if_timedout`` the ordered result is dropped
(its actor is freed) and the next call moves on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from libclient import api


def _key(future: Any) -> Any:
    return tuple(future) if isinstance(future, list) else future


def _refs(future: Any) -> list:
    return list(future) if isinstance(future, (list, tuple)) else [future]


class ActorPool:
    """A pool of actors; ``fn(actor, value)`` must return an ObjectRef (or a list)."""

    def __init__(self, actors: list) -> None:
        self._idle_actors = list(actors)
        self._future_to_actor: dict[Any, tuple[int, Any]] = {}
        self._index_to_future: dict[int, Any] = {}
        self._next_task_index = 0
        self._next_return_index = 0
        self._pending_submits: list[tuple[Callable, Any]] = []

    def map(self, fn: Callable[[Any, Any], Any], values: Iterable) -> Iterator[Any]:
        """Apply ``fn`` to ``values`` over the pool; yield results in order.

        Results of earlier submissions not yet taken are dropped first.
        """
        self._drop_pending_results()
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next()

        return results()

    def map_unordered(self, fn: Callable[[Any, Any], Any], values: Iterable) -> Iterator[Any]:
        """Like ``map``, yielding results as they complete."""
        self._drop_pending_results()
        for v in values:
            self.submit(fn, v)

        def results() -> Iterator[Any]:
            while self.has_next():
                yield self.get_next_unordered()

        return results()

    def _drop_pending_results(self) -> None:
        while self.has_next():
            try:
                self.get_next(timeout=0, ignore_if_timedout=True)
            except TimeoutError:
                pass

    def submit(self, fn: Callable[[Any, Any], Any], value: Any) -> None:
        """Run ``fn(actor, value)`` on an idle actor, or queue it until one is free."""
        if not self._idle_actors:
            self._pending_submits.append((fn, value))
            return
        actor = self._idle_actors.pop()
        future = fn(actor, value)
        self._future_to_actor[_key(future)] = (self._next_task_index, actor)
        self._index_to_future[self._next_task_index] = future
        self._next_task_index += 1

    def has_next(self) -> bool:
        """Whether any submitted result is still to be taken."""
        return bool(self._future_to_actor)

    def get_next(self, timeout: float | None = None, ignore_if_timedout: bool = False) -> Any:
        """The next result in submission order.

        Raises:
            StopIteration: nothing is pending.
            ValueError: after ``get_next_unordered`` took a later result.
            TimeoutError: not ready within ``timeout`` seconds.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        if self._next_return_index >= self._next_task_index:
            raise ValueError("It is not allowed to call get_next() after "
                             "get_next_unordered().")
        future = self._index_to_future[self._next_return_index]
        timed_out = False
        if timeout is not None:
            ready, _ = api.wait(_refs(future), num_returns=len(_refs(future)), timeout=timeout)
            if len(ready) < len(_refs(future)):
                if not ignore_if_timedout:
                    raise TimeoutError("Timed out waiting for result")
                timed_out = True
        del self._index_to_future[self._next_return_index]
        self._next_return_index += 1
        _i, actor = self._future_to_actor.pop(_key(future))
        self._return_actor(actor)
        if timed_out:
            raise TimeoutError(f"Timed out waiting for result. The task {future} has been "
                               "ignored.")
        return api.get(future)

    def get_next_unordered(self, timeout: float | None = None,
                           ignore_if_timedout: bool = False) -> Any:
        """Any next result, in completion order.

        Raises:
            StopIteration: nothing is pending.
            TimeoutError: none ready within ``timeout`` seconds.
        """
        if not self.has_next():
            raise StopIteration("No more results to get")
        firsts = {_refs(f)[0]: f for f in self._index_to_future.values()}
        ready, _ = api.wait(list(firsts), num_returns=1, timeout=timeout)
        if not ready:
            raise TimeoutError("Timed out waiting for result")
        future = firsts[ready[0]]
        index, actor = self._future_to_actor.pop(_key(future))
        self._return_actor(actor)
        del self._index_to_future[index]
        self._next_return_index = max(self._next_return_index, index + 1)
        return api.get(future)

    def _return_actor(self, actor: Any) -> None:
        self._idle_actors.append(actor)
        if self._pending_submits:
            self.submit(*self._pending_submits.pop(0))

    def has_free(self) -> bool:
        """Whether an actor is idle and no submission waits for one."""
        return bool(self._idle_actors) and not self._pending_submits

    def pop_idle(self) -> Any | None:
        """Take an idle actor out of the pool (None if none is free)."""
        return self._idle_actors.pop() if self.has_free() else None

    def push(self, actor: Any) -> None:
        """Add an actor to the pool (it takes a queued submission at once, if any).

        Raises:
            ValueError: the actor is in the pool already.
        """
        busy = [a for _, a in self._future_to_actor.values()]
        if actor in self._idle_actors or actor in busy:
            raise ValueError("Actor already belongs to current ActorPool")
        self._return_actor(actor)
