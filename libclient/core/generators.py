"""Streaming generator items and ready-watches: the core worker's side of both.

*Streams.* A streaming task's worker sends one ``gi`` frame per yielded
value (``{t: "gi", tid, i, ret, nst?}``, ``ret`` shaped like one of a
``done`` reply's returns) before its ``done``. The owner makes each item an
owned object and hands its ref to the task's :class:`GeneratorStream` (pure,
``generator_stream.py``); the consumer takes refs from the stream, blocking
(``next``) or through a wake-up callback (``async for``).

*Ready-watches.* Awaiting a ref registers a callable in its owned entry's
``waiters`` (beside the tasks waiting for it as an argument). Completing the
entry calls it, under the core's lock, in whichever thread completed it; the
callable only hands a wake-up to an event loop or a future, never blocks.
Nothing is added to the path of tasks that nobody awaits.

Mixed into :class:`~libclient.core.core_worker.CoreWorker`; every method
here runs with (or takes) the core's one lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from libclient import serialization
from libclient.core.generator_stream import ERROR, ITEM, WAIT, GeneratorStream
from libclient.core.references import PENDING, READY, Entry
from libclient.exceptions import GetTimeoutError, ObjectLostError, RaySystemError
from libclient.object_ref import ObjectRef
from libclient.object_ref_generator import ObjectRefGenerator

_NO_STREAM_S = 0.05  # how long a blocked next() sleeps between looks when not reading


class GeneratorsAndWaits:
    """Streams of generator items and ready-watches on owned entries."""

    # ----------------------------------------------------------- streams
    def _new_stream(self, tid: bytes, completion: ObjectRef) -> ObjectRefGenerator:
        """A streaming task was built (lock held): follow its items and its end;
        the generator the caller gets holds the stream (we keep a weak ref)."""
        stream = GeneratorStream(tid, completion)
        self._streams[tid] = stream  # type: ignore[attr-defined]
        entry = self._refs.owned.get(completion._id)  # type: ignore[attr-defined]
        if entry is not None:
            if entry.waiters is None:
                entry.waiters = []
            entry.waiters.append(self._stream_ended)
        return ObjectRefGenerator(self, stream)

    def _stream_ended(self, oid: bytes, entry: Entry) -> None:
        """The completion (return 0) of a streaming task settled (lock held)."""
        stream = self._streams.get(oid[:16])  # type: ignore[attr-defined]
        if stream is None:
            return
        total = None
        wire = entry.wire
        if wire is not None and wire[0] == serialization.KIND_VALUE:
            try:
                value = serialization.deserialize_wire(wire)[1]
            except Exception:
                value = None
            if isinstance(value, int) and not isinstance(value, bool):
                total = value
        _wake(stream.on_end(total))
        self._cv.notify_all()  # type: ignore[attr-defined]

    def _on_stream_item(self, conn: Any, msg: dict) -> None:
        """A ``gi`` frame from the worker running a streaming task (lock held)."""
        tid, index, ret = msg.get("tid"), msg.get("i"), msg.get("ret")
        if not isinstance(tid, bytes) or not isinstance(ret, list) or not ret:
            return
        stream = self._streams.get(tid)  # type: ignore[attr-defined]
        if stream is None or tid not in conn.inflight or not stream.wants(index):
            return  # the generator was dropped, the task is not ours, or a replay
        oid = tid + (index + 1).to_bytes(4, "little")
        entry = self._refs.add(oid)  # type: ignore[attr-defined]
        ref = ObjectRef(oid, self.pid, self.store_address)  # type: ignore[attr-defined]
        if ret[0] == "v" and len(ret) > 1:
            entry.wire = ret[1]
        elif len(ret) > 1 and ret[1] and ret[1] != self.store_address:  # type: ignore[attr-defined]
            entry.loc = ret[1]  # on the worker's node; pulled when someone gets it
            entry.loc_size = ret[2] if len(ret) > 2 and isinstance(ret[2], int) else 0
        else:
            entry.buf = self._store.pin(oid)  # type: ignore[attr-defined]
            if entry.buf is None:
                entry.wire = serialization.serialize(ObjectLostError(
                    f"item {index} of a streaming generator was evicted before its owner "
                    "pinned it"), serialization.KIND_ERROR).to_wire()
        if msg.get("nst"):
            self._on_nested(entry, msg["nst"])  # type: ignore[attr-defined]
        self._complete(oid, entry)  # type: ignore[attr-defined]
        _wake(stream.on_item(index, ref))
        self._cv.notify_all()  # type: ignore[attr-defined]

    def stream_take(self, stream: GeneratorStream) -> tuple[str, Any]:
        """The stream's next step without waiting (see GeneratorStream.take)."""
        with self._lock:  # type: ignore[attr-defined]
            self._drain_released()  # type: ignore[attr-defined]
            return stream.take()

    def stream_next(self, stream: GeneratorStream, timeout: float | None) -> tuple[str, Any]:
        """Wait for the stream's next step; GetTimeoutError past ``timeout``.

        Like a blocking ``get``, the waiting thread reads the task's connection
        itself when it can (one thread wake-up less per item).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        tid = stream.tid
        with self._lock:  # type: ignore[attr-defined]
            self._drain_released()  # type: ignore[attr-defined]
            step = stream.take()
            if step[0] != WAIT:
                return step
            self._set_blocked(True)  # type: ignore[attr-defined]
            try:
                while True:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise GetTimeoutError("timed out waiting for the generator's next item")
                    wait = _NO_STREAM_S if remaining is None else min(remaining, _NO_STREAM_S)
                    conn = self._reply_conn(tid)  # type: ignore[attr-defined]
                    if conn is None or not self._io.read_directly(  # type: ignore[attr-defined]
                            conn, wait, self._read_conn):  # type: ignore[attr-defined]
                        if not stream.ready():
                            self._cv.wait(wait)  # type: ignore[attr-defined]
                    if self._io.closed:  # type: ignore[attr-defined]
                        raise RaySystemError("libclient was shut down")
                    step = stream.take()
                    if step[0] != WAIT:
                        return step
            finally:
                self._set_blocked(False)  # type: ignore[attr-defined]

    def stream_notify(self, stream: GeneratorStream, wake: Callable[[], None]) -> bool:
        """Call ``wake`` (from any thread) once the stream has a next step.
        False if it has one now (the caller takes it at once)."""
        with self._lock:  # type: ignore[attr-defined]
            if stream.ready():
                return False
            stream.add_waiter(wake)
            return True

    def stream_exhausted(self, stream: GeneratorStream) -> bool:
        """Has the task finished, and the consumer taken everything it yielded?"""
        with self._lock:  # type: ignore[attr-defined]
            return stream.exhausted()

    # ----------------------------------------------------------- awaiting
    def on_ready(self, ref: ObjectRef, wake: Callable[[], None]) -> bool | None:
        """Call ``wake`` (under the core's lock, from whichever thread completes
        the value) once owned ``ref`` is ready. False if it is ready now; None
        if this process does not own it (the caller waits another way)."""
        with self._lock:  # type: ignore[attr-defined]
            entry = self._refs.owned.get(ref._id)  # type: ignore[attr-defined]
            if entry is None:
                return None
            if entry.state == READY:
                return False
            if entry.state != PENDING:
                return None  # released for a rebuild: get knows how to wait for that
            if entry.waiters is None:
                entry.waiters = []
            entry.waiters.append(lambda _oid, _entry: wake())
            return True

    def value_is_here(self, ref: ObjectRef) -> bool:
        """Is ``ref`` an owned, ready value that ``get`` reads without waiting on
        a pull (inline, or in this node's store)?"""
        with self._lock:  # type: ignore[attr-defined]
            entry = self._refs.owned.get(ref._id)  # type: ignore[attr-defined]
            return entry is not None and entry.state == READY and \
                (entry.wire is not None or entry.buf is not None)


def _wake(waiters: list[Any]) -> None:
    for wake in waiters:
        try:
            wake()
        except Exception:
            pass  # a closed event loop: its awaiter is gone


__all__ = ["GeneratorsAndWaits", "ITEM", "ERROR"]
