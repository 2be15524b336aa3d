"""ObjectRef: a future naming an immutable object, with its owner's address.

Reference counting is local and deferred: ``__init__`` counts a new handle
and ``__del__`` only appends the id to a queue, because ``__del__`` may run in
any thread, in the middle of any code (even while the core worker holds its
own lock). The core worker drains that queue at safe points. Actor handles
(``libclient.actor``) queue their releases here too, so the core worker
never has to import the API modules built on top of it.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

# Set by the core worker of this process: _incref(oid, owner_pid, owner_addr)
# counts a new handle (owned, or borrowed from another process).
_incref: Any = None
_released: collections.deque[bytes] = collections.deque()
# The same for actor handles: ActorHandle.__del__ appends its actor id here.
_released_actor_handles: collections.deque[bytes] = collections.deque()
# Refs seen while serializing a value on this thread (None when not collecting).
_collect = threading.local()


class ObjectRef:
    """A handle on an object that a task will produce or that ``put`` stored."""

    __slots__ = ("_id", "_owner_pid", "_owner_addr", "_counted", "__weakref__")

    def __init__(self, oid: bytes, owner_pid: int = 0, owner_addr: str = "", *,
                 _count: bool = True) -> None:
        self._id = oid
        self._owner_pid = owner_pid
        # The owner's node's store ("host:port"): where a borrower on another
        # node pulls the object from once the owner has stored it.
        self._owner_addr = owner_addr
        self._counted = False
        if _count and _incref is not None:
            _incref(oid, owner_pid, owner_addr)
            self._counted = True

    def binary(self) -> bytes:
        return self._id

    def hex(self) -> str:
        return self._id.hex()

    @property
    def owner_pid(self) -> int:
        return self._owner_pid

    @property
    def owner_addr(self) -> str:
        return self._owner_addr

    def __repr__(self) -> str:
        return f"ObjectRef({self._id.hex()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def __del__(self) -> None:
        if self._counted:
            _released.append(self._id)

    def __reduce__(self) -> Any:
        refs = getattr(_collect, "refs", None)
        if refs is not None:
            refs.append(self)
        return (_rebuild, (self._id, self._owner_pid, self._owner_addr))

    # Awaiting (libclient/awaitable.py): the value, without blocking the loop.
    def __await__(self) -> Any:
        from libclient.awaitable import await_ref

        return await_ref(self).__await__()

    def future(self) -> Any:
        """A concurrent.futures.Future of the value (its error, if the task raised)."""
        from libclient.awaitable import ref_future

        return ref_future(self)

    def as_future(self) -> Any:
        """An asyncio.Future of the value, on the running event loop."""
        import asyncio

        from libclient.awaitable import await_ref

        return asyncio.ensure_future(await_ref(self))


def _rebuild(oid: bytes, owner_pid: int, owner_addr: str = "") -> ObjectRef:
    return ObjectRef(oid, owner_pid, owner_addr)
