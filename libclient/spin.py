"""Wait for a socket by spinning briefly before sleeping in the kernel.

A synchronous call (``ray.get(f.remote())``, a sync actor call) is a
ping-pong between two processes. When the waiting side sleeps in
``select``/``recv``, each answer costs a kernel wake-up, and on a VM an idle
vCPU must first be woken by the host: measured here, that wake-up, not the
work, set the rate of sync tasks. So the waiter first polls without
sleeping for a short window, about one round trip, and only then blocks.
The window is short enough that an idle worker or driver costs nothing
measurable, and is skipped when there is nothing to wait for.
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


def readable(sock: socket.socket, timeout: float | None, spin_s: float = SPIN_S) -> bool:
    """True once ``sock`` is readable; False if ``timeout`` passes first."""
    end = time.perf_counter() + min(spin_s, timeout if timeout is not None else spin_s)
    while True:
        if select.select([sock], [], [], 0)[0]:
            return True
        if time.perf_counter() >= end:
            break
    if timeout is not None and timeout <= spin_s:
        return False
    rest = None if timeout is None else timeout - spin_s
    return bool(select.select([sock], [], [], rest)[0])


def recv(sock: socket.socket, size: int, spin_s: float = SPIN_S) -> bytes:
    """``sock.recv(size)`` on a blocking socket, spinning briefly before it blocks."""
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
        try:
            return sock.recv(size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
    return sock.recv(size)


def wait_selector(sel: selectors.BaseSelector, spin_s: float = SPIN_S) -> list[Any]:
    """``sel.select()`` (no timeout), spinning briefly before it blocks.

    Only for a thread that has the process to itself: spinning holds the
    GIL between polls, which would slow threads doing the actual work.
    """
    end = time.perf_counter() + spin_s
    while time.perf_counter() < end:
        events = sel.select(0)
        if events:
            return events
    return sel.select()
