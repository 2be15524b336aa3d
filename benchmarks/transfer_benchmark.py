"""Object transfer between two stored daemons over loopback TCP: GB/s of one pull.

Starts two stored processes (A, the source, and B, the puller), puts one
object of ``--size`` bytes (default 1 GiB) into A through a StoreClient,
then times ``B.pull`` of it ``--runs`` times (deleting B's copy between
runs) and checks B's bytes against A's once. Prints one JSON object.

The first pull lands in arena pages B has never touched, so it also pays
the kernel's page faults and zero-fill (about half the cost here); later
pulls reuse the same, already faulted range. ``--prefault`` faults B's arena
in first, so every run measures the transfer alone. CPU seconds (user and
system) of each daemon during the timed pulls show where the time goes.

The development VM is shared, so each pull is followed by one run of the
plainest possible Python copy of the same bytes over one loopback TCP stream
(blocking ``sendall`` of a memfd mapping into ``recv_into`` of another,
both faulted in): ``raw_gb_per_s`` is the ceiling under the same load.

    python benchmarks/transfer_benchmark.py [--size 1G] [--runs 3] [--prefault] [--no-raw]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from libclient.hostconfig import parse_bytes  # noqa: E402
from libclient.store_client import StoreClient  # noqa: E402


def _spawn(folder: str, memory: int, *extra: str) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Start one stored; return the process and its ready line."""
    r, w = os.pipe()
    with open(os.path.join(folder, "stored.log"), "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemons.stored", "--config", "none",
             "--socket", os.path.join(folder, "stored.sock"), "--memory", str(memory),
             "--ready-fd", str(w), *extra],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    os.close(w)
    buf = b""
    deadline = time.monotonic() + 60
    try:
        while b"\n" not in buf and time.monotonic() < deadline:
            if select.select([r], [], [], 1)[0]:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
    if b"\n" not in buf:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"stored in {folder} did not start")
    return proc, json.loads(buf)


def _wait_for_line(path: str, needle: bytes, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            if needle in f.read():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{needle!r} not in {path} after {timeout} s")
        time.sleep(0.05)


def _cpu(pid: int) -> float:
    """User plus system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memfd_map(name: str, size: int) -> mmap.mmap:
    fd = os.memfd_create(name)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def _raw_loopback(size: int) -> float:
    """GB/s of one blocking Python TCP stream from one memfd mapping into another."""
    listen = socket.create_server(("127.0.0.1", 0))
    port = listen.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the sender: fault its pages in, then send them all at once
        code = 1
        try:
            listen.close()
            view = memoryview(_memfd_map("raw-src", size))
            for off in range(0, size, 64 << 20):
                view[off:off + (64 << 20)] = b"\x01" * min(64 << 20, size - off)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.recv(1)
                s.sendall(view)
                s.recv(1)
            code = 0
        finally:
            os._exit(code)
    try:
        dst = _memfd_map("raw-dst", size)
        view = memoryview(dst)
        for off in range(0, size, 64 << 20):
            view[off:off + (64 << 20)] = bytes(min(64 << 20, size - off))
        conn, _ = listen.accept()
        with conn:
            t = time.perf_counter()
            conn.sendall(b"g")
            got = 0
            while got < size:
                n = conn.recv_into(view[got:])
                if not n:
                    raise RuntimeError("raw sender vanished")
                got += n
            dt = time.perf_counter() - t
            conn.sendall(b"d")
        view.release()
        dst.close()
    finally:
        listen.close()
        os.waitpid(pid, 0)
    return size / dt / 1e9


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="object size (bytes, K/M/G suffixes)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prefault", action="store_true", help="fault in B's arena first")
    p.add_argument("--no-raw", action="store_true", help="skip the raw-socket reference runs")
    ns = p.parse_args()
    size = parse_bytes(ns.size)
    memory = size + (64 << 20)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="shoal-xfer-") as tmp:
        try:
            for name in ("a", "b"):
                os.mkdir(os.path.join(tmp, name))
            pa, ra = _spawn(os.path.join(tmp, "a"), memory)
            procs.append(pa)
            extra = ["--prefault", str(memory)] if ns.prefault else []
            pb, rb = _spawn(os.path.join(tmp, "b"), memory, *extra)
            procs.append(pb)
            oid = b"transfer-benchmark"
            with StoreClient(ra["socket"], "bench-a") as a, StoreClient(rb["socket"],
                                                                      "bench-b") as b:
                data = np.random.default_rng(0).integers(0, 256, size=size, dtype=np.uint8)
                a.put(oid, data)
                if ns.prefault:  # wait for B's prefault to finish (an info line)
                    _wait_for_line(os.path.join(tmp, "b", "stored.log"), b"prefault_done")
                runs = []
                for i in range(ns.runs):
                    cpu_a, cpu_b = _cpu(pa.pid), _cpu(pb.pid)
                    t = time.perf_counter()
                    got = b.pull(oid, [ra["transfer_address"]])
                    dt = time.perf_counter() - t
                    assert got == size
                    runs.append({"seconds": round(dt, 4), "gb_per_s": round(size / dt / 1e9, 3),
                                 "cpu_s_source": round(_cpu(pa.pid) - cpu_a, 2),
                                 "cpu_s_puller": round(_cpu(pb.pid) - cpu_b, 2)})
                    if i == 0:
                        (buf,) = b.get([oid], timeout=0)
                        assert np.array_equal(np.frombuffer(buf, dtype=np.uint8), data)
                        del buf
                        b.flush_releases()
                    assert b.delete([oid]) == 1
                    if not ns.no_raw:
                        runs[-1]["raw_gb_per_s"] = round(_raw_loopback(size), 3)
        finally:
            for proc in reversed(procs):
                _stop(proc)
    rates = [r["gb_per_s"] for r in runs]
    out = {"benchmark": "transfer_pull", "size": size, "prefault": ns.prefault, "runs": runs,
           "first_gb_per_s": rates[0], "best_gb_per_s": max(rates),
           "median_gb_per_s": sorted(rates)[len(rates) // 2],
           "loadavg_1m": os.getloadavg()[0]}
    if not ns.no_raw:
        raw = sorted(r["raw_gb_per_s"] for r in runs)
        out["raw_median_gb_per_s"] = raw[len(raw) // 2]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
