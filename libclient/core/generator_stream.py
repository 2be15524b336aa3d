"""The owner's side of one streaming generator task: what arrived, what was taken.

Theory of operation
-------------------
A streaming generator task (``num_returns="streaming"``, Ray 2's default for
generator functions) reports each value it yields to its owner as it is
produced: a ``gi`` frame (generator item) with the item's index, sent on the
same connection as the task's final ``done`` reply, so items arrive in order
and before the end. The owner makes each item an owned object with id
``task id + (index + 1)`` and hands its ObjectRef to this stream; the task's
one declared return (index 0, the *completion*) settles last, holding either
the number of items yielded or the error the task raised.

The consumer (``ObjectRefGenerator``) takes items in index order. Once the
completion is known:

* a count: items up to it are delivered, then the stream ends;
* an error: every item that arrived first is delivered, then the completion
  ref itself (whose ``get`` raises the task's error), then the stream ends.

A task retried after its worker died yields again from index 0: items this
stream already holds are ignored (Ray makes the same assumption, that a
retried generator yields the same sequence).

Waiters are opaque callables the caller registered (an asyncio wake-up); the
stream returns the ones to call when something happens and never calls them
itself. Pure: no I/O, no threads, no clock; the core worker calls in under its
lock.
"""

from __future__ import annotations

from typing import Any

ITEM = "item"  # the next item's ref
ERROR = "error"  # the completion ref: its get raises the task's error
END = "end"  # no more items
WAIT = "wait"  # nothing to take yet


class GeneratorStream:
    """Items of one streaming task as they arrive, and how far the consumer got."""

    __slots__ = ("tid", "completion", "items", "received", "consumed", "total", "failed",
                 "error_taken", "waiters", "__weakref__")

    def __init__(self, tid: bytes, completion: Any) -> None:
        self.tid = tid
        self.completion = completion  # the ref of return 0 (count or error)
        self.items: dict[int, Any] = {}  # index -> ref, arrived and not yet taken
        self.received = 0  # every index below this has arrived
        self.consumed = 0  # the next index the consumer takes
        self.total: int | None = None  # items yielded, once the task finished
        self.failed = False  # the task ended in an error
        self.error_taken = False
        self.waiters: list[Any] = []

    def wants(self, index: int) -> bool:
        """Is item ``index`` new (not a replay by a retried task, not malformed)?"""
        return isinstance(index, int) and index >= self.received and index not in self.items \
            and (self.total is None or index < self.total)

    def on_item(self, index: int, ref: Any) -> list[Any]:
        """Item ``index`` arrived (``wants`` said yes); returns waiters to wake."""
        self.items[index] = ref
        while self.received in self.items:
            self.received += 1
        return self._wake()

    def on_end(self, total: int | None) -> list[Any]:
        """The task finished: ``total`` items, or None if it raised."""
        if self.total is None and not self.failed:
            if total is None:
                self.failed = True
            else:
                self.total = total
        return self._wake()

    @property
    def finished(self) -> bool:
        """Has the task ended (whether or not the consumer took everything)?"""
        return self.total is not None or self.failed

    def take(self) -> tuple[str, Any]:
        """The consumer's next step: (ITEM, ref), (ERROR, completion ref), END or WAIT."""
        i = self.consumed
        ref = self.items.pop(i, None)
        if ref is not None:
            self.consumed = i + 1
            return ITEM, ref
        if self.total is not None:
            # Items come before the end on one connection, so one missing now
            # never comes (a retry that yielded fewer): end rather than hang.
            return END, None
        if self.failed:
            if i < self.received:
                return WAIT, None
            if not self.error_taken:
                self.error_taken = True
                return ERROR, self.completion
            return END, None
        return WAIT, None

    def ready(self) -> bool:
        """Would ``take`` return something other than WAIT?"""
        i = self.consumed
        if i in self.items:
            return True
        return self.total is not None or (self.failed and i >= self.received)

    def exhausted(self) -> bool:
        """Finished, and every item (and the error, if any) taken."""
        if self.items:
            return False
        if self.total is not None:
            return self.consumed >= self.total or self.received <= self.consumed
        return self.failed and self.error_taken

    def add_waiter(self, waiter: Any) -> None:
        self.waiters.append(waiter)

    def _wake(self) -> list[Any]:
        waiters, self.waiters = self.waiters, []
        return waiters
