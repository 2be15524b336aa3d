"""libclient.spin: waiting for a socket by polling briefly, then blocking."""

from __future__ import annotations

import os
import resource
import selectors
import socket
import threading
import time

import pytest

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


def test_waits_take_descriptors_past_select_limit():
    # select() refuses descriptors >= 1024; a driver with many files open
    # gets nothing but those. Every wait here must still work.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 1100:
        if hard != resource.RLIM_INFINITY and hard < 1100:
            pytest.skip(f"the hard limit on open files is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    held = []
    try:
        while True:
            fd = os.open("/dev/null", os.O_RDONLY)
            held.append(fd)
            if fd >= 1030:
                break
        a, b = socket.socketpair()
        r, w = os.pipe()
        try:
            assert min(a.fileno(), b.fileno(), r, w) >= 1024
            assert not spin.readable(a, 0.01, spin_s=0.001)
            assert not spin.wait_readable(r, 0.01)
            t = _later(b, 0.01)
            assert spin.readable(a, 5.0, spin_s=0.0001)
            t.join()
            os.write(w, b"x")
            assert spin.wait_readable(r, 5.0)
            os.close(w)
            w = -1
            os.read(r, 1)
            assert spin.wait_readable(r, 5.0)  # EOF counts as readable, as with select
        finally:
            a.close()
            b.close()
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
