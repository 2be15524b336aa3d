"""gcsd throughput and latency, chain length 1 and 3, beside raw LMDB and Redis.

    python benchmarks/gcs_benchmark.py [--seconds 3] [--json out.json] [--no-redis]

Cases, each against a fresh deployment on 127.0.0.1:

* R=1: one gcsd process hosting 4 shards (the laptop default);
* R=3: three gcsd members and a chain master, 4 shards, chains of 3.

For each: single-key writes (``kv_put``) and reads (``kv_get``) from a few
client threads; batched writes (``put_batch``, ``wait=True``, split by shard
by the client); then batched writes paced at half the measured batched rate,
for the latency at half load. Per-shard rates count acknowledged items by
shard. The ceiling is LMDB itself (one process, batched puts, msgpack
values), and Redis (Debian's redis-server with redis-benchmark) is the
familiar reference if it is installed. Every process started here is stopped
by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemons.gcsd.tables import LmdbTableStore, Put  # noqa: E402
from libclient.gcs_client import GcsClient, shard_of  # noqa: E402

SHARDS = 4
VALUE = {"state": "FINISHED", "node": b"n" * 16, "t": 1.5}


def _free_port_pair() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as t:
                t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


class Deployment:
    def __init__(self, chain_length: int, base: str) -> None:
        self.base = base
        self.procs: list[subprocess.Popen] = []
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if chain_length == 1:
            port = _free_port_pair()
            self._spawn(["--port", str(port), "--data-dir", f"{base}/g"], env)
            self.address = f"tcp://127.0.0.1:{port}"
            return
        ports = [_free_port_pair() for _ in range(3)]
        mport = _free_port_pair()
        members = ",".join(f"tcp://127.0.0.1:{p}" for p in ports)
        common = ["--shards", str(SHARDS), "--chain-length", "3", "--members", members]
        self._spawn(["--role", "master", "--port", str(mport), "--data-dir", f"{base}/master",
                     *common], env)
        for i in range(3):
            self._spawn(["--member-id", str(i), "--master", f"tcp://127.0.0.1:{mport}",
                         "--data-dir", f"{base}/m{i}", *common], env)
        self.address = members
        with GcsClient(members, timeout=10) as c:  # wait for the chains to form
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    c.kv_put("bench", b"warm", b"1")
                    break
                except Exception:
                    time.sleep(0.1)

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        r, w = os.pipe()
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "daemons.gcsd", *args, "--ready-fd", str(w),
             "--log-level", "warning"], pass_fds=(w,), env=env, cwd=ROOT,
            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        os.close(w)
        with os.fdopen(r, "rb") as f:
            f.readline()

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _pct(lat: list[float], q: float) -> float:
    if not lat:
        return float("nan")
    lat = sorted(lat)
    return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000


def _threads(n: int, seconds: float, body: Any) -> tuple[list[float], list[int], float]:
    """Run ``body(client, i, lat, per_shard)`` in n threads for ``seconds``."""
    lats: list[list[float]] = [[] for _ in range(n)]
    shards: list[list[int]] = [[0] * SHARDS for _ in range(n)]
    stop = time.monotonic() + seconds
    clients = [GcsClient(ADDRESS, timeout=30) for _ in range(n)]
    for c in clients:  # steady state: layout known, connected to every member
        _warm(c)

    def run(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            body(clients[k], k, i, lats[k], shards[k])

    ts = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    start = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.monotonic() - start
    for c in clients:
        c.close()
    return [x for lat in lats for x in lat], [sum(col) for col in zip(*shards, strict=True)], took


ADDRESS = ""


def _warm(c: GcsClient) -> None:
    """Fetch the layout and give the client's sockets time to reach every member.

    A client's first call pays for the layout and the connections (tens of
    ms); a raylet keeps its client for its lifetime, so that is not the
    write latency this benchmark reports.
    """
    for _ in range(20):
        c.kv_get("bench", b"warm")
        time.sleep(0.005)


def bench_deployment(chain_length: int, seconds: float, batch: int) -> dict[str, Any]:
    global ADDRESS
    base = tempfile.mkdtemp(prefix="gcsbench-")
    dep = Deployment(chain_length, base)
    ADDRESS = dep.address
    out: dict[str, Any] = {"chain_length": chain_length, "shards": SHARDS}
    try:
        def put(c: GcsClient, k: int, i: int, lat: list[float], sh: list[int]) -> None:
            key = b"k%d-%d" % (k, i)
            t = time.perf_counter()
            c.kv_put("bench", key, b"v" * 64)
            lat.append(time.perf_counter() - t)
            sh[shard_of("kv", b"bench\x00" + key, SHARDS)] += 1

        def get(c: GcsClient, k: int, i: int, lat: list[float], sh: list[int]) -> None:
            key = b"k%d-%d" % (k, i % 500 + 1)
            t = time.perf_counter()
            c.kv_get("bench", key)
            lat.append(time.perf_counter() - t)
            sh[shard_of("kv", b"bench\x00" + key, SHARDS)] += 1

        def batch_put(c: GcsClient, k: int, i: int, lat: list[float], sh: list[int]) -> None:
            items = [(b"t%d-%d-%d" % (k, i, j), VALUE) for j in range(batch)]
            t = time.perf_counter()
            c.put_batch("tasks", items, wait=True)
            lat.append(time.perf_counter() - t)
            for key, _v in items:
                sh[shard_of("tasks", key, SHARDS)] += 1

        for name, fn, threads in (("write", put, 4), ("read", get, 4),
                                  ("batched_write", batch_put, 4)):
            lat, per_shard, took = _threads(threads, seconds, fn)
            total = sum(per_shard)
            out[name] = {"per_s": round(total / took), "per_shard_per_s":
                         [round(x / took) for x in per_shard],
                         "p50_ms": round(_pct(lat, 0.5), 2), "p99_ms": round(_pct(lat, 0.99), 2),
                         "threads": threads}
        out["batched_write"]["batch"] = batch
        # Half load: 10,000 items/s (half the 20,000/s target), in smaller
        # batches, paced per thread; latency is per put_batch call.
        threads, half_batch, target = 4, 50, 10_000
        pace = half_batch / (target / threads)

        def paced(c: GcsClient, k: int, i: int, lat: list[float], sh: list[int]) -> None:
            items = [(b"h%d-%d-%d" % (k, i, j), VALUE) for j in range(half_batch)]
            t = time.perf_counter()
            c.put_batch("tasks", items, wait=True)
            took = time.perf_counter() - t
            lat.append(took)
            sh[0] += len(items)
            if pace > took:
                time.sleep(pace - took)

        lat, per_shard, took = _threads(threads, seconds, paced)
        out["batched_write_half_load"] = {
            "per_s": round(sum(per_shard) / took), "p50_ms": round(_pct(lat, 0.5), 2),
            "p99_ms": round(_pct(lat, 0.99), 2), "batch": half_batch}
    finally:
        dep.stop()
        shutil.rmtree(base, ignore_errors=True)
    return out


def bench_lmdb(seconds: float, batch: int) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="lmdbbench-")
    store = LmdbTableStore(base)
    n = 0
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            store.write_batch([Put("tasks", b"t%d" % (n + j), VALUE) for j in range(batch)])
            n += batch
        took = time.monotonic() - start
    finally:
        store.close()
        shutil.rmtree(base, ignore_errors=True)
    return {"per_s": round(n / took), "batch": batch}


def bench_redis() -> dict[str, Any] | None:
    if not shutil.which("redis-server") or not shutil.which("redis-benchmark"):
        return None
    port = _free_port_pair()
    base = tempfile.mkdtemp(prefix="redisbench-")
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no", "--dir", base],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = {}
        for label, extra in (("unpipelined", []), ("pipelined_100", ["-P", "100"])):
            res = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q",
                                  "-t", "set,get", "-n", "200000", "-c", "4", *extra],
                                 capture_output=True, text=True, timeout=120)
            for line in res.stdout.replace("\r", "\n").splitlines():
                if "requests per second" in line:
                    op, rest = line.split(":", 1)
                    out[f"{op.strip().lower()}_{label}_per_s"] = round(float(
                        rest.split("requests per second")[0].strip()))
        return out
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--json")
    p.add_argument("--no-redis", action="store_true")
    ns = p.parse_args()
    results: dict[str, Any] = {"lmdb_raw": bench_lmdb(ns.seconds, ns.batch)}
    for r in (1, 3):
        results[f"chain_{r}"] = bench_deployment(r, ns.seconds, ns.batch)
    if not ns.no_redis:
        results["redis"] = bench_redis()
    print(json.dumps(results, indent=2))
    if ns.json:
        Path(ns.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
