"""libclient.spin: waiting for a socket by polling briefly, then blocking."""

from __future__ import annotations

import selectors
import socket
import threading
import time

from libclient import spin


def _later(sock: socket.socket, delay: float, data: bytes = b"x") -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), sock.sendall(data)))
    t.start()
    return t


def test_readable_sees_data_that_comes_while_spinning_and_after():
    a, b = socket.socketpair()
    try:
        t = _later(b, 0.0001)
        assert spin.readable(a, 5.0, spin_s=0.05)  # arrives within the spin window
        t.join()
        a.recv(10)
        t = _later(b, 0.05)
        start = time.perf_counter()
        assert spin.readable(a, 5.0, spin_s=0.001)  # arrives after it: blocks, then wakes
        assert time.perf_counter() - start < 2.0
        t.join()
    finally:
        a.close()
        b.close()


def test_readable_gives_up_at_its_timeout():
    a, b = socket.socketpair()
    try:
        start = time.perf_counter()
        assert not spin.readable(a, 0.05, spin_s=0.01)
        assert 0.04 < time.perf_counter() - start < 1.0
        assert not spin.readable(a, 0.0001, spin_s=0.01)  # timeout inside the spin window
    finally:
        a.close()
        b.close()


def test_recv_and_wait_selector_return_what_arrives():
    a, b = socket.socketpair()
    try:
        t = _later(b, 0.02, b"hello")
        assert spin.recv(a, 100, spin_s=0.001) == b"hello"
        t.join()
        b.close()
        assert spin.recv(a, 100, spin_s=0.001) == b""  # peer closed: EOF, not a hang
        sel = selectors.DefaultSelector()
        c, d = socket.socketpair()
        sel.register(c, selectors.EVENT_READ, "c")
        t = _later(d, 0.02)
        events = spin.wait_selector(sel, spin_s=0.001)
        assert [key.data for key, _ in events] == ["c"]
        t.join()
        sel.close()
        c.close()
        d.close()
    finally:
        a.close()


def test_spinning_stops_where_it_does_not_pay_and_comes_back_where_it_does():
    state = spin.Adaptive()
    for _ in range(30):
        assert state.window(0.001) in (0.001, 0.0)
        state.record(False)
    windows = [state.window(0.001) for _ in range(32)]
    assert windows.count(0.001) == 2  # one probe every 16 waits
    for _ in range(100):  # the probes now find data: spinning comes back
        if state.window(0.001):
            state.record(True)
    assert state.window(0.001) == 0.001 and state.window(0.001) == 0.001
