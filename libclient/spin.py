"""Wait for a socket by spinning briefly before sleeping in the kernel.

A synchronous call (``ray.get(f.remote())``, a sync actor call) is a
ping-pong between two processes. When the waiting side sleeps in
``poll``/``recv``, each answer costs a kernel wake-up, and on a VM an idle
vCPU must first be woken by the host: measured here, that wake-up, not the
work, set the rate of sync tasks. So the waiter first polls without
sleeping for a short window, about one round trip, and only then blocks.
The window is short enough that an idle worker or driver costs nothing
measurable. Where spinning does not pay (answers come later than the window,
so every spin is CPU taken from the processes doing the work, e.g. several
clients on a busy node), it stops: each kind of wait keeps a score of how
often its spins found data, spins only while that is at least 1 in 4, and
otherwise tries once every 16 waits to see whether things changed.

Waits use ``poll`` (or a selector), never ``select.select``, which fails
with "filedescriptor out of range" for descriptors >= 1024.
"""

from __future__ import annotations

import select
import selectors
import socket
import time
from typing import Any

# About one task round trip on a 2-core VM (150-250 us). Longer windows
# burn CPU that a busy node needs; shorter ones miss most answers.
SPIN_S = 0.0003


class Adaptive:
    """Whether spinning has been finding data for one kind of wait (races are harmless)."""

    def __init__(self) -> None:
        self.score = 1.0
        self.waits = 0

    def window(self, spin_s: float) -> float:
        self.waits += 1
        return spin_s if self.score >= 0.25 or self.waits % 16 == 0 else 0.0

    def record(self, hit: bool) -> None:
        self.score = 0.9 * self.score + (0.1 if hit else 0.0)


_READABLE, _RECV, _SELECT = Adaptive(), Adaptive(), Adaptive()


def readable(sock: socket.socket, timeout: float | None, spin_s: float = SPIN_S,
             state: Adaptive = _READABLE) -> bool:
    """True once ``sock`` is readable; False if ``timeout`` passes first."""
    spin_s = state.window(spin_s)
    if timeout is not None:
        spin_s = min(spin_s, timeout)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poll = poller.poll
    end = time.perf_counter() + spin_s
    while spin_s:
        if poll(0):
            state.record(True)
            return True
        if time.perf_counter() >= end:
            state.record(False)
            break
    if timeout is not None and timeout <= spin_s:
        return False
    return bool(poll(None if timeout is None else (timeout - spin_s) * 1000.0))


def wait_readable(fileobj: Any, timeout: float | None) -> bool:
    """Block until ``fileobj`` (a socket or a descriptor) is readable, at most
    ``timeout`` seconds (None: no limit). False if the time ran out.

    Uses poll, never select: select cannot take a descriptor numbered 1024
    or higher, which a process with many files open gets for every new one.
    """
    poller = select.poll()
    poller.register(fileobj, select.POLLIN)
    return bool(poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0))


def recv(sock: socket.socket, size: int, spin_s: float = SPIN_S,
         state: Adaptive = _RECV) -> bytes:
    """``sock.recv(size)`` on a blocking socket, spinning briefly before it blocks."""
    spin_s = state.window(spin_s)
    end = time.perf_counter() + spin_s
    while spin_s:
        try:
            data = sock.recv(size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            if time.perf_counter() < end:
                continue
            state.record(False)
            break
        state.record(True)
        return data
    return sock.recv(size)


def wait_selector(sel: selectors.BaseSelector, spin_s: float = SPIN_S,
                  timeout: float | None = None) -> list[Any]:
    """``sel.select(timeout)`` (None: no limit), spinning briefly before it blocks.

    Only for a thread that has the process to itself: spinning holds the
    GIL between polls, which would slow threads doing the actual work.
    """
    spin_s = _SELECT.window(spin_s)
    if timeout is not None:
        spin_s = min(spin_s, timeout)
    end = time.perf_counter() + spin_s
    while spin_s:
        events = sel.select(0)
        if events:
            _SELECT.record(True)
            return events
        if time.perf_counter() >= end:
            _SELECT.record(False)
            break
    if spin_s and timeout is not None and timeout <= spin_s:
        return []  # spun for all of it
    return sel.select(None if timeout is None else timeout - spin_s)
