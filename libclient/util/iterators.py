"""``ray.util.as_completed`` and ``ray.util.map_unordered``: results in the
order tasks finish, built on ``wait`` (nothing new on the wire).

Both wait on at most ``chunk_size`` refs at a time, as Ray does, so a long
list costs one ``wait`` per few results rather than one per ref.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from libclient import api
from libclient.object_ref import ObjectRef


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def as_completed(refs: Sequence[ObjectRef], *, chunk_size: int = 10,
                 yield_obj_refs: bool = False, **wait_kwargs: Any) -> Iterator[Any]:
    """Yield the values of ``refs`` (or the refs, with ``yield_obj_refs``) as
    their tasks finish. A failed task raises its error when its turn comes.
    ``wait_kwargs`` (``timeout``, ``fetch_local``) go to each ``wait``."""
    _check_chunk(chunk_size)
    refs = list(refs)
    if not all(isinstance(r, ObjectRef) for r in refs):
        raise TypeError("as_completed() expects a sequence of ObjectRefs")
    return _drain(deque(refs), chunk_size, yield_obj_refs, wait_kwargs)


def _drain(todo: deque, chunk_size: int, yield_obj_refs: bool,
           wait_kwargs: dict[str, Any]) -> Iterator[Any]:
    pending: list[ObjectRef] = []
    while todo or pending:
        while todo and len(pending) < chunk_size:
            pending.append(todo.popleft())
        ready, pending = api.wait(pending, num_returns=1, **wait_kwargs)
        for ref in ready:
            yield ref if yield_obj_refs else api.get(ref)


def map_unordered(fn: Any, items: Iterable[Any], *, backpressure_size: int | None = 100,
                  chunk_size: int = 10, yield_obj_refs: bool = False,
                  **wait_kwargs: Any) -> Iterator[Any]:
    """Run ``fn.remote(item)`` for each item, at most ``backpressure_size``
    at once (None: no limit), and yield the results as they finish."""
    _check_chunk(chunk_size)
    if not hasattr(fn, "remote"):
        raise TypeError("map_unordered() expects a remote function")
    if backpressure_size is not None and (isinstance(backpressure_size, bool) or not isinstance(
            backpressure_size, int) or backpressure_size < 1):
        raise ValueError(f"backpressure_size must be a positive int or None, "
                         f"got {backpressure_size!r}")
    return _map(fn, iter(items), backpressure_size, chunk_size, yield_obj_refs, wait_kwargs)


def _map(fn: Any, items: Iterator[Any], limit: int | None, chunk_size: int,
         yield_obj_refs: bool, wait_kwargs: dict[str, Any]) -> Iterator[Any]:
    in_flight: list[ObjectRef] = []
    exhausted = False
    while True:
        while not exhausted and (limit is None or len(in_flight) < limit):
            try:
                item = next(items)
            except StopIteration:
                exhausted = True
                break
            in_flight.append(fn.remote(item))
        if not in_flight:
            return
        ready, in_flight = _wait_chunk(in_flight, chunk_size, wait_kwargs)
        for ref in ready:
            yield ref if yield_obj_refs else api.get(ref)


def _wait_chunk(refs: list[ObjectRef], chunk_size: int, wait_kwargs: dict[str, Any]
                ) -> tuple[list[ObjectRef], list[ObjectRef]]:
    """``wait`` on the oldest ``chunk_size`` refs; the rest stay in flight."""
    ready, rest = api.wait(refs[:chunk_size], num_returns=1, **wait_kwargs)
    return ready, rest + refs[chunk_size:]
